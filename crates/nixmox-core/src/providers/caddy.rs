//! `reverse_proxy: { type: caddy }` (the default): Caddy's sites from every consumer's
//! `interface.proxy` (routes, headers, forward-auth through the identity provider's outpost),
//! signed by the project CA, whose key NixMox generates for the proxy's host.

use std::collections::BTreeMap;

use super::{
    route_probes, routes_by_site, secret_path, upstream, ForwardAuth, HostConfig, Ports, Probe,
    Provider,
};
use crate::model::{Capability, Project, Service};
use crate::nixexpr::{set, Nix, Part};
use crate::render::nixos::{has_project_ca, CA_CERT_ETC, CA_KEY_SECRET, PROJECT_CA_CERT};

/// Caddy's name for the project CA (its `pki` app and the sites' `issuer internal`).
pub const CADDY_CA_ID: &str = "nixmox";

/// The Caddy implementation of `reverse_proxy`.
pub struct Caddy;

impl Provider for Caddy {
    fn capability(&self) -> Capability {
        Capability::ReverseProxy
    }
    fn implementation(&self) -> &'static str {
        "caddy"
    }
    fn ports(&self) -> Ports {
        Ports {
            tcp: &[80, 443],
            udp: &[],
        }
    }
    fn host_config(&self, p: &Project, _me: usize, host: &mut HostConfig) {
        let hosts: BTreeMap<String, Nix> = caddy_sites(p)
            .into_iter()
            .map(|(site, conf)| (site, Nix::attrs([("extraConfig", Nix::Str(conf))])))
            .collect();
        let c = &mut host.options;
        set(c, &["services", "caddy", "enable"], Nix::Bool(true));
        // The project CA: its certificate from the flake, its key from sops-nix (Caddy's own,
        // read at start); Caddy keeps its intermediate and the sites' certificates in its
        // storage.
        set(
            c,
            &["environment", "etc", CA_CERT_ETC, "source"],
            Nix::path(&format!("../{PROJECT_CA_CERT}")),
        );
        host.secrets.insert(
            CA_KEY_SECRET.to_string(),
            Nix::attrs([
                ("owner", Nix::str("caddy")),
                ("mode", Nix::str("0400")),
                ("restartUnits", Nix::strs(["caddy.service"])),
            ]),
        );
        let (head, tail) = caddy_pki_global();
        set(
            c,
            &["services", "caddy", "globalConfig"],
            Nix::Interp(vec![
                Part::Lit(head),
                Part::Expr(secret_path(CA_KEY_SECRET)),
                Part::Lit(tail),
            ]),
        );
        set(c, &["services", "caddy", "virtualHosts"], Nix::Attrs(hosts));
    }
    fn secret_names(&self, p: &Project) -> Vec<String> {
        if has_project_ca(p) {
            vec![CA_KEY_SECRET.to_string()]
        } else {
            Vec::new()
        }
    }
    fn probes(&self, p: &Project, s: &Service) -> Vec<Probe> {
        match p.provider(Capability::ReverseProxy) {
            Some(rp) => route_probes(p, s, rp.host.ip),
            None => Vec::new(),
        }
    }
    fn uses_project_ca(&self) -> bool {
        true
    }
    fn check(&self, p: &Project, _me: usize) -> Vec<String> {
        caddy_sites(p)
            .into_iter()
            .flat_map(|(site, conf)| {
                crate::render::verify::caddyfile(&conf)
                    .into_iter()
                    .map(move |e| format!("Caddy site {site}: {e}"))
            })
            .collect()
    }
}

/// A Caddyfile token taken literally: Caddy reads a backtick-quoted token without escapes, so
/// quotes and backslashes arrive as written (in a `"`-quoted token `\\` stays two backslashes).
/// Values are checked by `manifest::check_header_value` (no backtick, no `{}` placeholders); a
/// backtick that got here anyway falls back to a `"`-quoted token.
pub fn caddy_quote(s: &str) -> String {
    if s.contains('`') {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        format!("`{s}`")
    }
}

/// Caddy's global options for the project CA, around the key's path: the text before it and
/// the text after it. The certificate is read from `/etc/<CA_CERT_ETC>`. Caddy does not try to
/// install the root in the system's trust store: NixOS does that (`security.pki`).
pub fn caddy_pki_global() -> (String, String) {
    (
        format!(
            "skip_install_trust\npki {{\n\tca {CADDY_CA_ID} {{\n\t\tname \"NixMox project CA\"\n\t\troot {{\n\t\t\tformat pem_file\n\t\t\tcert /etc/{CA_CERT_ETC}\n\t\t\tkey "
        ),
        "\n\t\t}\n\t}\n}\n".to_string(),
    )
}

/// The identity provider's outpost, when the project has one that does forward-auth.
fn outpost(p: &Project) -> Option<ForwardAuth> {
    let idp = p.provider(Capability::Identity)?;
    p.implementation(Capability::Identity)?.forward_auth(idp)
}

/// The reverse proxy's sites: site address → Caddyfile text of its routes.
pub fn caddy_sites(p: &Project) -> BTreeMap<String, String> {
    // Group routes by site (domain and scheme).
    let sites = routes_by_site(p, |x| {
        if x.tls {
            x.domain.to_string()
        } else {
            format!("http://{}", x.domain)
        }
    });
    let outpost = outpost(p);
    let mut hosts = BTreeMap::new();
    for (site, routes) in sites {
        let mut conf = String::new();
        if routes.iter().any(|(_, x)| x.tls) {
            if has_project_ca(p) {
                conf.push_str(&format!(
                    "tls {{\n  issuer internal {{\n    ca {CADDY_CA_ID}\n  }}\n}}\n"
                ));
            } else {
                conf.push_str("tls internal\n");
            }
        }
        let any_authz = routes.iter().any(|(_, x)| x.authz);
        if let (true, Some(fa)) = (any_authz, &outpost) {
            conf.push_str(&format!(
                "handle {}/* {{\n  reverse_proxy {}\n}}\n",
                fa.prefix, fa.upstream
            ));
        }
        for (n, (s, x)) in routes.into_iter().enumerate() {
            let matcher = if x.path == "/" {
                String::new()
            } else {
                let base = x.path.trim_end_matches('/');
                conf.push_str(&format!("@route{n} path {base} {base}/*\n"));
                format!(" @route{n}")
            };
            conf.push_str(&format!("handle{matcher} {{\n"));
            for (name, value) in &x.headers {
                conf.push_str(&format!("  header {name} {}\n", caddy_quote(value)));
            }
            if let (true, Some(fa)) = (x.authz, &outpost) {
                conf.push_str(&format!("  forward_auth {} {{\n    uri {}/auth/caddy\n    copy_headers {}\n    trusted_proxies private_ranges\n  }}\n", fa.upstream, fa.prefix, fa.copy_headers));
            }
            conf.push_str(&format!("  reverse_proxy {}\n}}\n", upstream(s, x)));
        }
        hosts.insert(site, conf);
    }
    hosts
}
