{ config, pkgs, lib, ... }:
let
  db = config.nixmox.db.guacamole;
  oidc = config.nixmox.oidc;
  version = config.services.guacamole-client.package.version;
  home = "/etc/guacamole"; # GUACAMOLE_HOME; guacamole-client's module writes guacamole.properties here
  # Apache publishes the PostgreSQL and OpenID extensions only as release tarballs, and nixpkgs
  # packages neither: they are fetched once on the host, matching the client's version and
  # checked against the SHA-256 Apache publishes beside them.
  mirror = "https://archive.apache.org/dist/guacamole/${version}/binary";
in
{
  services.guacamole-server = {
    enable = true;
    host = "0.0.0.0";
    port = 4822;
  };

  services.guacamole-client = {
    enable = true;
    enableWebserver = true;
    settings = {
      guacd-hostname = "127.0.0.1";
      guacd-port = 4822;
      # Properties may also come from the environment (POSTGRESQL_PASSWORD below), so the
      # password never lands in the world-readable guacamole.properties.
      enable-environment-properties = true;
      extension-priority = "openid";

      postgresql-hostname = db.host;
      postgresql-port = db.port;
      postgresql-database = db.database;
      postgresql-username = db.role;

      openid-issuer = oidc.issuer;
      openid-authorization-endpoint = "https://auth.nixmox.lan/application/o/authorize/";
      openid-jwks-endpoint = "${oidc.issuer}jwks/";
      openid-client-id = oidc.clientId;
      openid-redirect-uri = builtins.head oidc.redirectUris;
      openid-scope = lib.concatStringsSep " " oidc.scopes;
      openid-username-claim-type = oidc.usernameClaim;
      openid-groups-claim-type = oidc.groupsClaim;
    };
  };

  # The JDBC driver comes from nixpkgs; the two extensions from Apache (see above).
  environment.etc."guacamole/lib/postgresql-jdbc.jar".source = "${pkgs.postgresql_jdbc}/share/java/postgresql-jdbc.jar";

  systemd.services.guacamole-extensions = {
    description = "Guacamole's PostgreSQL and OpenID extensions, and its database password";
    before = [ "tomcat.service" ];
    requiredBy = [ "tomcat.service" ];
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    path = [ pkgs.curl pkgs.gnutar pkgs.gzip ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; RuntimeDirectory = "guacamole-env"; RuntimeDirectoryPreserve = true; };
    script = ''
      set -euo pipefail
      mkdir -p ${home}/extensions
      fetch() { # tarball, path of the jar inside it
        local jar="${home}/extensions/$(basename "$2")"
        [ -s "$jar" ] && return 0
        local tmp; tmp="$(mktemp -d)"
        curl -fsSL -o "$tmp/t.tar.gz" "${mirror}/$1"
        curl -fsSL -o "$tmp/t.sha256" "${mirror}/$1.sha256"
        [ "$(sha256sum "$tmp/t.tar.gz" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$tmp/t.sha256")" ]
        tar -xzf "$tmp/t.tar.gz" -C "$tmp"
        install -m 0444 "$tmp/$2" "$jar"
        rm -rf "$tmp"
      }
      fetch guacamole-auth-jdbc-${version}.tar.gz guacamole-auth-jdbc-${version}/postgresql/guacamole-auth-jdbc-postgresql-${version}.jar
      fetch guacamole-auth-sso-${version}.tar.gz guacamole-auth-sso-${version}/openid/guacamole-auth-sso-openid-${version}.jar
      # systemd reads this as root when it starts tomcat; the file is root's, 0400.
      (umask 077; printf 'POSTGRESQL_PASSWORD=%s\n' "$(cat ${db.passwordFile})" > /run/guacamole-env/env)
    '';
  };
  systemd.services.tomcat.serviceConfig.EnvironmentFile = "/run/guacamole-env/env";

  services.tomcat.port = 8280;

  networking.firewall.allowedTCPPorts = [ 4822 8280 ];
}
