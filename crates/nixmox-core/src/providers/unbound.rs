//! `dns: { type: unbound }`: the project's resolver, serving an A record for every host and
//! every proxied domain (`render::nixos::dns_records`) and forwarding the rest; the consumers'
//! record probes.

use std::collections::BTreeMap;

use super::{HostConfig, Ports, Probe, Provider};
use crate::model::{Capability, Project, Service};
use crate::nixexpr::{set, Nix};
use crate::render::nixos::dns_records;

/// The Unbound implementation of `dns`.
pub struct Unbound;

impl Provider for Unbound {
    fn capability(&self) -> Capability {
        Capability::Dns
    }
    fn implementation(&self) -> &'static str {
        "unbound"
    }
    fn ports(&self) -> Ports {
        Ports {
            tcp: &[53],
            udp: &[53],
        }
    }
    fn host_config(&self, p: &Project, _me: usize, host: &mut HostConfig) {
        let c = &mut host.options;
        let zone = p.domain.as_str();
        let local_data: Vec<Nix> = dns_records(p)
            .into_iter()
            .map(|(name, ip)| Nix::str(format!("\"{name}. IN A {ip}\"")))
            .collect();
        set(c, &["services", "unbound", "enable"], Nix::Bool(true));
        set(
            c,
            &["services", "unbound", "resolveLocalQueries"],
            Nix::Bool(true),
        );
        let mut server = BTreeMap::new();
        set(&mut server, &["interface"], Nix::strs(["0.0.0.0"]));
        set(
            &mut server,
            &["access-control"],
            Nix::strs([
                "127.0.0.0/8 allow".to_string(),
                format!("{} allow", p.network.cidr),
            ]),
        );
        set(
            &mut server,
            &["local-zone"],
            Nix::strs([format!("\"{zone}.\" static")]),
        );
        set(&mut server, &["local-data"], Nix::List(local_data));
        set(
            c,
            &["services", "unbound", "settings", "server"],
            Nix::Attrs(server),
        );
        set(
            c,
            &["services", "unbound", "settings", "forward-zone"],
            Nix::list([Nix::attrs([
                ("name", Nix::str(".")),
                ("forward-addr", Nix::strs(forwarders(p))),
            ])]),
        );
    }
    fn probes(&self, p: &Project, s: &Service) -> Vec<Probe> {
        let records = dns_records(p);
        let mut names = vec![p.fqdn(s)];
        names.extend(s.proxies.iter().map(|x| x.domain.to_string()));
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| {
                let expect = records.get(&name)?.parse().ok()?;
                Some(Probe::DnsRecord { name, expect })
            })
            .collect()
    }
}

/// Where the resolver forwards what it does not serve: the configured nameservers other than
/// itself, else the gateway.
fn forwarders(p: &Project) -> Vec<String> {
    let me = p.provider(Capability::Dns).map(|d| d.host.ip);
    let mut forwarders: Vec<String> = p
        .network
        .nameservers
        .iter()
        .filter(|n| Some(**n) != me)
        .map(|n| n.to_string())
        .collect();
    if forwarders.is_empty() {
        forwarders.push(p.network.gateway.to_string());
    }
    forwarders
}
