# Typed declarations of every nixpkgs option NixMox's rendered hosts set (and of the few that
# sops-nix and authentik-nix set or read), transcribed from nixpkgs' module files: name, type,
# default. `release` is the NixOS release of the project's nixpkgs (`YY.MM`), for what differs
# between releases. The file each option comes from is named above it (paths under
# nixos/modules/ unless said otherwise); docs/generated-options.md says which copy was read.
# Where nixpkgs' type is a custom one, the nearest lib.types equivalent is used and a comment
# says so. Options marked LOOSE are declared only so that definitions other modules make under
# a false `mkIf` (authentik-nix's nginx and ACME parts) are not unknown; NixMox sets none.
{ release }:
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types;
  atLeast = v: builtins.compareVersions release v >= 0;
  opt = type: default: mkOption { inherit type default; };
  req = type: mkOption { inherit type; };
  bool = default: opt types.bool default;
  loose = mkOption { type = types.attrsOf types.anything; default = { }; };

  # nixos/lib/systemd-lib.nix: unitOption (a bool, int, string, path or package, or a list of
  # them; lists from several definitions are concatenated).
  unitValue = types.oneOf [ types.bool types.int types.str types.path types.package ];
  unitOption = types.either unitValue (types.listOf unitValue);

  # nixos/lib/systemd-unit-options.nix: the options of systemd.services.<name> NixMox, sops-nix
  # and authentik-nix use.
  serviceOptions = { name, ... }: {
    options = {
      enable = bool true;
      description = opt types.singleLineStr "";
      wantedBy = opt (types.listOf types.str) [ ];
      requiredBy = opt (types.listOf types.str) [ ];
      wants = opt (types.listOf types.str) [ ];
      requires = opt (types.listOf types.str) [ ];
      after = opt (types.listOf types.str) [ ];
      before = opt (types.listOf types.str) [ ];
      bindsTo = opt (types.listOf types.str) [ ];
      partOf = opt (types.listOf types.str) [ ];
      restartTriggers = opt (types.listOf types.unspecified) [ ];
      reloadTriggers = opt (types.listOf types.unspecified) [ ];
      restartIfChanged = bool true;
      environment = opt (types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]))) { };
      path = opt (types.listOf (types.oneOf [ types.package types.str ])) [ ];
      serviceConfig = opt (types.attrsOf unitOption) { };
      unitConfig = opt (types.attrsOf unitOption) { };
      script = opt types.lines "";
      preStart = opt types.lines "";
      postStart = opt types.lines "";
      startAt = opt (types.either types.str (types.listOf types.str)) [ ];
    };
  };

  # nixos/modules/services/databases/postgresql.nix
  ensureUser = types.submodule {
    options = {
      name = req types.str;
      ensureDBOwnership = bool false;
      ensureClauses = mkOption {
        default = { };
        type = types.submodule {
          options = lib.genAttrs [ "superuser" "createrole" "createdb" "inherit" "login" "replication" "bypassrls" ]
            (_: opt (types.nullOr types.bool) null);
        };
      };
    };
  };
  pg = config.services.postgresql;
