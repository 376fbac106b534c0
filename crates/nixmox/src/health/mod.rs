//! Health checks and end-to-end checks: the probes, the Docker Compose timing around them, and
//! what the engine and `nixmox ps` ask of them.
//!
//! - [`probe`] runs one check once, bounded by a timeout: `command` over SSH on the service's
//!   host, `http(s)` with a small HTTP/1.1 client ([`http`], TLS by rustls with the project CA
//!   trusted), `tcp` (a connection), `dns` (an A query to the project's DNS server, [`dns`]),
//!   and the end-to-end probes [`verify`] derives from the manifests (db, proxy, dns, auth).
//! - [`gate`] repeats probes with Docker Compose's `interval`, `timeout`, `retries` and
//!   `start_period` until each is healthy or unhealthy.
//! - [`status`] runs every service's live checks once, in parallel, for `nixmox ps`.
//!
//! Every failure is a [`Failure`]: the check, its target, what was expected and what came back.
//!
//! Names in checks (`http://guacamole.nixmox.lan:8280/`, `tcp: caddy.nixmox.lan:443`) that the
//! project knows (a host's FQDN or hostname, a proxied domain) are resolved from the manifests,
//! to the same addresses the project's DNS server serves; other names go to the system
//! resolver. The `dns` checks are the ones that test the DNS server itself.

pub mod dns;
pub mod gate;
pub mod http;
pub mod probe;
pub mod status;
pub mod steps;
pub mod verify;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nixmox_core::model::Capability;
use nixmox_core::render::nixos::dns_records;
use nixmox_core::Project;

/// The SSH program checks use instead of `ssh` (a wrapper adding `-i KEY`, say).
pub const ENV_SSH: &str = "NIXMOX_SSH";
/// A PEM file of CA certificates https checks and Terraform trust, besides the public roots, the
/// project CA and `proxmox.tls.ca_file` (default: the project's `.nixmox/ca.pem` when it
/// exists).
pub const ENV_CA_FILE: &str = "NIXMOX_CA_FILE";
/// `IP:PORT=IP:PORT[,…]`: connect to the second address whenever a check would connect to the
/// first (TCP, UDP and SSH alike), like curl's `--connect-to`. For tests, tunnels and port
/// forwards; the names, `Host` headers and TLS server names stay the same.
pub const ENV_CONNECT_TO: &str = "NIXMOX_CONNECT_TO";
/// Where sops-nix puts secrets on the hosts (default `/run/secrets`).
pub const ENV_REMOTE_SECRETS_DIR: &str = "NIXMOX_REMOTE_SECRETS_DIR";

/// sops-nix's default `sops.secrets.<name>.path` prefix.
pub const DEFAULT_REMOTE_SECRETS_DIR: &str = "/run/secrets";

/// The health checks after a deploy or a restore that did not pass (`steps::after_deploy`),
/// as one description of the failures.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HealthFailure(pub String);

/// A check that did not pass: which, on what, what was expected, what came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Like `readiness tcp` or `end-to-end proxy`.
    pub check: String,
    /// Like `postgresql.nixmox.lan:5432 (192.168.99.11:5432)`.
    pub target: String,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} check on {}: expected {}, got {}",
            self.check, self.target, self.expected, self.got
        )
    }
}

/// How checks reach the project's hosts.
#[derive(Clone, Debug)]
pub struct Ssh {
    /// `ssh` unless [`ENV_SSH`] says otherwise.
    pub program: String,
    /// OpenSSH options (the engine's: BatchMode, a shared connection, the project's
    /// known_hosts), without `ConnectTimeout`, which each probe sets from its timeout.
    pub options: Vec<String>,
    pub user: nixmox_core::ids::SshUser,
}

