# Evaluates one rendered host with the NixOS module system for real: nixpkgs' lib.evalModules,
# the real sops-nix and authentik-nix modules, and typed declarations of the nixpkgs options
# (nixpkgs-options.nix). Unknown options and type errors abort the evaluation; failed
# assertions are reported. Prints a summary as JSON. Run by scripts/check-nixos-eval.
{ nixpkgsLib, sopsNix, authentikNix, build, host, release }:
let
  lib = import (nixpkgsLib + "/lib");
  stubs = import ./stubs.nix { inherit lib; };
  inherit (stubs) pkgs drv;
  hostFile = build + "/nix/hosts/${host}.nix";
  inputs = {
    sops-nix.nixosModules.sops = sopsNix + "/modules/sops";
    # authentik-nix's flake module is module.nix plus its packages; the packages are stand-ins.
    authentik-nix.nixosModules.default = {
      imports = [ (authentikNix + "/module.nix") ];
      services.authentik.authentikComponents = lib.mkDefault (lib.genAttrs
        [ "frontend" "gopkgs" "manage" "migrate" "pythonEnv" "rust" "staticWorkdirDeps" ] drv);
    };
  };
  eval = lib.evalModules {
    specialArgs = { inherit inputs; modulesPath = ./modules; };
    modules = [
      { _module.args = { inherit pkgs; }; }
      (import ./nixpkgs-options.nix { inherit release; })
      ./example-services.nix
      hostFile
    ];
  };
  inherit (eval) config options;

  # Forces the value of every option something defines (not defaults nobody asked for), deeply,
  # so every definition is type-checked and merged. system.build holds only derivations; an
  # assertion's message is read only when it fails (below), as NixOS does.
  skip = [ [ "system" "build" ] [ "assertions" ] [ "warnings" ] ];
  walk = path: o:
    if lib.isOption o then
      (if o.files or [ ] == [ ] || builtins.elem path skip then [ ] else [ (builtins.deepSeq o.value (lib.concatStringsSep "." path)) ])
    else if builtins.isAttrs o then
      lib.concatLists (lib.mapAttrsToList (n: v: if n == "_module" then [ ] else walk (path ++ [ n ]) v) o)
    else [ ];
  checked = walk [ ] options;

  # NixMox's own contract: every unit its units require or order after exists in this release.
  units = builtins.attrNames config.systemd.services;
  known = u: lib.hasSuffix ".target" u || builtins.elem (lib.removeSuffix ".service" u) units;
  ours = lib.filterAttrs (n: _: lib.hasPrefix "nixmox-" n) config.systemd.services;
  missingUnits = lib.concatLists (lib.mapAttrsToList (n: u:
    map (x: "systemd.services.${n}: `${x}` does not exist in NixOS ${release}")
      (builtins.filter (x: !known x) (u.requires ++ u.after))) ours);

  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions) ++ missingUnits;
in
builtins.deepSeq checked {
  inherit host;
  options = builtins.length checked;
  assertions = builtins.length config.assertions;
  inherit failed;
  warnings = config.warnings;
  secrets = lib.mapAttrs (_: s: { inherit (s) owner group mode path; }) config.sops.secrets;
}