in
{
  options = {
    # nixos/modules/misc/assertions.nix
    assertions = opt (types.listOf types.unspecified) [ ];
    warnings = opt (types.listOf types.str) [ ];

    # nixos/modules/misc/version.nix
    system.stateVersion = req types.str;
    # nixos/modules/system/activation/top-level.nix
    system.build = mkOption {
      type = types.submoduleWith { modules = [ { freeformType = types.lazyAttrsOf (types.uniq types.unspecified); } ]; };
      default = { };
    };
    # nixos/modules/system/activation/activation-script.nix
    system.activationScripts = opt (types.attrsOf (types.either types.str (types.submodule {
      options = {
        deps = opt (types.listOf types.str) [ ];
        text = req types.lines;
        supportsDryActivation = bool false;
      };
    }))) { };

    # nixos/modules/virtualisation/nixos-containers.nix
    boot.isContainer = bool false;

    # nixos/modules/tasks/network-interfaces.nix
    networking = {
      hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
      domain = opt (types.nullOr types.str) null;
      useDHCP = bool true;
      useNetworkd = bool false;
      useHostResolvConf = bool false;
      nameservers = opt (types.listOf types.str) [ ];
      hosts = opt (types.attrsOf (types.listOf types.str)) { };
      defaultGateway = opt (types.nullOr (types.coercedTo types.str (address: { inherit address; }) (types.submodule {
        options = {
          address = req types.str;
          interface = opt (types.nullOr types.str) null;
          metric = opt (types.nullOr types.int) null;
          source = opt (types.nullOr types.str) null;
        };
      }))) null;
      interfaces = opt (types.attrsOf (types.submodule {
        options.ipv4.addresses = opt (types.listOf (types.submodule {
          options = {
            address = req types.str;
            # addrOpts: `types.addCheck types.int (n: n >= 0 && n <= 32)`
            prefixLength = req (types.addCheck types.int (n: n >= 0 && n <= 32));
          };
        })) [ ];
      })) { };
      # nixos/modules/services/networking/firewall.nix
      firewall = {
        enable = bool true;
        allowedTCPPorts = opt (types.listOf types.port) [ ];
        allowedUDPPorts = opt (types.listOf types.port) [ ];
      };
    };

    # nixos/modules/services/networking/ssh/sshd.nix
    services.openssh = {
      enable = bool false;
      startWhenNeeded = bool false;
      openFirewall = bool true;
      hostKeys = opt (types.listOf types.attrs) [
        { type = "rsa"; bits = 4096; path = "/etc/ssh/ssh_host_rsa_key"; }
        { type = "ed25519"; path = "/etc/ssh/ssh_host_ed25519_key"; }
      ];
      settings = mkOption {
        default = { };
        type = types.submodule {
          freeformType = types.attrsOf (types.nullOr (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]));
          options = {
            PermitRootLogin = opt (types.nullOr (types.enum [ "yes" "without-password" "prohibit-password" "forced-commands-only" "no" ])) "prohibit-password";
            PasswordAuthentication = opt (types.nullOr types.bool) true;
            KbdInteractiveAuthentication = opt (types.nullOr types.bool) true;
          };
        };
      };
    };

    # nixos/modules/config/users-groups.nix (openssh.authorizedKeys from sshd.nix's userOptions)
    users.mutableUsers = bool true;
    users.users = opt (types.attrsOf (types.submodule ({ name, ... }: {
      options = {
        name = opt types.str name;
        group = opt types.str "";
        isNormalUser = bool false;
        isSystemUser = bool false;
        extraGroups = opt (types.listOf types.str) [ ];
        home = opt types.str "/var/empty";
        uid = opt (types.nullOr types.int) null;
        openssh.authorizedKeys.keys = opt (types.listOf types.singleLineStr) [ ];
      };
    }))) { };
    users.groups = opt (types.attrsOf (types.submodule ({ name, ... }: {
      options = {
        name = opt types.str name;
        gid = opt (types.nullOr types.int) null;
        members = opt (types.listOf types.str) [ ];
      };
    }))) { };

    # nixos/modules/security/ca.nix (issue 12, item 6: every host trusts the project CA)
    security.pki.certificateFiles = opt (types.listOf types.path) [ ];
    # nixos/modules/security/sudo.nix
    security.sudo.wheelNeedsPassword = bool true;
    # LOOSE: nixos/modules/security/acme/default.nix
    security.acme.certs = loose;

    # nixos/modules/config/nix.nix: `settings` is freeform (semanticConfType); these are declared.
    nix.settings = mkOption {
      default = { };
      type = types.submodule {
        freeformType = types.attrsOf (types.oneOf [ types.bool types.int types.str types.path (types.listOf types.str) ]);
        options = {
          sandbox = opt (types.either types.bool (types.enum [ "relaxed" ])) true;
          trusted-users = opt (types.listOf types.str) [ "root" ];
        };
      };
    };

    # nixos/modules/system/boot/systemd.nix
    systemd.package = opt types.package pkgs.systemd;
    systemd.services = opt (types.attrsOf (types.submodule serviceOptions)) { };
    systemd.targets = opt (types.attrsOf (types.submodule serviceOptions)) { };
    # nixos/modules/system/boot/systemd/tmpfiles.nix
    systemd.tmpfiles.rules = opt (types.listOf types.str) [ ];

    # nixos/modules/system/etc/etc.nix
    environment.etc = opt (types.attrsOf (types.submodule ({ name, ... }: {
      options = {
        target = opt types.str name;
        text = opt (types.nullOr types.lines) null;
        source = req types.path;
        mode = opt types.str "symlink";
        user = opt types.str "+0";
        group = opt types.str "+0";
      };
    }))) { };
    # nixos/modules/config/system-path.nix
    environment.systemPackages = opt (types.listOf types.package) [ ];

    # nixos/modules/services/databases/postgresql.nix
    services.postgresql = {
      enable = bool false;
      package = opt types.package (if atLeast "25.11" then pkgs.postgresql_17 else pkgs.postgresql_16);
      enableTCPIP = bool false;
      settings = mkOption {
        default = { };
        type = types.submodule {
          freeformType = types.attrsOf (types.oneOf [ types.bool types.float types.int types.str ]);
          options.port = opt types.port 5432;
        };
      };
      ensureDatabases = opt (types.listOf types.str) [ ];
      ensureUsers = opt (types.listOf ensureUser) [ ];
      authentication = opt types.lines "";
      identMap = opt types.lines "";
      initialScript = opt (types.nullOr types.path) null;
    };
    # nixos/modules/services/backup/postgresql-backup.nix (set by the example's own module)
    services.postgresqlBackup = {
      enable = bool false;
      backupAll = bool false;
      startAt = opt (types.either types.str (types.listOf types.str)) "*-*-* 01:15:00";
    };

    # nixos/modules/services/web-servers/caddy/default.nix, vhost-options.nix
    services.caddy = {
      enable = bool false;
      email = opt (types.nullOr types.str) null;
      acmeCA = opt (types.nullOr types.str) null;
      globalConfig = opt types.lines "";
      extraConfig = opt types.lines "";
      virtualHosts = opt (types.attrsOf (types.submodule ({ name, ... }: {
        options = {
          hostName = opt types.str name;
          serverAliases = opt (types.listOf types.str) [ ];
          listenAddresses = opt (types.listOf types.str) [ ];
          useACMEHost = opt (types.nullOr types.str) null;
          logFormat = opt types.lines "";
          extraConfig = opt types.lines "";
        };
      }))) { };
    };

    # nixos/modules/services/web-servers/nginx/default.nix, vhost-options.nix,
    # location-options.nix (only what `providers::nginx` sets)
    services.nginx = {
      enable = bool false;
      recommendedProxySettings = bool false;
      virtualHosts = opt (types.attrsOf (types.submodule {
        options.locations = opt (types.attrsOf (types.submodule {
          options = {
            proxyPass = opt (types.nullOr types.str) null;
            extraConfig = opt types.lines "";
          };
        })) { };
      })) { };
    };

    # nixos/modules/services/networking/unbound.nix: `settings` is freeform; each section is an
    # attribute set (forward-zone and the like: a list of them) of strings, ints, bools or
    # lists of strings (the module's `validSettingsPrimitiveTypes`/`validSettingsTypes`).
    services.unbound = let
      prim = types.oneOf [ types.int types.str types.bool types.float ];
      section = types.attrsOf (types.either prim (types.listOf prim));
    in {
      enable = bool false;
      resolveLocalQueries = bool true;
      settings = opt (types.attrsOf (types.either section (types.listOf section))) { };
    };

    # LOOSE: nixos/modules/services/web-servers/nginx/default.nix
    services.nginx = loose;
  };

  config = lib.mkMerge [
    {
      # postgresql.nix's own assertion, verbatim in meaning.
      assertions = map ({ name, ensureDBOwnership, ... }: {
        assertion = ensureDBOwnership -> builtins.elem name pg.ensureDatabases;
        message = "For each database user defined with `services.postgresql.ensureUsers` and `ensureDBOwnership = true;`, a database with the same name must be defined in `services.postgresql.ensureDatabases`. Offender: ${name} has not been found among databases.";
      }) pg.ensureUsers;
    }
    # The units the PostgreSQL module makes in this release: postgresql.service always, and
    # from 25.11 postgresql-setup.service and postgresql.target (PR #403645).
    (mkIf pg.enable (lib.mkMerge [
      { systemd.services.postgresql = { wantedBy = [ "multi-user.target" ]; }; }
      (mkIf (atLeast "25.11") {
        systemd.services.postgresql-setup = { requires = [ "postgresql.service" ]; after = [ "postgresql.service" ]; };
        systemd.targets.postgresql = { requires = [ "postgresql.service" "postgresql-setup.service" ]; };
      })
    ]))
    (mkIf config.services.caddy.enable { systemd.services.caddy = { }; users.users.caddy = { isSystemUser = true; group = "caddy"; }; users.groups.caddy = { }; })
    (mkIf config.services.unbound.enable { systemd.services.unbound = { }; users.users.unbound = { isSystemUser = true; group = "unbound"; }; users.groups.unbound = { }; })
    (mkIf pg.enable { users.users.postgres = { isSystemUser = true; group = "postgres"; }; users.groups.postgres = { }; })
    { users.users.root = { uid = 0; group = "root"; home = "/root"; }; users.groups.root = { }; }
  ];
}
