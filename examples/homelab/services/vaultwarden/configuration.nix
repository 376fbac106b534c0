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
      DATABASE_URL = "postgresql://${db.role}@${db.host}:${toString db.port}/${db.database}";
      # libpq reads the password from here (sops-managed).
      PGPASSFILE = "/run/secrets/vaultwarden.pgpass";
    };
    environmentFile = "/run/secrets/vaultwarden.env"; # ADMIN_TOKEN
  };

  networking.firewall.allowedTCPPorts = [ 8222 ];
}
