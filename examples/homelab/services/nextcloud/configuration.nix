{ config, pkgs, lib, ... }:
let
  db = config.nixmox.db.nextcloud;
in
{
  services.nextcloud = {
    enable = true;
    package = pkgs.nextcloud31;
    hostName = "cloud.nixmox.lan";
    https = true;
    maxUploadSize = "4G";
    configureRedis = true;
    config = {
      dbtype = "pgsql";
      dbhost = "${db.host}:${toString db.port}";
      dbname = db.database;
      dbuser = db.role;
      # NixMox's decrypted password file, given to the nextcloud user by the manifest
      # (interface.db.sops.owner).
      dbpassFile = db.passwordFile;
      adminuser = "admin";
      # People sign in through authentik (user_oidc); the local admin's password is made on the
      # host once and never leaves it.
      adminpassFile = "/var/lib/nextcloud-admin/password";
    };
    settings = {
      trusted_proxies = [ "192.168.99.12" ];
      overwriteprotocol = "https";
      default_phone_region = "DE";
    };
    extraApps = {
      inherit (config.services.nextcloud.package.packages.apps) user_oidc;
    };
    extraAppsEnable = true;
  };

  systemd.services.nextcloud-admin-password = {
    description = "Nextcloud's local admin password, made once on the host";
    before = [ "nextcloud-setup.service" ];
    requiredBy = [ "nextcloud-setup.service" ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; UMask = "0077"; StateDirectory = "nextcloud-admin"; };
    script = ''
      f=/var/lib/nextcloud-admin/password
      [ -s "$f" ] || head -c 32 /dev/urandom | base64 | tr -d '\n' > "$f"
      chown nextcloud "$f"
    '';
  };

  networking.firewall.allowedTCPPorts = [ 80 ];
}
