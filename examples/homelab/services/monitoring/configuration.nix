{ config, pkgs, lib, ... }:
let
  hosts = config.nixmox.hosts; # { <service> = { fqdn, ip, hostname }; } for this host and its dependencies
  oidc = config.nixmox.oidc;
in
{
  services.grafana = {
    enable = true;
    settings = {
      server = {
        http_addr = "0.0.0.0";
        http_port = 3000;
        domain = "grafana.nixmox.lan";
        root_url = "https://grafana.nixmox.lan/";
      };
      "auth.generic_oauth" = {
        enabled = true;
        name = "authentik";
        client_id = oidc.clientId;
        # Grafana reads the file itself, as its own user: the manifest gives the secret to
        # `grafana` (interface.auth.oidc.sops.owner).
        client_secret = "$__file{${oidc.clientSecretFile}}";
        scopes = lib.concatStringsSep " " oidc.scopes;
        auth_url = "https://auth.nixmox.lan/application/o/authorize/";
        token_url = "https://auth.nixmox.lan/application/o/token/";
        api_url = "https://auth.nixmox.lan/application/o/userinfo/";
        login_attribute_path = "preferred_username";
        role_attribute_path = "contains(groups, 'grafana-admins') && 'Admin' || 'Viewer'";
      };
    };
    provision.datasources.settings.datasources = [
      { name = "Prometheus"; type = "prometheus"; url = "http://127.0.0.1:9090"; isDefault = true; }
      { name = "Loki"; type = "loki"; url = "http://127.0.0.1:3100"; }
    ];
  };

  services.prometheus = {
    enable = true;
    port = 9090;
    retentionTime = "30d";
    alertmanagers = [{ static_configs = [{ targets = [ "127.0.0.1:9093" ]; }]; }];
    scrapeConfigs = [{
      job_name = "node";
      static_configs = [{
        targets = lib.mapAttrsToList (_: h: "${h.fqdn}:9100") hosts;
      }];
    }];
    alertmanager = {
      enable = true;
      port = 9093;
      configuration = {
        route = { receiver = "default"; group_by = [ "alertname" ]; };
        receivers = [{ name = "default"; }];
      };
    };
  };

  services.loki = {
    enable = true;
    configuration = {
      auth_enabled = false;
      server.http_listen_port = 3100;
      common = {
        path_prefix = "/var/lib/loki";
        replication_factor = 1;
        ring.kvstore.store = "inmemory";
        storage.filesystem = {
          chunks_directory = "/var/lib/loki/chunks";
          rules_directory = "/var/lib/loki/rules";
        };
      };
      schema_config.configs = [{
        from = "2025-01-01";
        store = "tsdb";
        object_store = "filesystem";
        schema = "v13";
        index = { prefix = "index_"; period = "24h"; };
      }];
    };
  };

  networking.firewall.allowedTCPPorts = [ 3000 9090 9093 3100 ];
}
