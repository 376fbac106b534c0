{ config, pkgs, lib, ... }:
let
  db = config.nixmox.db.guacamole;
  issuer = "https://auth.nixmox.lan/application/o/guacamole/";
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

      postgresql-hostname = db.host;
      postgresql-port = db.port;
      postgresql-database = db.database;
      postgresql-username = db.role;

      openid-issuer = issuer;
      openid-authorization-endpoint = "https://auth.nixmox.lan/application/o/authorize/";
      openid-jwks-endpoint = "${issuer}jwks/";
      openid-client-id = "guacamole-oidc";
      openid-redirect-uri = "https://guac.nixmox.lan/guacamole/";
      openid-username-claim-type = "preferred_username";
      openid-groups-claim-type = "groups";
    };
  };

  services.tomcat.port = 8280;

  networking.firewall.allowedTCPPorts = [ 4822 8280 ];
}
