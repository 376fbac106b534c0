{ config, pkgs, lib, ... }:
{
  # NixMox generates the resolver itself from every manifest: the local zone, an A record for
  # every host and proxied domain (also readable as config.nixmox.dns.records), access for the
  # project network, and forwarders. This module only adds local tuning.
  services.unbound.settings.server = {
    verbosity = 1;
    prefetch = true;
    cache-min-ttl = 60;
  };
}
