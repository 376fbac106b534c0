//! One check, run once, bounded by a timeout.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nixmox_core::deploy;
use nixmox_core::model::Check;
use nixmox_core::providers::{self, Login};

use super::http::{self, Request};
use super::{dns, Context, Failure};
use crate::exec::{self, Cmd, ExecError, RunOpts};

/// Which list a check came from, or `end-to-end` for the checks derived from the manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Startup,
    Liveness,
    Readiness,
    EndToEnd,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Startup => "startup",
            Role::Liveness => "liveness",
            Role::Readiness => "readiness",
            Role::EndToEnd => "end-to-end",
        }
    }
}

/// The host a check belongs to (a command check runs there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRef {
    pub hostname: String,
    pub ip: Ipv4Addr,
}

/// What to check.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A manifest's check.
    Check(Check),
    /// The DNS server answers `name` with `expect`.
    DnsRecord { name: String, expect: Ipv4Addr },
    /// A proxy route answers through the reverse proxy at `via`: non-5xx, or, with `idp`, a
    /// redirect (followed on the route's own domain) to the identity provider's domain.
    Route {
        https: bool,
        domain: String,
        path: String,
        via: Ipv4Addr,
        idp: Option<String>,
    },
    /// The service's role logs in to its database, from the service's host (over SSH), with
    /// the password sops-nix put at `<remote secrets dir>/<secret>`, by the database
    /// implementation's script (`nixmox_core::providers::Login`).
    Db(Login),
    /// The OIDC discovery document answers and names `issuer`.
    Oidc { issuer: String },
}

/// A check with what it needs to run: its role and the host it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub role: Role,
    pub host: HostRef,
    pub kind: Kind,
}

/// How long a probe may take at least (a zero timeout would fail every check).
const MIN_TIMEOUT: Duration = Duration::from_millis(50);
/// At most this much of a command's output goes into a message.
const TAIL: usize = 300;

impl Probe {
    pub fn new(role: Role, host: HostRef, kind: Kind) -> Probe {
        Probe { role, host, kind }
    }

