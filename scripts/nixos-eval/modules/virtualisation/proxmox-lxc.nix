# Stand-in for nixpkgs' nixos/modules/virtualisation/proxmox-lxc.nix (the host files import it
# as `modulesPath + "/virtualisation/proxmox-lxc.nix"`): its options, and what it sets that
# touches options NixMox sets too. Transcribed; see docs/generated-options.md §1.1.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkDefault mkIf mkForce types;
  cfg = config.proxmoxLXC;
in
{
  options.proxmoxLXC = {
    enable = mkOption { type = types.bool; default = true; };
    privileged = mkOption { type = types.bool; default = false; };
    manageNetwork = mkOption { type = types.bool; default = false; };
    manageHostName = mkOption { type = types.bool; default = false; };
  };
  config = mkIf cfg.enable {
    boot.isContainer = true;
    services.openssh = {
      enable = mkDefault true;
      startWhenNeeded = mkDefault true;
    };
    networking = mkIf (!cfg.manageNetwork) {
      useDHCP = false;
      useHostResolvConf = false;
      useNetworkd = true;
      hostName = mkIf (!cfg.manageHostName) (mkForce "");
    };
  };
}
