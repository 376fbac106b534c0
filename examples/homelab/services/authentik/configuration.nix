{ config, pkgs, lib, ... }:
let
  db = config.nixmox.db.authentik;
  image = "ghcr.io/goauthentik/server:2025.6";
  environment = {
    AUTHENTIK_POSTGRESQL__HOST = db.host;
    AUTHENTIK_POSTGRESQL__PORT = toString db.port;
    AUTHENTIK_POSTGRESQL__NAME = db.database;
    AUTHENTIK_POSTGRESQL__USER = db.role;
    AUTHENTIK_REDIS__HOST = "host.containers.internal";
  };
  # AUTHENTIK_SECRET_KEY and AUTHENTIK_POSTGRESQL__PASSWORD, decrypted by sops.
  environmentFiles = [ "/run/secrets/authentik.env" ];
in
{
  virtualisation.podman.enable = true;
  virtualisation.oci-containers.backend = "podman";
  virtualisation.oci-containers.containers = {
    authentik-server = {
      inherit image environment environmentFiles;
      cmd = [ "server" ];
      ports = [ "9000:9000" "9443:9443" ];
    };
    authentik-worker = {
      inherit image environment environmentFiles;
      cmd = [ "worker" ];
    };
  };

  services.redis.servers.authentik = {
    enable = true;
    bind = "0.0.0.0";
    port = 6379;
  };

  networking.firewall.allowedTCPPorts = [ 9000 9443 ];
}