/// Everything a probe needs besides the check itself. Cheap to clone (the TLS configuration is
/// shared).
#[derive(Clone)]
pub struct Context {
    /// Names the project knows → addresses: each host's FQDN and hostname, each proxied domain
    /// (→ the reverse proxy). Lowercase, without a trailing dot.
    pub names: BTreeMap<String, Ipv4Addr>,
    /// The project's DNS server (the `dns` provider's address, port 53), if it has one.
    pub dns_server: Option<SocketAddrV4>,
    /// Connection redirects ([`ENV_CONNECT_TO`]).
    pub connect_to: BTreeMap<SocketAddrV4, SocketAddrV4>,
    pub ssh: Ssh,
    /// rustls' client configuration: the public roots plus the project's trust set.
    pub tls: Arc<rustls::ClientConfig>,
    /// The CA files trusted besides the public roots, for messages.
    pub ca_files: Vec<PathBuf>,
    pub remote_secrets_dir: String,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("names", &self.names.len())
            .field("dns_server", &self.dns_server)
            .field("connect_to", &self.connect_to)
            .field("ssh", &self.ssh)
            .field("ca_files", &self.ca_files)
            .field("remote_secrets_dir", &self.remote_secrets_dir)
            .finish()
    }
}

impl Context {
    /// The context for a project: names and the DNS server from the manifests; SSH options
    /// as the engine uses them (`ssh_dir` for shared connections, `known_hosts`); the CA files
    /// of the project's trust set (`crate::pki::trust_files` of the project at `root`: the
    /// project CA, `proxmox.tls.ca_file`, [`ENV_CA_FILE`] or `.nixmox/ca.pem`); the SSH program,
    /// redirects and remote secrets directory from the environment (see the `ENV_*` constants).
    pub fn for_project(
        project: &Project,
        root: &Path,
        ssh_dir: &Path,
        known_hosts: &Path,
    ) -> Result<Context, String> {
        let _ = std::fs::create_dir_all(ssh_dir);
        let options = nixmox_core::deploy::ssh_options(
            &ssh_dir.to_string_lossy(),
            &known_hosts.to_string_lossy(),
            project.ssh.host_key_checking.as_str(),
        );
        let ca_files = crate::pki::trust_files(root, project);
        let connect_to = match std::env::var(ENV_CONNECT_TO) {
            Ok(v) => parse_connect_to(&v).map_err(|e| format!("{ENV_CONNECT_TO}: {e}"))?,
            Err(_) => BTreeMap::new(),
        };
        let ssh = Ssh {
            program: std::env::var(ENV_SSH)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "ssh".into()),
            options: without_connect_timeout(&options),
            user: project.ssh.user.clone(),
        };
        let remote_secrets_dir = std::env::var(ENV_REMOTE_SECRETS_DIR)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_REMOTE_SECRETS_DIR.into());
        Context::new(project, ssh, ca_files, connect_to, remote_secrets_dir)
    }

    /// The context with everything given (tests and benchmarks use this).
    pub fn new(
        project: &Project,
        ssh: Ssh,
        ca_files: Vec<PathBuf>,
        connect_to: BTreeMap<SocketAddrV4, SocketAddrV4>,
        remote_secrets_dir: String,
    ) -> Result<Context, String> {
        let tls = http::tls_config(&ca_files)?;
        Ok(Context {
            names: project_names(project),
            dns_server: project
                .provider(Capability::Dns)
                .map(|d| SocketAddrV4::new(d.host.ip, 53)),
            connect_to,
            ssh,
            tls,
            ca_files,
            remote_secrets_dir,
        })
    }

    /// Where a connection to `ip:port` really goes.
    pub fn route(&self, ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        let want = SocketAddrV4::new(ip, port);
        self.connect_to.get(&want).copied().unwrap_or(want)
    }

    /// The address of a host name (or IPv4 literal): the project's own names first, then the
    /// system resolver (bounded by `timeout`).
    pub fn resolve(&self, host: &str, timeout: Duration) -> Result<Ipv4Addr, String> {
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Ok(ip);
        }
        let key = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ip) = self.names.get(&key) {
            return Ok(*ip);
        }
        system_resolve(&key, timeout)
    }

    /// `ip:port (really:port)` when redirected, else `ip:port`: for messages.
    pub fn describe(&self, ip: Ipv4Addr, port: u16) -> String {
        let to = self.route(ip, port);
        if to == SocketAddrV4::new(ip, port) {
            format!("{ip}:{port}")
        } else {
            format!("{ip}:{port} via {to}")
        }
    }
}