    /// `command`, `http`, `tcp`, `dns`, or the end-to-end kind (`dns`, `proxy`, `db`, `auth`).
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Check(Check::Command(_)) => "command",
            Kind::Check(Check::Http { .. }) => "http",
            Kind::Check(Check::Tcp { .. }) => "tcp",
            Kind::Check(Check::Dns { .. }) | Kind::DnsRecord { .. } => "dns",
            Kind::Route { .. } => "proxy",
            Kind::Db { .. } => "db",
            Kind::Oidc { .. } => "auth",
        }
    }

    /// `readiness tcp`, `end-to-end proxy`.
    pub fn check_name(&self) -> String {
        format!("{} {}", self.role.as_str(), self.kind_name())
    }

    /// What the check looks at, before resolving anything: `postgresql.lan:5432`,
    /// `` `systemctl is-active caddy` on caddy (10.0.0.3)``.
    pub fn target(&self) -> String {
        match &self.kind {
            Kind::Check(Check::Command(argv)) => format!(
                "`{}` on {} ({})",
                argv.iter()
                    .map(|w| deploy::shell_quote(w))
                    .collect::<Vec<_>>()
                    .join(" "),
                self.host.hostname,
                self.host.ip
            ),
            Kind::Check(Check::Http { url, .. }) => url.clone(),
            Kind::Check(Check::Tcp { host, port }) => format!("{host}:{port}"),
            Kind::Check(Check::Dns { name, .. }) | Kind::DnsRecord { name, .. } => name.clone(),
            Kind::Route {
                https,
                domain,
                path,
                ..
            } => format!("{}://{domain}{path}", if *https { "https" } else { "http" }),
            Kind::Db(Login {
                server,
                port,
                database,
                role,
                ..
            }) => format!(
                "database `{database}` as `{role}` at {server}:{port} from {} ({})",
                self.host.hostname, self.host.ip
            ),
            Kind::Oidc { issuer } => format!("{issuer}.well-known/openid-configuration"),
        }
    }

    /// Runs the check once. `Ok` carries a short note of what was seen; a command's output
    /// goes to `log` when given.
    pub fn run(
        &self,
        ctx: &Context,
        timeout: Duration,
        log: Option<&Path>,
    ) -> Result<String, Failure> {
        let timeout = timeout.max(MIN_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let fail =
            |target: String, expected: &str, got: String| self.failure(target, expected, got);
        match &self.kind {
            Kind::Check(Check::Command(argv)) => self
                .ssh(ctx, argv, timeout, log)
                .map_err(|got| fail(self.target(), "exit status 0", got)),
            Kind::Check(Check::Tcp { host, port }) => {
                let ip = ctx
                    .resolve(host, timeout)
                    .map_err(|got| fail(self.target(), "a TCP connection", got))?;
                let target = format!("{host}:{port} ({})", ctx.describe(ip, *port));
                tcp_connect(ctx, ip, *port, deadline)
                    .map(|()| "connected".to_string())
                    .map_err(|got| fail(target, "a TCP connection", got.to_string()))
            }
            Kind::Check(Check::Http { url, status, body }) => {
                self.http(ctx, url, *status, body.as_deref(), deadline, timeout)
            }
            Kind::Check(Check::Dns { name, expect }) => {
                self.dns_check(ctx, name, *expect, deadline, timeout)
            }
            Kind::DnsRecord { name, expect } => {
                let expected = expect.to_string();
                let seen = self
                    .dns(ctx, name, deadline, timeout)
                    .map_err(|e| fail(format!("{name} at {}", e.server), &expected, e.got))?;
                if seen.answer.rcode == 0 && seen.answer.addrs == [*expect] {
                    Ok(format!("{name} is {expect}"))
                } else {
                    Err(fail(
                        format!("{name} at {}", seen.server),
                        &expected,
                        seen.answer.describe(),
                    ))
                }
            }
            Kind::Route {
                https,
                domain,
                path,
                via,
                idp,
            } => self.route(ctx, *https, domain, path, *via, idp.as_deref(), deadline),
            Kind::Db(login) => self.db(ctx, login, timeout, log),
            Kind::Oidc { issuer } => self.oidc(ctx, issuer, deadline, timeout),
        }
    }

    fn failure(&self, target: String, expected: &str, got: String) -> Failure {
        Failure {
            check: self.check_name(),
            target,
            expected: expected.to_string(),
            got,
        }
    }

    /// A manifest's `http` check: the status (2xx or 3xx unless given) and the body.
    fn http(
        &self,
        ctx: &Context,
        url: &str,
        status: Option<u16>,
        body: Option<&str>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, Failure> {
        let expected = match (status, body) {
            (Some(s), Some(b)) => format!("status {s} and a body containing {b:?}"),
            (Some(s), None) => format!("status {s}"),
            (None, Some(b)) => format!("a 2xx or 3xx status and a body containing {b:?}"),
            (None, None) => "a 2xx or 3xx status".to_string(),
        };
        let fail = |target: String, got: String| self.failure(target, &expected, got);
        let (https, host, port, path) =
            http::parse_url(url).map_err(|got| fail(url.to_string(), got))?;
        let ip = ctx
            .resolve(&host, timeout)
            .map_err(|got| fail(url.to_string(), got))?;
        let target = format!("{url} ({})", ctx.describe(ip, port));
        let req = Request {
            https,
            host: &host,
            port,
            path: &path,
            ip,
        };
        let r = http::get(ctx, &req, deadline).map_err(|got| fail(target.clone(), got))?;
        let status_ok = match status {
            Some(s) => r.status == s,
            None => (200..400).contains(&r.status),
        };
        if !status_ok {
            return Err(fail(target, format!("status {}", r.status)));
        }
        if let Some(b) = body {
            let text = r.body_text();
            if !text.contains(b) {
                return Err(fail(
                    target,
                    format!(
                        "status {} with a body without it (it starts {:?})",
                        r.status,
                        snippet(&text, 120)
                    ),
                ));
            }
        }
        Ok(format!("status {}", r.status))
    }

    /// A manifest's `dns` check: `name` resolves (to `expect`, when given).
    fn dns_check(
        &self,
        ctx: &Context,
        name: &str,
        expect: Option<Ipv4Addr>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, Failure> {
        let expected = match expect {
            Some(ip) => format!("{ip}"),
            None => "an address".to_string(),
        };
        let seen = self
            .dns(ctx, name, deadline, timeout)
            .map_err(|e| self.failure(format!("{name} at {}", e.server), &expected, e.got))?;
        let target = format!("{name} at {}", seen.server);
        let answer = seen.answer;
        match expect {
            Some(ip) if answer.rcode == 0 && answer.addrs.contains(&ip) => {
                Ok(format!("{name} is {ip}"))
            }
            None if answer.rcode == 0 && !answer.addrs.is_empty() => {
                Ok(format!("{name} is {}", answer.describe()))
            }
            _ => Err(self.failure(target, &expected, answer.describe())),
        }
    }

    /// Runs `remote` on the probe's host over SSH. `Err` is what came back instead of exit 0.
    fn ssh(
        &self,
        ctx: &Context,
        remote: &[String],
        timeout: Duration,
        log: Option<&Path>,
    ) -> Result<String, String> {
        let fin = ssh_run(ctx, &self.host, remote, timeout, log).map_err(|e| e.to_string())?;
        match fin.code {
            Some(0) => Ok("exit 0".into()),
            Some(255) => Err(format!(
                "no connection over SSH (ssh exited with 255): {}",
                tail(&fin.stderr, &fin.stdout)
            )),
            Some(127) => Err(format!(
                "exit 127, the command was not found on the host: {}",
                tail(&fin.stderr, &fin.stdout)
            )),
            Some(c) => Err(format!("exit {c}: {}", tail(&fin.stderr, &fin.stdout))),
            None => Err(format!(
                "killed by signal {}",
                fin.signal.map(|s| s.to_string()).unwrap_or_default()
            )),
        }
    }

    /// Queries the project's DNS server (else the system resolver) for `name`.
    fn dns(
        &self,
        ctx: &Context,
        name: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<DnsSeen, DnsFailure> {
        match ctx.dns_server {
            Some(server) => {
                let to = ctx.route(*server.ip(), server.port());
                let shown = ctx.describe(*server.ip(), server.port());
                match dns::query(to, name, deadline) {
                    Ok(answer) => Ok(DnsSeen {
                        answer,
                        server: shown,
                    }),
                    Err(got) => Err(DnsFailure { server: shown, got }),
                }
            }
            None => {
                let shown = "the system resolver (the project has no DNS provider)".to_string();
                match super::system_resolve(name, timeout) {
                    Ok(ip) => Ok(DnsSeen {
                        answer: dns::Answer {
                            rcode: 0,
                            addrs: vec![ip],
                        },
                        server: shown,
                    }),
                    Err(got) => Err(DnsFailure { server: shown, got }),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        ctx: &Context,
        https: bool,
        domain: &str,
        path: &str,
        via: Ipv4Addr,
        idp: Option<&str>,
        deadline: Instant,
    ) -> Result<String, Failure> {
        let port = if https { 443 } else { 80 };
        let target = format!(
            "{}://{domain}{path} through the reverse proxy ({})",
            if https { "https" } else { "http" },
            ctx.describe(via, port)
        );
        let expected = match idp {
            Some(d) => {
                format!("a redirect to the identity provider ({d}) for a request without a session")
            }
            None => "an answer that is not a server error (below 500)".to_string(),
        };
        let fail = |got: String| Failure {
            check: self.check_name(),
            target: target.clone(),
            expected: expected.clone(),
            got,
        };
        let (mut https, mut host, mut port, mut path) =
            (https, domain.to_string(), port, path.to_string());
        let mut ip = via;
        let mut hops = Vec::new();
        for _ in 0..6 {
            let req = Request {
                https,
                host: &host,
                port,
                path: &path,
                ip,
            };
            let r = http::get(ctx, &req, deadline).map_err(|got| {
                if hops.is_empty() {
                    fail(got)
                } else {
                    fail(format!("{got} after {}", hops.join(" → ")))
                }
            })?;
            let Some(idp) = idp else {
                return if r.status < 500 {
                    Ok(format!("status {}", r.status))
                } else {
                    Err(fail(format!("status {}", r.status)))
                };
            };
            let location = r.header("location").map(str::to_string);
            let (true, Some(loc)) = ((300..400).contains(&r.status), location) else {
                let mut got = format!("status {}", r.status);
                if !hops.is_empty() {
                    got.push_str(&format!(" after {}", hops.join(" → ")));
                }
                return Err(fail(got));
            };
            hops.push(format!("{} {loc}", r.status));
            // The next URL: absolute, or relative to this one.
            let next = if loc.starts_with("http://") || loc.starts_with("https://") {
                loc.clone()
            } else if loc.starts_with('/') {
                let scheme = if https { "https" } else { "http" };
                let default = if https { 443 } else { 80 };
                if port == default {
                    format!("{scheme}://{host}{loc}")
                } else {
                    format!("{scheme}://{host}:{port}{loc}")
                }
            } else {
                return Err(fail(format!(
                    "a redirect to `{loc}`, which this check cannot follow"
                )));
            };
            let (h2, host2, port2, path2) =
                http::parse_url(&next).map_err(|e| fail(format!("a redirect to `{loc}` ({e})")))?;
            if host2.eq_ignore_ascii_case(idp) {
                return Ok(format!("redirected to {next}"));
            }
            if !host2.eq_ignore_ascii_case(domain) {
                return Err(fail(format!(
                    "a redirect to {next}, not to the identity provider"
                )));
            }
            // Same domain (an outpost's start URL): follow it through the proxy.
            https = h2;
            host = host2;
            port = port2;
            path = path2;
            ip = via;
        }
        Err(fail(format!("too many redirects: {}", hops.join(" → "))))
    }

    /// The database implementation's login script, run on the probe's host over SSH.
    fn db(
        &self,
        ctx: &Context,
        login: &Login,
        timeout: Duration,
        log: Option<&Path>,
    ) -> Result<String, Failure> {
        let Login {
            server,
            port,
            database,
            role,
            secret,
            client,
            ..
        } = login;
        let secret_path = format!("{}/{secret}", ctx.remote_secrets_dir.trim_end_matches('/'));
        let remote = login_argv(login, &secret_path, timeout);
        let expected =
            format!("`{role}` to log in to `{database}` with its password ({secret_path})");
        let fail = |got: String| self.failure(self.target(), &expected, got);
        let fin =
            ssh_run(ctx, &self.host, &remote, timeout, log).map_err(|e| fail(e.to_string()))?;
        let out = tail(&fin.stderr, &fin.stdout);
        match fin.code {
            Some(0) if fin.stdout.contains(login.no_client) => Ok(format!(
                "port {port} of {server} is reachable from {} ({client} is not installed there, so the role's access was not tested)",
                self.host.hostname
            )),
            Some(0) => Ok(format!("`{role}` logged in to `{database}`")),
            Some(3) => Err(fail(format!("the password file cannot be read: {out}"))),
            Some(5) => Err(fail(format!(
                "no connection to {server}:{port} from {} ({client} is not installed there to say more)",
                self.host.hostname
            ))),
            Some(255) => Err(fail(format!(
                "no connection over SSH (ssh exited with 255): {out}"
            ))),
            Some(c) => Err(fail(format!("{client} exited with {c}: {out}"))),
            None => Err(fail(format!("{client} was killed by a signal"))),
        }
    }

    fn oidc(
        &self,
        ctx: &Context,
        issuer: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, Failure> {
        let url = format!("{issuer}.well-known/openid-configuration");
        let expected = format!("status 200 and a JSON document whose `issuer` is {issuer}");
        let fail = |target: String, got: String| Failure {
            check: self.check_name(),
            target,
            expected: expected.clone(),
            got,
        };
        let (https, host, port, path) = http::parse_url(&url).map_err(|e| fail(url.clone(), e))?;
        let ip = ctx
            .resolve(&host, timeout)
            .map_err(|e| fail(url.clone(), e))?;
        let target = format!("{url} ({})", ctx.describe(ip, port));
        let req = Request {
            https,
            host: &host,
            port,
            path: &path,
            ip,
        };
        let r = http::get(ctx, &req, deadline).map_err(|e| fail(target.clone(), e))?;
        if r.status != 200 {
            return Err(fail(target, format!("status {}", r.status)));
        }
        let doc: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| {
            fail(
                target.clone(),
                format!(
                    "a body that is not JSON ({e}): {:?}",
                    snippet(&r.body_text(), 80)
                ),
            )
        })?;
        match doc.get("issuer").and_then(|v| v.as_str()) {
            Some(i) if i == issuer => Ok(format!("issuer {i}")),
            Some(i) => Err(fail(target, format!("issuer {i}"))),
            None => Err(fail(target, "a document without `issuer`".into())),
        }
    }
}

/// What a DNS query saw, and the server that answered.
#[derive(Debug)]
struct DnsSeen {
    answer: dns::Answer,
    server: String,
}

/// A DNS query that got no answer: the server asked and what came back instead.
#[derive(Debug)]
struct DnsFailure {
    server: String,
    got: String,
}

/// The remote command line of a database login check: `bash -c <script>` with the arguments
/// the script's contract names (`nixmox_core::providers::Login`).
fn login_argv(login: &Login, secret_path: &str, timeout: Duration) -> Vec<String> {
    let secs = timeout.as_secs().max(1).to_string();
    [
        "bash",
        "-c",
        login.script,
        "nixmox-db-check",
        secret_path,
        &login.server.to_string(),
        &login.port.to_string(),
        &login.role,
        &login.database,
        &secs,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The probe kind of an end-to-end check an implementation derived.
impl From<providers::Probe> for Kind {
    fn from(p: providers::Probe) -> Kind {
        match p {
            providers::Probe::DnsRecord { name, expect } => Kind::DnsRecord { name, expect },
            providers::Probe::Route {
                https,
                domain,
                path,
                via,
                idp,
            } => Kind::Route {
                https,
                domain,
                path,
                via,
                idp,
            },
            providers::Probe::Login(login) => Kind::Db(login),
            providers::Probe::Oidc { issuer } => Kind::Oidc { issuer },
        }
    }
}

/// Why ssh could not even run a remote command.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("no result within {} (stopped)", exec::human_duration(*.timeout))]
    TimedOut { timeout: Duration },
    #[error(
        "`{program}` is not installed here (set {} to another SSH program)",
        super::ENV_SSH
    )]
    NotFound { program: String },
    #[error(transparent)]
    Exec(ExecError),
}

/// Why a TCP connection was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The check's deadline had passed before the attempt.
    #[error("no answer in time")]
    NoTimeLeft,
    #[error("{}", http::io_text(.0, "connect"))]
    Io(#[source] std::io::Error),
}

/// Runs `remote` on `host` over SSH, bounded by `timeout`. `Err` when ssh could not even run.
fn ssh_run(
    ctx: &Context,
    host: &HostRef,
    remote: &[String],
    timeout: Duration,
    log: Option<&Path>,
) -> Result<exec::Finished, SshError> {
    let to = ctx.route(host.ip, 22);
    let mut options = ctx.ssh.options.clone();
    options.push("-o".into());
    options.push(format!("ConnectTimeout={}", timeout.as_secs().max(1)));
    if to.port() != 22 {
        options.push("-p".into());
        options.push(to.port().to_string());
    }
    let mut argv = deploy::ssh_argv(&options, &ctx.ssh.user, *to.ip(), remote);
    argv[0] = ctx.ssh.program.clone();
    let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
    let opts = RunOpts {
        timeout: Some(timeout),
        log: log.map(Path::to_path_buf),
        grace: Some(Duration::from_millis(500)),
        ..RunOpts::default()
    };
    exec::run(&cmd, &opts).map_err(|e| match e {
        ExecError::TimedOut { .. } => SshError::TimedOut { timeout },
        ExecError::NotFound { program } => SshError::NotFound { program },
        other => SshError::Exec(other),
    })
}

fn tcp_connect(
    ctx: &Context,
    ip: Ipv4Addr,
    port: u16,
    deadline: Instant,
) -> Result<(), ConnectError> {
    let to: SocketAddrV4 = ctx.route(ip, port);
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ConnectError::NoTimeLeft);
    }
    TcpStream::connect_timeout(&SocketAddr::V4(to), left)
        .map(drop)
        .map_err(ConnectError::Io)
}

/// The last lines of stderr (else stdout), one line, at most [`TAIL`] characters.
fn tail(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "no output".into();
    }
    let joined = lines[lines.len().saturating_sub(3)..].join(" | ");
    snippet(&joined, TAIL)
}

fn snippet(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_quote_commands_and_name_the_host() {
        let p = Probe::new(
            Role::Startup,
            HostRef {
                hostname: "caddy".into(),
                ip: Ipv4Addr::new(10, 0, 0, 3),
            },
            Kind::Check(Check::Command(vec![
                "systemctl".into(),
                "is-active".into(),
                "a b".into(),
            ])),
        );
        assert_eq!(p.check_name(), "startup command");
        assert_eq!(
            p.target(),
            "`systemctl is-active 'a b'` on caddy (10.0.0.3)"
        );
    }

    #[test]
    fn tails_are_short_and_one_line() {
        assert_eq!(tail("", "a\n\nb\n"), "a | b");
        assert_eq!(tail("e1\ne2\ne3\ne4", "out"), "e2 | e3 | e4");
        assert_eq!(tail("", ""), "no output");
        assert!(tail(&"x".repeat(1000), "").chars().count() <= TAIL + 1);
    }
}
