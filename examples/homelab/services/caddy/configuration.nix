{ config, pkgs, lib, ... }:
{
  # Virtual hosts are generated from the apps' interface.proxy entries.
  services.caddy = {
    enable = true;
    email = "admin@nixmox.lan";
    globalConfig = ''
      admin 127.0.0.1:2019
      local_certs
    '';
  };

  networking.firewall.allowedTCPPorts = [ 80 443 ];
}
