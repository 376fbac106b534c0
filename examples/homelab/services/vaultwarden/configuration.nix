{ config, pkgs, lib, ... }:
let
  db = config.nixmox.db.vaultwarden;
in
{
  services.vaultwarden = {
    enable = true;
    dbBackend = "postgresql";
    config = {
      DOMAIN = "https://vault.nixmox.lan";
      ROCKET_ADDRESS = "0.0.0.0";
      ROCKET_PORT = 8222;
      SIGNUPS_ALLOWED = false;
    };
    # DATABASE_URL carries the password, so it lives in an environment file (systemd reads it
    # as root when it starts vaultwarden), written from NixMox's decrypted password file.
    environmentFile = "/run/vaultwarden-db-env/env";
  };

  systemd.services.vaultwarden-db-env = {
    description = "Environment file with vaultwarden's database URL";
    before = [ "vaultwarden.service" ];
    requiredBy = [ "vaultwarden.service" ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; UMask = "0077"; RuntimeDirectory = "vaultwarden-db-env"; RuntimeDirectoryPreserve = true; };
    # NixMox's generated passwords are base64url, which needs no escaping in a URL.
    script = ''
      printf 'DATABASE_URL=postgresql://%s:%s@%s:%s/%s\n' ${db.role} "$(cat ${db.passwordFile})" ${db.host} ${toString db.port} ${db.database} > /run/vaultwarden-db-env/env
    '';
  };

  networking.firewall.allowedTCPPorts = [ 8222 ];
}
