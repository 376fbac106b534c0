{ config, pkgs, lib, ... }:
let
  # Servarr apps read their PostgreSQL settings from <APP>__POSTGRES__* variables. The password
  # comes from NixMox's decrypted file (config.nixmox.db.<name>.passwordFile, root's, 0400): a
  # oneshot running as root writes it into an environment file that systemd (also root) reads
  # when it starts the app, so the app's own user never needs the file.
  app = name: prefix: let db = config.nixmox.db.${name}; in {
    "${name}-db-env" = {
      description = "Environment file with ${name}'s database password";
      before = [ "${name}.service" ];
      requiredBy = [ "${name}.service" ];
      serviceConfig = { Type = "oneshot"; RemainAfterExit = true; UMask = "0077"; RuntimeDirectory = "${name}-db-env"; RuntimeDirectoryPreserve = true; };
      script = ''
        printf '%s__POSTGRES__PASSWORD=%s\n' ${prefix} "$(cat ${db.passwordFile})" > /run/${name}-db-env/env
      '';
    };
    ${name} = {
      environment = {
        "${prefix}__POSTGRES__HOST" = db.host;
        "${prefix}__POSTGRES__PORT" = toString db.port;
        "${prefix}__POSTGRES__USER" = db.role;
        "${prefix}__POSTGRES__MAINDB" = db.database;
        "${prefix}__POSTGRES__LOGDB" = db.database; # log tables share the main database
      };
      serviceConfig.EnvironmentFile = "/run/${name}-db-env/env";
    };
  };
in
{
  services.sonarr.enable = true;
  services.radarr.enable = true;
  services.prowlarr.enable = true;

  systemd.services = app "sonarr" "SONARR" // app "radarr" "RADARR" // app "prowlarr" "PROWLARR";

  users.groups.media = { };
  users.users.sonarr.extraGroups = [ "media" ];
  users.users.radarr.extraGroups = [ "media" ];

  systemd.tmpfiles.rules = [ "d /srv/media 2775 root media -" ];

  networking.firewall.allowedTCPPorts = [ 8989 7878 9696 ];
}
