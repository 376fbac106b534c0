# Stand-ins for `pkgs`: nothing is built, so a package is a derivation-shaped attribute set
# (types.package accepts it) and the few builders the modules call return one. `formats` gives
# the value types nixpkgs' pkgs/pkgs-lib/formats.nix declares for YAML, JSON and Java
# properties. sops-nix's own package (`pkgs.callPackage <sops-nix> { }`) is a stand-in too.
{ lib }:
let
  drv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    drvPath = "/nix/store/00000000000000000000000000000000-${name}.drv";
    version = "0";
  };
  pkg = name: attrs: drv name // attrs;
  jsonValue = with lib.types;
    let
      valueType = nullOr (oneOf [ bool int float str path (attrsOf valueType) (listOf valueType) ]) // {
        description = "JSON value";
      };
    in
    valueType;
  pkgs = {
    inherit lib;
    formats = {
      yaml = { }: { type = jsonValue; generate = name: value: builtins.deepSeq value (drv name); };
      json = { }: { type = jsonValue; generate = name: value: builtins.deepSeq value (drv name); };
      javaProperties = { ... }: {
        type = with lib.types; attrsOf (oneOf [ str int bool path ]);
        generate = name: value: builtins.deepSeq value (drv name);
      };
    };
    writeText = name: text: builtins.seq text (drv name);
    writeTextFile = { name, text, ... }: builtins.seq text (drv name);
    writeShellScript = name: text: builtins.seq text (drv name);
    writeShellScriptBin = name: text: builtins.seq text (drv name);
    # sops-nix calls its own default.nix for its package, and manifest-for.nix for the manifest.
    callPackage = fn: args:
      let f = if builtins.isFunction fn then fn else import fn;
      in if builtins.isAttrs f then { sops-install-secrets = drv "sops-install-secrets"; }
      else if (builtins.functionArgs f) ? vendorHash || !(builtins.isFunction f) then { sops-install-secrets = drv "sops-install-secrets"; }
      else f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    stdenv = { buildPlatform = "x86_64-linux"; hostPlatform = "x86_64-linux"; };
    postgresql = drv "postgresql-17";
    postgresql_14 = drv "postgresql-14";
    postgresql_15 = drv "postgresql-15";
    postgresql_16 = drv "postgresql-16";
    postgresql_17 = drv "postgresql-17";
    postgresql_jdbc = drv "postgresql-jdbc";
    nextcloud31 = pkg "nextcloud-31" { packages.apps.user_oidc = drv "user_oidc"; };
    guacamole-client = pkg "guacamole-client" { version = "1.6.0"; };
    guacamole-server = drv "guacamole-server";
    caddy = drv "caddy";
    unbound = drv "unbound";
    openssh = drv "openssh";
    coreutils = drv "coreutils";
    curl = drv "curl";
    gnutar = drv "gnutar";
    gzip = drv "gzip";
    gnupg = drv "gnupg";
    age = drv "age";
    systemd = drv "systemd";
  };
in
{ inherit pkgs drv; }
