{ config, pkgs, lib, ... }:
{
  # Databases and roles come from the apps' interface.db entries and are
  # created by NixMox (native-migration) — nothing per-app is listed here.
  services.postgresql = {
    enable = true;
    package = pkgs.postgresql_16;
    enableTCPIP = true;
    settings = {
      max_connections = 200;
      shared_buffers = "1GB";
      password_encryption = "scram-sha-256";
    };
    authentication = lib.mkAfter ''
      host all all 192.168.99.0/24 scram-sha-256
    '';
  };

  services.postgresqlBackup = {
    enable = true;
    backupAll = true;
    startAt = "*-*-* 03:15:00";
  };

  networking.firewall.allowedTCPPorts = [ 5432 ];
}
