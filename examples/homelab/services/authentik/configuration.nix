{ config, pkgs, lib, ... }:
{
  # NixMox enables authentik (authentik-nix) against its own database and domain, with its
  # secrets from the host's sops file. This module only adds local settings.
  services.authentik.settings = {
    email = {
      host = "smtp.nixmox.lan";
      port = 25;
      from = "authentik@nixmox.lan";
    };
    error_reporting.enabled = false;
  };
}