/// Each host's FQDN and hostname, and each proxied domain (→ the reverse proxy's address):
/// what the project's DNS server serves.
pub fn project_names(project: &Project) -> BTreeMap<String, Ipv4Addr> {
    let mut names = BTreeMap::new();
    for s in &project.services {
        names.insert(s.host.hostname.to_string().to_ascii_lowercase(), s.host.ip);
    }
    for (name, ip) in dns_records(project) {
        if let Ok(ip) = ip.parse() {
            names.insert(name.to_ascii_lowercase(), ip);
        }
    }
    names
}

/// Parses `IP:PORT=IP:PORT[,…]` (whitespace also separates entries).
pub fn parse_connect_to(text: &str) -> Result<BTreeMap<SocketAddrV4, SocketAddrV4>, String> {
    let mut out = BTreeMap::new();
    for entry in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
    {
        let (from, to) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not FROM=TO"))?;
        let parse = |s: &str| {
            s.parse::<SocketAddrV4>()
                .map_err(|_| format!("`{s}` in `{entry}` is not an IPv4 address and port"))
        };
        out.insert(parse(from)?, parse(to)?);
    }
    Ok(out)
}

fn without_connect_timeout(options: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < options.len() {
        if options[i] == "-o"
            && options
                .get(i + 1)
                .is_some_and(|o| o.starts_with("ConnectTimeout="))
        {
            i += 2;
            continue;
        }
        out.push(options[i].clone());
        i += 1;
    }
    out
}

/// The system resolver, on a thread so a slow resolver cannot hold a check past its timeout.
fn system_resolve(name: &str, timeout: Duration) -> Result<Ipv4Addr, String> {
    let (tx, rx) = mpsc::channel();
    let owned = name.to_string();
    std::thread::spawn(move || {
        let r = (owned.as_str(), 0u16).to_socket_addrs().map(|addrs| {
            addrs
                .filter_map(|a| match a {
                    SocketAddr::V4(v4) => Some(*v4.ip()),
                    SocketAddr::V6(_) => None,
                })
                .next()
        });
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(Some(ip))) => Ok(ip),
        Ok(Ok(None)) => Err(format!("`{name}` has no IPv4 address")),
        Ok(Err(e)) => Err(format!("`{name}` does not resolve: {e}")),
        Err(_) => Err(format!(
            "`{name}` did not resolve within {}",
            crate::exec::human_duration(timeout)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_to_parses_and_rejects() {
        let m =
            parse_connect_to("127.0.0.1:443=127.0.0.1:8443, 10.0.0.1:53=127.0.0.2:5353").unwrap();
        assert_eq!(
            m.get(&"127.0.0.1:443".parse().unwrap()),
            Some(&"127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(m.len(), 2);
        assert!(parse_connect_to("127.0.0.1:443").is_err());
        assert!(parse_connect_to("host:1=127.0.0.1:2").is_err());
        assert!(parse_connect_to("").unwrap().is_empty());
    }

    #[test]
    fn connect_timeout_is_left_to_each_probe() {
        let o = nixmox_core::deploy::ssh_options("/d", "/k", "accept-new");
        let w = without_connect_timeout(&o);
        assert_eq!(w.len(), o.len() - 2);
        assert!(!w.iter().any(|x| x.starts_with("ConnectTimeout")));
    }

    #[test]
    fn failures_name_the_check_target_expectation_and_answer() {
        let f = Failure {
            check: "readiness tcp".into(),
            target: "db.lan:5432 (10.0.0.2:5432)".into(),
            expected: "a TCP connection".into(),
            got: "connection refused".into(),
        };
        assert_eq!(
            f.to_string(),
            "readiness tcp check on db.lan:5432 (10.0.0.2:5432): expected a TCP connection, got connection refused"
        );
    }
}
