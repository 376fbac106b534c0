//! Which probes a service gets: its own checks, by role, and the end-to-end checks derived from
//! the manifests (no user effort):
//!
//! - **dns**: the DNS provider answers the service's FQDN with its address, and each of its
//!   proxied domains with the reverse proxy's address;
//! - **proxy**: each route answers through the reverse proxy (the request goes to the proxy
//!   host, with the route's domain as `Host` and TLS name): not a 5xx; with `authz: true` a
//!   request without a session is redirected to the identity provider's domain;
//! - **db**: for each database, the service's role logs in with its password, from the
//!   service's host over SSH (psql, the password from its sops secret);
//! - **auth**: with an OIDC client, the identity provider's discovery document for the
//!   service's application answers and its `issuer` matches.
//!
//! Not checked here: that the redirect URIs are registered in the identity provider (that
//! needs authentik's API or Terraform's state).

use nixmox_core::model::{Capability, Project, Service};
use nixmox_core::render::nixos::{db_secret, dns_records, POSTGRES_PORT};
use nixmox_core::render::{idp_domain, issuer};

use super::probe::{HostRef, Kind, Probe, Role};

pub fn host_of(s: &Service) -> HostRef {
    HostRef {
        hostname: s.host.hostname.to_string(),
        ip: s.host.ip,
    }
}

/// The service's own checks of the given roles, in role order, then manifest order.
pub fn checks(s: &Service, roles: &[Role]) -> Vec<Probe> {
    let mut out = Vec::new();
    for &role in roles {
        let list = match role {
            Role::Startup => &s.health.startup,
            Role::Liveness => &s.health.liveness,
            Role::Readiness => &s.health.readiness,
            Role::EndToEnd => continue,
        };
        out.extend(
            list.iter()
                .map(|c| Probe::new(role, host_of(s), Kind::Check(c.clone()))),
        );
    }
    out
}

/// The end-to-end checks of a service.
pub fn end_to_end(p: &Project, s: &Service) -> Vec<Probe> {
    let mut out = Vec::new();
    let host = host_of(s);
    let probe = |kind| Probe::new(Role::EndToEnd, host.clone(), kind);
    if p.provider(Capability::Dns).is_some() {
        let records = dns_records(p);
        let mut names = vec![p.fqdn(s)];
        names.extend(s.proxies.iter().map(|x| x.domain.to_string()));
        names.dedup();
        for name in names {
            if let Some(ip) = records.get(&name).and_then(|ip| ip.parse().ok()) {
                out.push(probe(Kind::DnsRecord { name, expect: ip }));
            }
        }
    }
    if let Some(rp) = p.provider(Capability::ReverseProxy) {
        let idp = idp_domain(p);
        for x in &s.proxies {
            out.push(probe(Kind::Route {
                https: x.tls,
                domain: x.domain.to_string(),
                path: x.path.clone(),
                via: rp.host.ip,
                idp: if x.authz { idp.clone() } else { None },
            }));
        }
    }
    if let Some(pg) = p.provider(Capability::Database) {
        for db in &s.dbs {
            out.push(probe(Kind::Db {
                server: pg.host.ip,
                port: POSTGRES_PORT,
                database: db.database.clone(),
                role: db.role.clone(),
                secret: db_secret(&db.role),
            }));
        }
    }
    if s.auth.as_ref().and_then(|a| a.oidc.as_ref()).is_some() {
        if let Some(iss) = issuer(p, s) {
            out.push(probe(Kind::Oidc { issuer: iss }));
        }
    }
    out
}
