{ config, pkgs, lib, ... }:
let
  # Servarr apps read their PostgreSQL settings from <APP>__POSTGRES__* variables;
  # the password comes from a sops-rendered environment file.
  pgEnv = app: prefix: let db = config.nixmox.db.${app}; in {
    "${prefix}__POSTGRES__HOST" = db.host;
    "${prefix}__POSTGRES__PORT" = toString db.port;
    "${prefix}__POSTGRES__USER" = db.role;
    "${prefix}__POSTGRES__MAINDB" = db.database;
    "${prefix}__POSTGRES__LOGDB" = db.database; # log tables share the main database
  };
in
{
  services.sonarr.enable = true;
  services.radarr.enable = true;
  services.prowlarr.enable = true;

  systemd.services.sonarr.environment = pgEnv "sonarr" "SONARR";
  systemd.services.radarr.environment = pgEnv "radarr" "RADARR";
  systemd.services.prowlarr.environment = pgEnv "prowlarr" "PROWLARR";

  systemd.services.sonarr.serviceConfig.EnvironmentFile = "/run/secrets/sonarr.env";
  systemd.services.radarr.serviceConfig.EnvironmentFile = "/run/secrets/radarr.env";
  systemd.services.prowlarr.serviceConfig.EnvironmentFile = "/run/secrets/prowlarr.env";

  users.groups.media = { };
  users.users.sonarr.extraGroups = [ "media" ];
  users.users.radarr.extraGroups = [ "media" ];

  systemd.tmpfiles.rules = [ "d /srv/media 2775 root media -" ];

  networking.firewall.allowedTCPPorts = [ 8989 7878 9696 ];
}
