# Stand-ins for the nixpkgs services the example's own modules (examples/homelab/services/*)
# configure and NixMox never sets: each is a freeform attribute set with `enable`, so their
# settings are NOT type-checked here; what is checked is that the modules evaluate (every
# `config.nixmox.*` fact they read exists, with its type) and that the users a sops secret is
# given to exist, as the real modules create them (user = group = the service's name unless
# noted). `package` options that the example reads are given.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types;
  service = extra: mkOption {
    default = { };
    type = types.submodule {
      freeformType = types.attrsOf types.anything;
      options = { enable = mkOption { type = types.bool; default = false; }; } // extra;
    };
  };
  # service name -> (the system user it runs as, its units)
  made = {
    guacamole-server = { user = null; units = [ "guacamole-server" ]; };
    tomcat = { user = "tomcat"; units = [ "tomcat" ]; };
    sonarr = { user = "sonarr"; units = [ "sonarr" ]; };
    radarr = { user = "radarr"; units = [ "radarr" ]; };
    prowlarr = { user = null; units = [ "prowlarr" ]; }; # DynamicUser
    grafana = { user = "grafana"; units = [ "grafana" ]; };
    prometheus = { user = "prometheus"; units = [ "prometheus" ]; };
    loki = { user = "loki"; units = [ "loki" ]; };
    nextcloud = { user = "nextcloud"; units = [ "nextcloud-setup" "phpfpm-nextcloud" ]; };
    vaultwarden = { user = "vaultwarden"; units = [ "vaultwarden" ]; };
  };
  on = name: config.services.${name}.enable;
in
{
  options.services = {
    guacamole-server = service { };
    guacamole-client = service {
      package = mkOption { type = types.package; default = pkgs.guacamole-client; };
      enableWebserver = mkOption { type = types.bool; default = true; };
    };
    tomcat = service { };
    sonarr = service { };
    radarr = service { };
    prowlarr = service { };
    grafana = service { };
    prometheus = service { };
    loki = service { };
    nextcloud = service { package = mkOption { type = types.package; default = pkgs.nextcloud31; }; };
    vaultwarden = service { };
  };
  config = lib.mkMerge ([
    (mkIf (on "guacamole-client" && config.services.guacamole-client.enableWebserver) { services.tomcat.enable = true; })
  ] ++ lib.mapAttrsToList (name: m: mkIf (on name) {
    systemd.services = lib.genAttrs m.units (_: { });
    users.users = lib.optionalAttrs (m.user != null) { ${m.user} = { isSystemUser = true; group = m.user; }; };
    users.groups = lib.optionalAttrs (m.user != null) { ${m.user} = { }; };
  }) made);
}
