//! `reverse_proxy: { type: nginx }`: nginx's virtual hosts (`services.nginx.virtualHosts`)
//! from every consumer's `interface.proxy`. Plain HTTP only: nginx cannot sign its sites'
//! certificates with the project CA as Caddy does, and NixMox does not wire authentik's
//! forward-auth into it, so a route with `tls: true` or `authz: true` is an error at load.
//! The second implementation of `reverse_proxy`, and the example of docs/providers.md.

use std::collections::BTreeMap;

use super::{route_probes, routes_by_site, upstream, HostConfig, Ports, Probe, Provider};
use crate::model::{Capability, Project, Proxy, Service};
use crate::nixexpr::{set, Nix};

/// The nginx implementation of `reverse_proxy`.
pub struct Nginx;

impl Provider for Nginx {
    fn capability(&self) -> Capability {
        Capability::ReverseProxy
    }
    fn implementation(&self) -> &'static str {
        "nginx"
    }
    fn ports(&self) -> Ports {
        Ports {
            tcp: &[80],
            udp: &[],
        }
    }
    fn host_config(&self, p: &Project, _me: usize, host: &mut HostConfig) {
        let c = &mut host.options;
        set(c, &["services", "nginx", "enable"], Nix::Bool(true));
        // Host, X-Real-IP, X-Forwarded-For and -Proto to the upstream, as Caddy sends them.
        set(
            c,
            &["services", "nginx", "recommendedProxySettings"],
            Nix::Bool(true),
        );
        set(
            c,
            &["services", "nginx", "virtualHosts"],
            Nix::Attrs(virtual_hosts(p)),
        );
    }
    fn probes(&self, p: &Project, s: &Service) -> Vec<Probe> {
        match p.provider(Capability::ReverseProxy) {
            Some(rp) => route_probes(p, s, rp.host.ip),
            None => Vec::new(),
        }
    }
    fn check_route(&self, x: &Proxy) -> Vec<String> {
        let mut out = Vec::new();
        if x.tls {
            out.push(
                "the `nginx` reverse proxy serves plain HTTP only: set `tls: false`, or use `caddy`, which signs the site with the project CA"
                    .to_string(),
            );
        }
        if x.authz {
            out.push(
                "the `nginx` reverse proxy does not do forward-auth: remove `authz: true`, or use `caddy`"
                    .to_string(),
            );
        }
        for (name, value) in &x.headers {
            if value.contains('$') {
                out.push(format!(
                    "header `{name}`: nginx would read `$` as a variable; write the value without it, or use `caddy`"
                ));
            }
        }
        out
    }
}

/// An nginx string: double-quoted, `\` and `"` escaped. Values never contain `$` (nginx's
/// variables; refused by [`Nginx::check_route`]) nor control characters
/// (`manifest::check_header_value`).
pub fn nginx_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `services.nginx.virtualHosts`: one per domain; each route a location (`/` itself, else an
/// exact match of its path and a prefix match of what is below it, as Caddy's
/// `path /p /p/*`), passed to its upstream with its headers added to the response.
fn virtual_hosts(p: &Project) -> BTreeMap<String, Nix> {
    let mut hosts = BTreeMap::new();
    for (domain, routes) in routes_by_site(p, |x| x.domain.to_string()) {
        let mut locations = BTreeMap::new();
        for (s, x) in routes {
            let mut location = BTreeMap::new();
            location.insert(
                "proxyPass".to_string(),
                Nix::str(format!("http://{}", upstream(s, x))),
            );
            if !x.headers.is_empty() {
                let text: String = x
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        format!("add_header {name} {} always;\n", nginx_quote(value))
                    })
                    .collect();
                location.insert("extraConfig".to_string(), Nix::Str(text));
            }
            let base = x.path.trim_end_matches('/');
            if base.is_empty() {
                locations.insert("/".to_string(), Nix::Attrs(location));
            } else {
                locations.insert(format!("= {base}"), Nix::Attrs(location.clone()));
                locations.insert(format!("{base}/"), Nix::Attrs(location));
            }
        }
        set(&mut hosts, &[&domain, "locations"], Nix::Attrs(locations));
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_backslashes_and_quotes() {
        assert_eq!(nginx_quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
    }
}
