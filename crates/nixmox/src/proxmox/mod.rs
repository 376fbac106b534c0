//! The Proxmox VE driver: a client of PVE's JSON API (`/api2/json`) and, on top of it, the
//! container lifecycle of `infra.backend: proxmox-api` and the `nixmox template` commands.
//!
//! Layers, bottom up:
//! - `api` — the [`Api`] trait (one request, PVE's `data` or a typed error) and its HTTPS
//!   implementation on `ureq` + rustls (`ring`). Authentication by API token
//!   (`Authorization: PVEAPIToken=…`) or by ticket (user and password from
//!   `NIXMOX_PROXMOX_USER` / `NIXMOX_PROXMOX_PASSWORD`, with the CSRF header on writes).
//!   Credentials are [`Secret`]s: `Debug` and `Display` print `<redacted>`, and no error
//!   carries them.
//! - `tls` — certificate checking: webpki roots plus `proxmox.tls.ca_file`, or a SHA-256 pin
//!   (`proxmox.tls.fingerprint`), or nothing at all with `insecure: true` (warned on every run).
//! - `client` — [`Client`]: retries with backoff and jitter for what is safe to repeat, waits for
//!   every task a write starts, checks before repeating a create or a start whether the first
//!   attempt went through, counts writes.
//! - `lifecycle` — desired containers from the model, the minimal diff, `converge`, and the
//!   explicit `remove_orphans` / `down`.
//! - `template` — listing and uploading LXC templates.
//! - `step` — `tf:infra` for the engine.
//!
//! The client is blocking, not async: the engine runs each step on its own thread (see
//! `engine::scheduler`), and the lifecycle fans out over a bounded set of scoped threads, so an
//! async runtime would add a large dependency for no gain. The issue asked for async; threads
//! were chosen for the whole engine.

pub mod api;
pub mod backup;
pub mod client;
pub mod error;
pub mod lifecycle;
pub mod snapshot;
pub mod step;
pub mod template;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixmox_core::model::SecretRef;
use nixmox_core::Project;

pub use api::{Api, Credentials, HttpApi, HttpOptions, Method, Secret};
pub use client::{Client, ClientOptions, Guest, Retry, Volume};
pub use error::{CtError, PveError};
pub use tls::TlsSettings;

/// Environment variables for ticket authentication (when no API token is available).
pub const USER_ENV: &str = "NIXMOX_PROXMOX_USER";
pub const PASSWORD_ENV: &str = "NIXMOX_PROXMOX_PASSWORD";

/// Everything needed to talk to a project's PVE.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoint: String,
    pub credentials: Credentials,
    pub tls: TlsSettings,
}

fn resolve(root: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    }
}

/// The API token from `proxmox.token` (a relative file is relative to the project root), if
/// it is there; with a description of where it came from, for messages.
pub fn token(project: &Project, root: &Path) -> Option<(Secret, String)> {
    match &project.proxmox.token {
        SecretRef::Env(var) => std::env::var(var)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (Secret::new(v), format!("${var} (proxmox.token)"))),
        SecretRef::File(path) => std::fs::read_to_string(resolve(root, path))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (Secret::new(v), format!("the file `{path}` (proxmox.token)"))),
    }
}

impl Settings {
    /// Reads the settings from the project and the environment.
    pub fn from_project(project: &Project, root: &Path) -> Result<Settings, PveError> {
        let endpoint = project.proxmox.endpoint.clone().ok_or_else(|| {
            PveError::Config(
                "proxmox.endpoint is not set: the Proxmox API driver needs the API's URL, like https://pve.example.org:8006"
                    .into(),
            )
        })?;
        let credentials = match token(project, root) {
            Some((token, source)) => {
                let t = token.expose();
                let well_formed = t
                    .split_once('!')
                    .and_then(|(user, rest)| Some((user, rest.split_once('=')?)))
                    .is_some_and(|(user, (id, secret))| {
                        user.contains('@') && !id.is_empty() && !secret.is_empty()
                    });
                if !well_formed {
                    return Err(PveError::Config(format!(
                        "the API token in {source} is not of the form `user@realm!tokenid=secret`"
                    )));
                }
                Credentials::Token { token, source }
            }
            None => match (std::env::var(USER_ENV), std::env::var(PASSWORD_ENV)) {
                (Ok(user), Ok(password)) if !user.is_empty() && !password.is_empty() => {
                    Credentials::Password {
                        user,
                        password: Secret::new(password),
                    }
                }
                _ => {
                    let from = match &project.proxmox.token {
                        SecretRef::Env(var) => format!("${var}"),
                        SecretRef::File(path) => format!("the file `{path}`"),
                    };
                    return Err(PveError::Config(format!(
                        "no Proxmox credentials: put an API token (`user@realm!tokenid=secret`) in {from} \
                         (proxmox.token), or set {USER_ENV} and {PASSWORD_ENV}"
                    )));
                }
            },
        };
        let t = &project.proxmox.tls;
        let fingerprint = match &t.fingerprint {
            Some(f) => Some(tls::parse_fingerprint(f).ok_or_else(|| {
                PveError::Config(format!(
                    "proxmox.tls.fingerprint `{f}` is not a SHA-256 fingerprint (64 hex digits)"
                ))
            })?),
            None => None,
        };
        Ok(Settings {
            endpoint,
            credentials,
            tls: TlsSettings {
                ca_file: t.ca_file.as_deref().map(|p| resolve(root, p)),
                fingerprint,
                insecure: t.insecure,
            },
        })
    }

    /// Secrets to scrub from anything written to a log.
    pub fn secrets(&self) -> Vec<String> {
        self.credentials.secrets()
    }
}

/// A client for these settings.
pub fn connect(settings: &Settings, opts: ClientOptions) -> Result<Client, PveError> {
    let api = HttpApi::new(
        &settings.endpoint,
        settings.credentials.clone(),
        &settings.tls,
        &HttpOptions::default(),
    )?;
    Ok(Client::new(Arc::new(api), opts))
}
