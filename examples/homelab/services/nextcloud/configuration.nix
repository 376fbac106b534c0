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
      dbpassFile = "/run/secrets/nextcloud-db-password";
      adminuser = "admin";
      adminpassFile = "/run/secrets/nextcloud-admin-password";
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

  networking.firewall.allowedTCPPorts = [ 80 ];
}
