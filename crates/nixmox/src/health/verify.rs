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
//!   service's application answers and its `issuer` matches; and its redirect URIs are
//!   registered, read from the Terraform state of its `tf:service-infra` workspace
//!   (`redirects_registered`; skipped when that state is not local, as with a remote backend).

use nixmox_core::model::{Capability, Project, Service};

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

/// The end-to-end checks of a service: each provider implementation's probes of it (DNS
/// records, routes through the reverse proxy, database logins, OIDC discovery), in that order.
pub fn end_to_end(p: &Project, s: &Service) -> Vec<Probe> {
    let host = host_of(s);
    [
        Capability::Dns,
        Capability::ReverseProxy,
        Capability::Database,
        Capability::Identity,
    ]
    .into_iter()
    .filter_map(|cap| p.implementation(cap))
    .flat_map(|imp| imp.probes(p, s))
    .map(|probe| Probe::new(Role::EndToEnd, host.clone(), probe.into()))
    .collect()
}

/// The `auth` end-to-end check's last part: S's redirect URIs are registered with the identity
/// provider, read from the Terraform state of S's `tf:service-infra` workspace (the
/// `authentik_provider_oauth2` it applied). `Ok(None)` when there is nothing to check (no OIDC
/// client, or no local state to read, as with a remote backend).
pub fn redirects_registered(
    state: Option<&str>,
    s: &Service,
) -> Result<Option<String>, RedirectsError> {
    let Some(oidc) = s.auth.as_ref().and_then(|a| a.oidc.as_ref()) else {
        return Ok(None);
    };
    let Some(state) = state else {
        return Ok(None);
    };
    let target = format!("the redirect URIs of OIDC client `{}`", oidc.client_id);
    let doc: serde_json::Value =
        serde_json::from_str(state).map_err(|source| RedirectsError::UnreadableState {
            target: target.clone(),
            source,
        })?;
    let mut registered: Vec<String> = Vec::new();
    let mut found = false;
    for r in doc["resources"].as_array().into_iter().flatten() {
        if r["type"] != "authentik_provider_oauth2" || r["mode"] != "managed" {
            continue;
        }
        for inst in r["instances"].as_array().into_iter().flatten() {
            let attrs = &inst["attributes"];
            if attrs["client_id"].as_str() != Some(oidc.client_id.as_str()) {
                continue;
            }
            found = true;
            for u in attrs["allowed_redirect_uris"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(url) = u["url"].as_str() {
                    registered.push(url.to_string());
                }
            }
        }
    }
    if !found {
        return Err(RedirectsError::ClientMissing { target });
    }
    let missing: Vec<String> = oidc
        .redirect_uris
        .iter()
        .filter(|u| !registered.contains(u))
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(Some(format!(
            "{} redirect URI(s) registered",
            oidc.redirect_uris.len()
        )))
    } else {
        Err(RedirectsError::NotRegistered {
            target,
            missing,
            registered,
        })
    }
}

/// Why an OIDC client's redirect URIs are not known to be registered.
#[derive(Debug, thiserror::Error)]
pub enum RedirectsError {
    #[error("auth check on {target}: expected readable Terraform state, got {source}")]
    UnreadableState {
        target: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("auth check on {target}: expected the client in the Terraform state, got no `authentik_provider_oauth2` with that client id")]
    ClientMissing { target: String },
    #[error("auth check on {target}: expected {} registered, got {}", .missing.join(", "), if .registered.is_empty() { "none".to_string() } else { .registered.join(", ") })]
    NotRegistered {
        target: String,
        /// The manifest's URIs the client does not have.
        missing: Vec<String>,
        /// The URIs it has.
        registered: Vec<String>,
    },
}

#[cfg(test)]
mod redirect_tests {
    use super::*;

    fn service(uris: &[&str]) -> Service {
        let mut s = test_service();
        if let Some(o) = s.auth.as_mut().and_then(|a| a.oidc.as_mut()) {
            o.redirect_uris = uris.iter().map(|u| u.to_string()).collect();
        }
        s
    }

    fn test_service() -> Service {
        use nixmox_core::{SourceFile, Sources};
        let file = |path: &str, text: &str| SourceFile {
            path: path.into(),
            bytes: text.as_bytes().to_vec(),
        };
        let sources = Sources {
            config: Some(file(
                "nixmox.yaml",
                "project: p\ndomain: p.lan\nnetwork: { cidr: 10.0.0.0/24, gateway: 10.0.0.1 }\n",
            )),
            manifests: vec![
                file(
                    "services/idp/manifest.yaml",
                    "name: idp\nprovides: { identity: { type: authentik } }\n",
                ),
                file(
                    "services/app/manifest.yaml",
                    "name: app\ninterface: { auth: { oidc: { client_id: app-c } } }\n",
                ),
            ],
            lock: None,
        };
        let p = nixmox_core::load(&sources, &|_: &str| true)
            .project
            .expect("valid");
        p.service("app").unwrap().clone()
    }

    const STATE: &str = r#"{"version": 4, "resources": [{"mode": "managed", "type": "authentik_provider_oauth2", "name": "app", "instances": [{"attributes": {"client_id": "app-c", "allowed_redirect_uris": [{"matching_mode": "strict", "url": "https://app.p.lan/cb"}]}}]}]}"#;

    #[test]
    fn registered_missing_and_unknown() {
        assert_eq!(
            redirects_registered(Some(STATE), &service(&["https://app.p.lan/cb"])).unwrap(),
            Some("1 redirect URI(s) registered".into())
        );
        let err = redirects_registered(Some(STATE), &service(&["https://app.p.lan/other"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected https://app.p.lan/other registered, got https://app.p.lan/cb"),
            "{err}"
        );
        assert_eq!(
            redirects_registered(None, &service(&["https://x"])).unwrap(),
            None
        );
        let none = r#"{"resources": []}"#;
        assert!(
            redirects_registered(Some(none), &service(&["https://app.p.lan/cb"]))
                .unwrap_err()
                .to_string()
                .contains("no `authentik_provider_oauth2`")
        );
    }
}
