//! Health checks and end-to-end checks against real servers standing in for a project's hosts:
//! Unbound (the DNS provider), PostgreSQL (the database provider), Caddy (the reverse proxy,
//! `tls internal`), OpenSSH's sshd (where command checks and the db check run), and small HTTP
//! servers standing in for the apps and authentik. Each runs on its own loopback address
//! (127.0.0.x; every test has its own block) — PostgreSQL on its real port 5432, the others on
//! free ports that the checks reach through `NIXMOX_CONNECT_TO`-style redirects (`:53`, `:443`,
//! `:80`, `:22` and the apps' ports), so the manifests say what real ones would.
//!
//! Checks of every kind must pass against them, and fail, naming the check, the target, what
//! was expected and what came back, when a service is stopped, a port is closed, a DNS record
//! is wrong, a TLS certificate does not match or is not trusted, or a database role lacks
//! access. A missing tool fails the test with the `scripts/install-tools` argument that
//! installs it; nothing is skipped.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nixmox::health::probe::{HostRef, Kind, Probe, Role};
use nixmox::health::{self, steps, verify, Context, Ssh};
use nixmox_core::model::Check;
use nixmox_core::Project;
use tempfile::TempDir;

use common::{
    as_postgres, check, free_port, init_postgres, postgres_user, repo, tcp_open, tool, Nixmox,
    Server,
};

// ---------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------

fn tmp() -> TempDir {
    common::scratch("health")
}

// ---------------------------------------------------------------------------------------------
// Small HTTP servers standing in for the apps and authentik
// ---------------------------------------------------------------------------------------------

/// A status, extra headers and a body.
type Reply = (u16, Vec<(String, String)>, String);
type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// An HTTP/1.1 server answering each request through `handler(path)`, until dropped.
struct Backend {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(ip: Ipv4Addr, handler: Handler) -> Backend {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    let h = handler.clone();
                    std::thread::spawn(move || {
                        let _ = answer(c, &*h);
                    });
                }
            }
        });
        Backend {
            stop,
            addr,
            thread: Some(thread),
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(
    mut c: TcpStream,
    handler: &(dyn Fn(&str) -> Reply + Send + Sync),
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let (status, headers, body) = handler(&path);
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(
        c,
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}

fn text(status: u16, body: &str) -> Reply {
    (status, Vec::new(), body.to_string())
}

fn redirect(to: &str) -> Reply {
    (302, vec![("Location".into(), to.into())], String::new())
}

// ---------------------------------------------------------------------------------------------
// The lab: a project and its servers
// ---------------------------------------------------------------------------------------------

/// The addresses of one test's hosts: 127.0.0.(base + n).
#[derive(Clone, Copy)]
struct Net {
    base: u8,
}

impl Net {
    fn ip(self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, self.base + n)
    }
    fn dns(self) -> Ipv4Addr {
        self.ip(1)
    }
    fn pg(self) -> Ipv4Addr {
        self.ip(2)
    }
    fn caddy(self) -> Ipv4Addr {
        self.ip(3)
    }
    fn auth(self) -> Ipv4Addr {
        self.ip(4)
    }
    fn app(self) -> Ipv4Addr {
        self.ip(5)
    }
    fn secure(self) -> Ipv4Addr {
        self.ip(6)
    }
    fn other(self) -> Ipv4Addr {
        self.ip(7)
    }
}

fn whoami() -> String {
    check(Command::new("id").arg("-un"), "id -un")
        .trim()
        .to_string()
}

/// Writes the project: the three core services every test has; with `full`, authentik, a
/// forward-auth service (`secure`) and a service whose database role lacks access and whose
/// domain gets a certificate for another name (`other`).
fn write_project(dir: &Path, net: Net, full: bool, marker: &Path) {
    let w = |rel: &str, text: String| {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    };
    w(
        "nixmox.yaml",
        format!(
            "project: lab\ndomain: lab.lan\nnetwork: {{ cidr: 127.0.0.0/24, gateway: 127.0.0.1 }}\n\
             infra: {{ backend: none }}\nssh: {{ user: {} }}\n\
             nix:\n  deployer: {{ command: [\"deploy-test\", \"{{host}}\", \"{{ip}}\", \"{{flake}}\"] }}\n\
             defaults:\n  health: {{ interval: 200ms, timeout: 3s, retries: 2 }}\n",
            whoami()
        ),
    );
    common::use_nix_stubs(dir);
    w(
        "services/dns/manifest.yaml",
        format!(
            "name: dns\nprovides: {{ dns: {{ type: unbound }} }}\nhost: {{ ip: {}, vmid: {} }}\n\
             interface:\n  health:\n    readiness: [ {{ dns: dns.lab.lan, expect: {} }} ]\n",
            net.dns(),
            900 + u32::from(net.base) + 1,
            net.dns()
        ),
    );
    w(
        "services/postgresql/manifest.yaml",
        format!(
            "name: postgresql\nprovides: {{ database: {{ type: postgresql }} }}\nhost: {{ ip: {}, vmid: {} }}\n\
             interface:\n  health:\n    readiness: {{ tcp: \"postgresql.lab.lan:5432\" }}\n",
            net.pg(),
            900 + u32::from(net.base) + 2
        ),
    );
    w(
        "services/caddy/manifest.yaml",
        format!(
            "name: caddy\nprovides: {{ reverse_proxy: {{ type: caddy }} }}\nhost: {{ ip: {}, vmid: {} }}\n\
             interface:\n  health:\n    readiness: [ {{ tcp: \"caddy.lab.lan:443\" }}, {{ tcp: \"caddy.lab.lan:80\" }} ]\n",
            net.caddy(),
            900 + u32::from(net.base) + 3
        ),
    );
    // Only the full lab has app's database and OIDC client: through `up`, they would need the
    // secrets machinery (age recipients, sops), which is not what these tests are about.
    let (db, auth) = if full {
        (
            "  db: { type: postgresql, database: app, role: app }\n",
            "  auth: { oidc: { client_id: app, redirect_uris: [\"https://web.lab.lan/cb\"] } }\n",
        )
    } else {
        ("", "")
    };
    w(
        "services/app/manifest.yaml",
        format!(
            "name: app\nhost: {{ ip: {}, vmid: {} }}\ninterface:\n{db}\
             \x20 proxy: {{ domain: web.lab.lan, upstream: 8080, tls: true }}\n{auth}\
             \x20 health:\n\
             \x20   startup: {{ command: [test, -e, \"{}\"] }}\n\
             \x20   liveness: {{ http: \"http://app.lab.lan:8080/health\", status: 200, body: ok }}\n\
             \x20   readiness: {{ http: \"https://web.lab.lan/\", status: 200 }}\n",
            net.app(),
            900 + u32::from(net.base) + 5,
            marker.display()
        ),
    );
    if full {
        w(
            "services/authentik/manifest.yaml",
            format!(
                "name: authentik\nprovides: {{ identity: {{ type: authentik }} }}\nhost: {{ ip: {}, vmid: {} }}\n\
                 interface:\n  proxy: {{ domain: auth.lab.lan, upstream: 9000, tls: true }}\n",
                net.auth(),
                900 + u32::from(net.base) + 4
            ),
        );
        w(
            "services/secure/manifest.yaml",
            format!(
                "name: secure\nhost: {{ ip: {}, vmid: {} }}\n\
                 interface:\n  proxy: {{ domain: secure.lab.lan, upstream: 8080, tls: true, authz: true }}\n",
                net.secure(),
                900 + u32::from(net.base) + 6
            ),
        );
        w(
            "services/other/manifest.yaml",
            format!(
                "name: other\nhost: {{ ip: {}, vmid: {} }}\n\
                 interface:\n  db: {{ type: postgresql, database: locked, role: locked }}\n\
                 \x20 proxy: {{ domain: wrong.lab.lan, upstream: 8080, tls: true }}\n",
                net.other(),
                900 + u32::from(net.base) + 7
            ),
        );
    }
}

fn load(dir: &Path) -> Project {
    let read = nixmox::project_fs::read_project(dir).expect("the lab project reads");
    let exists = nixmox::project_fs::exists_in(dir);
    let loaded = nixmox_core::load(&read.sources, &exists);
    let errors: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.severity == nixmox_core::Severity::Error)
        .map(|d| format!("{d:?}"))
        .collect();
    assert!(errors.is_empty(), "the lab project is invalid: {errors:#?}");
    loaded.project.expect("a project")
}

/// Everything running for one test.
struct Lab {
    t: TempDir,
    project_dir: PathBuf,
    project: Project,
    connect_to: BTreeMap<SocketAddrV4, SocketAddrV4>,
    /// Caddy's local root plus the test CA (that signed `other.lab.lan`'s certificate).
    ca_bundle: PathBuf,
    ssh_key: PathBuf,
    secrets: PathBuf,
    marker: PathBuf,
    unbound: Server,
    pg: Server,
    caddy: Server,
    _sshd: Server,
    app: Backend,
    _auth: Backend,
    _secure: Backend,
}

impl Lab {
    /// Starts everything. `wrong_dns` overrides records the DNS server serves.
    fn start(net: Net, full: bool, wrong_dns: &[(&str, Ipv4Addr)]) -> Lab {
        let t = tmp();
        let root = t.path().to_path_buf();
        let marker = root.join("app-started");
        fs::write(&marker, "").unwrap();
        let project_dir = root.join("project");
        write_project(&project_dir, net, full, &marker);
        let project = load(&project_dir);
        let mut connect_to = BTreeMap::new();

        // The apps and authentik.
        let app = Backend::start(
            net.app(),
            Arc::new(|path: &str| match path {
                "/health" => text(200, "ok"),
                _ => text(200, "the app"),
            }),
        );
        connect_to.insert(
            SocketAddrV4::new(net.app(), 8080),
            SocketAddrV4::new(net.app(), app.port()),
        );
        let auth = Backend::start(
            net.auth(),
            Arc::new(|path: &str| {
                if path.starts_with("/outpost.goauthentik.io/auth/caddy") {
                    redirect("https://secure.lab.lan/outpost.goauthentik.io/start?rd=%2F")
                } else if path.starts_with("/outpost.goauthentik.io/start") {
                    redirect("https://auth.lab.lan/application/o/authorize/?client_id=secure")
                } else if path == "/application/o/app/.well-known/openid-configuration" {
                    text(
                        200,
                        r#"{"issuer": "https://auth.lab.lan/application/o/app/", "authorization_endpoint": "https://auth.lab.lan/application/o/authorize/"}"#,
                    )
                } else {
                    text(404, "not found")
                }
            }),
        );
        let secure = Backend::start(net.secure(), Arc::new(|_: &str| text(200, "secret")));

        let unbound = start_unbound(&root, net, &project, wrong_dns, &mut connect_to);
        let pg = start_postgres(&root, net);
        let (ca_bundle, caddy) = start_caddy(
            &root,
            net,
            app.port(),
            auth.port(),
            secure.port(),
            &mut connect_to,
        );
        let (ssh_key, sshd) = start_sshd(&root, net, &project, &mut connect_to);

        let secrets = root.join("secrets");
        fs::create_dir_all(secrets.join("db")).unwrap();
        fs::write(secrets.join("db/app"), "pw-app\n").unwrap();
        fs::write(secrets.join("db/locked"), "pw-locked\n").unwrap();

        let mut lab = Lab {
            t,
            project_dir,
            project,
            connect_to,
            ca_bundle,
            ssh_key,
            secrets,
            marker,
            unbound,
            pg,
            caddy,
            _sshd: sshd,
            app,
            _auth: auth,
            _secure: secure,
        };
        // Caddy issues its certificates in the background: wait until web.lab.lan's works.
        let ctx = lab.ctx();
        let probe = lab.http_probe("https://web.lab.lan/", Some(200), None);
        let mut last = String::new();
        lab.caddy
            .wait_until(|| match probe.run(&ctx, Duration::from_secs(2), None) {
                Ok(_) => true,
                Err(f) => {
                    last = f.to_string();
                    false
                }
            });
        let _ = last;
        lab
    }

    fn dir(&self) -> &Path {
        self.t.path()
    }

    fn ssh(&self) -> Ssh {
        let mut options = nixmox_core::deploy::ssh_options(
            &self.dir().join("ssh").to_string_lossy(),
            &self.dir().join("known_hosts").to_string_lossy(),
            "accept-new",
        );
        fs::create_dir_all(self.dir().join("ssh")).unwrap();
        options.retain(|o| !o.starts_with("ConnectTimeout"));
        // `-o` now dangles where ConnectTimeout was: drop a trailing one.
        if options.last().map(String::as_str) == Some("-o") {
            options.pop();
        }
        options.extend([
            "-F".to_string(),
            "/dev/null".into(),
            "-i".into(),
            self.ssh_key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
        ]);
        Ssh {
            program: tool("ssh", "sshd").display().to_string(),
            options,
            user: nixmox_core::ids::SshUser::new(&whoami())
                .expect("the test user is a valid login name"),
        }
    }

    fn ctx_with(&self, ca: Option<&Path>) -> Context {
        Context::new(
            &self.project,
            self.ssh(),
            ca.map(Path::to_path_buf).into_iter().collect(),
            self.connect_to.clone(),
            self.secrets.display().to_string(),
        )
        .expect("a health context")
    }

    fn ctx(&self) -> Context {
        self.ctx_with(Some(&self.ca_bundle))
    }

    fn host(&self, service: &str) -> HostRef {
        verify::host_of(self.project.service(service).unwrap())
    }

    fn probe(&self, role: Role, check: Check) -> Probe {
        Probe::new(role, self.host("app"), Kind::Check(check))
    }

    fn http_probe(&self, url: &str, status: Option<u16>, body: Option<&str>) -> Probe {
        self.probe(
            Role::Readiness,
            Check::Http {
                url: url.into(),
                status,
                body: body.map(str::to_string),
            },
        )
    }

    /// The environment the `nixmox` binary needs to reach the lab.
    fn env(&self) -> Vec<(String, String)> {
        let wrapper = self.dir().join("ssh-wrapper");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} -F /dev/null -i {} -o IdentitiesOnly=yes \"$@\"\n",
                tool("ssh", "sshd").display(),
                self.ssh_key.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        let connect_to: Vec<String> = self
            .connect_to
            .iter()
            .map(|(a, b)| format!("{a}={b}"))
            .collect();
        vec![
            (
                "PATH".into(),
                format!(
                    "{}:{}",
                    repo().join("tests/fixtures/bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            ("NIXMOX_SSH".into(), wrapper.display().to_string()),
            (
                "NIXMOX_CA_FILE".into(),
                self.ca_bundle.display().to_string(),
            ),
            ("NIXMOX_CONNECT_TO".into(), connect_to.join(",")),
            (
                "NIXMOX_REMOTE_SECRETS_DIR".into(),
                self.secrets.display().to_string(),
            ),
            ("NO_COLOR".into(), "1".into()),
        ]
    }

    fn nixmox(&self, args: &[&str]) -> Output {
        Nixmox::new()
            .project(&self.project_dir)
            .envs(self.env())
            .args(args)
            .output()
    }
}

fn start_unbound(
    root: &Path,
    net: Net,
    project: &Project,
    wrong: &[(&str, Ipv4Addr)],
    connect_to: &mut BTreeMap<SocketAddrV4, SocketAddrV4>,
) -> Server {
    let unbound = tool("unbound", "unbound");
    let dir = root.join("unbound");
    fs::create_dir_all(&dir).unwrap();
    let port = free_port(net.dns());
    let mut records = nixmox_core::render::nixos::dns_records(project);
    for (name, ip) in wrong {
        records.insert(name.to_string(), ip.to_string());
    }
    let mut conf = format!(
        "server:\n  interface: {}@{port}\n  do-ip6: no\n  do-daemonize: no\n  use-syslog: no\n  \
         username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  \
         logfile: \"\"\n  verbosity: 1\n  access-control: 127.0.0.0/8 allow\n  \
         local-zone: \"lab.lan.\" static\n",
        net.dns(),
        d = dir.display()
    );
    for (name, ip) in &records {
        conf.push_str(&format!("  local-data: \"{name}. A {ip}\"\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    let file = dir.join("unbound.conf");
    fs::write(&file, &conf).unwrap();
    let mut server = Server::spawn(
        "unbound",
        Command::new(unbound).arg("-d").arg("-c").arg(&file),
        &dir.join("unbound.log"),
        "TERM",
    );
    let addr = SocketAddrV4::new(net.dns(), port);
    server.wait_until(|| {
        health::dns::query(
            addr,
            "dns.lab.lan",
            Instant::now() + Duration::from_millis(300),
        )
        .is_ok()
    });
    connect_to.insert(SocketAddrV4::new(net.dns(), 53), addr);
    server
}

/// PostgreSQL on the database host's address, port 5432 (the db check runs psql on the app's
/// "host", which is this machine, so no redirect applies): role `app` owning database `app`,
/// and role `locked` whose database `locked` refuses it (CONNECT revoked).
fn start_postgres(root: &Path, net: Net) -> Server {
    let postgres = tool("postgres", "postgres");
    let psql = tool("psql", "postgres");
    let user = postgres_user();
    let dir = root.join("pg");
    let (data, sock) = init_postgres(user, &dir);
    let local = if user.is_some() { "peer" } else { "trust" };
    fs::write(
        data.join("pg_hba.conf"),
        format!("local all postgres {local}\nhost all all 127.0.0.0/8 scram-sha-256\n"),
    )
    .unwrap();
    let mut server = Server::spawn(
        "postgres",
        as_postgres(user, &postgres)
            .arg("-D")
            .arg(&data)
            .arg("-c")
            .arg(format!("listen_addresses={}", net.pg()))
            .args(["-c", "port=5432"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sock.display()))
            .args(["-c", "fsync=off", "-c", "logging_collector=off"]),
        &dir.join("postgres.log"),
        "INT",
    );
    let sql = |cmd: &str| {
        let mut c = as_postgres(user, &psql);
        c.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-c", cmd])
        .env("PGHOST", &sock)
        .env("PGPORT", "5432")
        .env("HOME", &dir);
        c
    };
    server.wait_until(|| {
        tcp_open(SocketAddr::from((net.pg(), 5432)))
            && sql("SELECT 1")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
    });
    for stmt in [
        "CREATE ROLE app LOGIN PASSWORD 'pw-app'",
        "CREATE DATABASE app OWNER app",
        "CREATE ROLE locked LOGIN PASSWORD 'pw-locked'",
        "CREATE DATABASE locked",
        "REVOKE CONNECT ON DATABASE locked FROM PUBLIC",
    ] {
        check(&mut sql(stmt), stmt);
    }
    server
}

/// A test CA and a certificate it signed for `other.lab.lan` (served for `wrong.lab.lan`).
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = tool("openssl", "openssl (Debian's openssl package)");
    let p = |n: &str| dir.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    check(
        Command::new(&openssl)
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt"))
            .args(["-days", "2", "-subj", "/CN=nixmox test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
        "openssl (test CA)",
    );
    check(
        Command::new(&openssl)
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(p("other.key"))
            .arg("-out")
            .arg(p("other.csr"))
            .args(["-subj", "/CN=other.lab.lan"]),
        "openssl (certificate request)",
    );
    fs::write(
        p("other.ext"),
        "subjectAltName=DNS:other.lab.lan\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    check(
        Command::new(&openssl)
            .args(["x509", "-req", "-in"])
            .arg(p("other.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .args(["-set_serial", "2", "-days", "2", "-extfile"])
            .arg(p("other.ext"))
            .arg("-out")
            .arg(p("other.crt")),
        "openssl (sign other.lab.lan)",
    );
    (p("ca.crt"), p("other.crt"), p("other.key"))
}

/// Caddy on the proxy host, as NixMox renders it: its `nixmox` authority rooted in a project CA
/// made as `nixmox up` makes it (issue 12, item 6), signing the sites web, auth and secure
/// (forward-auth to the authentik stand-in, with the outpost's own paths routed to it), and
/// `wrong.lab.lan` serving a certificate for another name. Returns the CA bundle checks trust:
/// the project CA's certificate and the test CA of `wrong.lab.lan`.
fn start_caddy(
    root: &Path,
    net: Net,
    app: u16,
    auth: u16,
    secure: u16,
    connect_to: &mut BTreeMap<SocketAddrV4, SocketAddrV4>,
) -> (PathBuf, Server) {
    let caddy = tool("caddy", "caddy");
    let dir = root.join("caddy");
    fs::create_dir_all(&dir).unwrap();
    let (test_ca, other_crt, other_key) = test_ca(&dir);
    let https = free_port(net.caddy());
    let http = free_port(net.caddy());
    let ip = net.caddy();
    let project_ca = nixmox::pki::generate("lab.lan").unwrap();
    let ca_crt = dir.join("project-ca.crt");
    let ca_key = dir.join("project-ca.key");
    fs::write(&ca_crt, &project_ca.cert_pem).unwrap();
    fs::write(&ca_key, &project_ca.key_pem).unwrap();
    let (head, tail) = nixmox_core::render::nixos::caddy_pki_global();
    let pki = format!("{head}{}{tail}", ca_key.display()).replace(
        &format!("/etc/{}", nixmox_core::render::nixos::CA_CERT_ETC),
        &ca_crt.display().to_string(),
    );
    let tls = "tls {\n\t\tissuer internal {\n\t\t\tca nixmox\n\t\t}\n\t}";
    let file = dir.join("Caddyfile");
    fs::write(
        &file,
        format!(
            "{{\n\tadmin off\n\tlocal_certs\n{pki}\thttp_port {http}\n\thttps_port {https}\n\tdefault_bind {ip}\n}}\n\n\
             web.lab.lan {{\n\t{tls}\n\treverse_proxy {app_ip}:{app}\n}}\n\n\
             auth.lab.lan {{\n\t{tls}\n\treverse_proxy {auth_ip}:{auth}\n}}\n\n\
             secure.lab.lan {{\n\t{tls}\n\troute {{\n\t\treverse_proxy /outpost.goauthentik.io/* {auth_ip}:{auth}\n\
             \t\tforward_auth {auth_ip}:{auth} {{\n\t\t\turi /outpost.goauthentik.io/auth/caddy\n\t\t}}\n\
             \t\treverse_proxy {sec_ip}:{secure}\n\t}}\n}}\n\n\
             wrong.lab.lan {{\n\ttls {crt} {key}\n\trespond \"wrong\" 200\n}}\n",
            app_ip = net.app(),
            auth_ip = net.auth(),
            sec_ip = net.secure(),
            crt = other_crt.display(),
            key = other_key.display(),
        ),
    )
    .unwrap();
    let mut server = Server::spawn(
        "caddy",
        Command::new(caddy)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config")),
        &dir.join("caddy.log"),
        "TERM",
    );
    // Caddy makes its intermediate under the root it was given; the https checks, which
    // trust no other CA of Caddy's, show that its sites' certificates chain to that root.
    let intermediate = dir.join("data/caddy/pki/authorities/nixmox/intermediate.crt");
    server.wait_until(|| tcp_open(SocketAddr::from((ip, https))) && intermediate.is_file());
    let bundle = dir.join("ca-bundle.pem");
    let mut pem = fs::read_to_string(&ca_crt).unwrap();
    pem.push_str(&fs::read_to_string(&test_ca).unwrap());
    fs::write(&bundle, pem).unwrap();
    connect_to.insert(SocketAddrV4::new(ip, 443), SocketAddrV4::new(ip, https));
    connect_to.insert(SocketAddrV4::new(ip, 80), SocketAddrV4::new(ip, http));
    (bundle, server)
}

/// sshd on the app's address: every host's port 22 is redirected to it, so command checks and
/// the db check of any service run on this machine, for real, through OpenSSH.
fn start_sshd(
    root: &Path,
    net: Net,
    project: &Project,
    connect_to: &mut BTreeMap<SocketAddrV4, SocketAddrV4>,
) -> (PathBuf, Server) {
    let sshd = tool("sshd", "sshd");
    let keygen = tool("ssh-keygen", "sshd");
    let dir = root.join("sshd");
    fs::create_dir_all(&dir).unwrap();
    let _ = fs::create_dir_all("/run/sshd");
    for key in ["host_ed25519", "client_ed25519"] {
        check(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)),
            "ssh-keygen",
        );
    }
    fs::copy(dir.join("client_ed25519.pub"), dir.join("authorized_keys")).unwrap();
    let port = free_port(net.app());
    let conf = dir.join("sshd_config");
    fs::write(
        &conf,
        format!(
            "ListenAddress {}:{port}\nHostKey {d}/host_ed25519\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n",
            net.app(),
            d = dir.display()
        ),
    )
    .unwrap();
    let mut server = Server::spawn(
        "sshd",
        Command::new(sshd).arg("-D").arg("-e").arg("-f").arg(&conf),
        &dir.join("sshd.log"),
        "TERM",
    );
    server.wait_until(|| tcp_open(SocketAddr::from((net.app(), port))));
    for s in &project.services {
        connect_to.insert(
            SocketAddrV4::new(s.host.ip, 22),
            SocketAddrV4::new(net.app(), port),
        );
    }
    (dir.join("client_ed25519"), server)
}

fn expect_fail(r: Result<String, health::Failure>, what: &str) -> health::Failure {
    match r {
        Ok(ok) => panic!("{what}: the check passed ({ok}), but it should fail"),
        Err(f) => f,
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "`{p}` is not in:\n{text}");
    }
}

const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn checks_of_every_kind_pass_against_real_servers_and_fail_for_the_right_reason() {
    let net = Net { base: 50 };
    // The DNS server has one wrong record: secure.lab.lan points at the service's own host
    // instead of the reverse proxy.
    let mut lab = Lab::start(net, true, &[("secure.lab.lan", net.secure())]);
    let ctx = lab.ctx();
    let run = |p: &Probe| p.run(&ctx, T, None);

    // --- Every kind passes.
    let tcp = lab.probe(
        Role::Readiness,
        Check::Tcp {
            host: "postgresql.lab.lan".into(),
            port: 5432,
        },
    );
    assert_eq!(run(&tcp).unwrap(), "connected");
    let http = lab.http_probe("http://app.lab.lan:8080/health", Some(200), Some("ok"));
    assert_eq!(run(&http).unwrap(), "status 200");
    let https = lab.http_probe("https://web.lab.lan/", None, Some("the app"));
    assert_eq!(run(&https).unwrap(), "status 200");
    let dns = lab.probe(
        Role::Readiness,
        Check::Dns {
            name: "dns.lab.lan".into(),
            expect: Some(net.dns()),
        },
    );
    assert_eq!(run(&dns).unwrap(), format!("dns.lab.lan is {}", net.dns()));
    let command = lab.probe(
        Role::Startup,
        Check::Command(vec![
            "test".into(),
            "-e".into(),
            lab.marker.display().to_string(),
        ]),
    );
    assert_eq!(run(&command).unwrap(), "exit 0");
    // A word with spaces and quotes reaches the remote command as one argument.
    let odd = lab.dir().join("it's a file");
    fs::write(&odd, "").unwrap();
    let quoted = lab.probe(
        Role::Startup,
        Check::Command(vec!["test".into(), "-e".into(), odd.display().to_string()]),
    );
    assert_eq!(run(&quoted).unwrap(), "exit 0");

    // The end-to-end checks of `app`: dns (its FQDN and its proxied domain), proxy, db, auth.
    let app = lab.project.service("app").unwrap().clone();
    let e2e = verify::end_to_end(&lab.project, &app);
    let kinds: Vec<&str> = e2e.iter().map(|p| p.kind_name()).collect();
    assert_eq!(kinds, ["dns", "dns", "proxy", "db", "auth"]);
    for p in &e2e {
        let r = run(p);
        assert!(r.is_ok(), "{}: {r:?}", p.target());
    }
    assert_eq!(run(&e2e[3]).unwrap(), "`app` logged in to `app`");
    assert_eq!(
        run(&e2e[4]).unwrap(),
        "issuer https://auth.lab.lan/application/o/app/"
    );
    // Forward-auth: a request without a session is sent (through the outpost's start URL on
    // the route's own domain) to the identity provider.
    let secure = lab.project.service("secure").unwrap().clone();
    let route = verify::end_to_end(&lab.project, &secure)
        .into_iter()
        .find(|p| p.kind_name() == "proxy")
        .unwrap();
    assert_eq!(
        run(&route).unwrap(),
        "redirected to https://auth.lab.lan/application/o/authorize/?client_id=secure"
    );
    // The gate and verify as the engine runs them.
    let log = lab.dir().join("gate.log");
    let since = Instant::now();
    assert_eq!(
        steps::after_deploy(&ctx, &app, since, None, Some(&log)).unwrap(),
        Some("2 startup/readiness check(s) passed".into())
    );
    assert_eq!(
        steps::verify_service(&ctx, &lab.project, &app, since, None, None).unwrap(),
        "1 liveness check(s) and 5 end-to-end check(s) (dns, proxy, db, auth) passed"
    );
    assert_contains(
        &fs::read_to_string(&log).unwrap(),
        &[
            "[health] startup command check on `test -e",
            "attempt 1: passed: exit 0",
        ],
    );

    // --- A closed port.
    let closed = lab.probe(
        Role::Readiness,
        Check::Tcp {
            host: "caddy.lab.lan".into(),
            port: 9,
        },
    );
    let f = expect_fail(run(&closed), "a closed port");
    assert_eq!(
        f.to_string(),
        format!(
            "readiness tcp check on caddy.lab.lan:9 ({}:9): expected a TCP connection, got connection refused",
            net.caddy()
        )
    );

    // --- A wrong DNS record, seen by a dns check and by the end-to-end dns check.
    let wrong = lab.probe(
        Role::Readiness,
        Check::Dns {
            name: "web.lab.lan".into(),
            expect: Some(Ipv4Addr::new(127, 0, 0, 250)),
        },
    );
    let f = expect_fail(run(&wrong), "a dns check expecting another address");
    assert_contains(
        &f.to_string(),
        &[
            "readiness dns check on web.lab.lan at ",
            "expected 127.0.0.250",
            &format!("got {}", net.caddy()),
        ],
    );
    let record = verify::end_to_end(&lab.project, &secure)
        .into_iter()
        .find(|p| p.target() == "secure.lab.lan")
        .unwrap();
    let f = expect_fail(run(&record), "the end-to-end dns check of a wrong record");
    assert_eq!(f.check, "end-to-end dns");
    assert_eq!(f.expected, net.caddy().to_string());
    assert_eq!(f.got, net.secure().to_string());
    let missing = lab.probe(
        Role::Readiness,
        Check::Dns {
            name: "nope.lab.lan".into(),
            expect: None,
        },
    );
    assert_contains(
        &expect_fail(run(&missing), "an unknown name").got,
        &["NXDOMAIN"],
    );

    // --- TLS: a certificate for another name; a CA that is not trusted.
    let mismatch = lab.http_probe("https://wrong.lab.lan/", None, None);
    let f = expect_fail(run(&mismatch), "a certificate for another name");
    assert_contains(
        &f.got,
        &[
            "TLS",
            "not valid for name",
            "wrong.lab.lan",
            "other.lab.lan",
        ],
    );
    let untrusted = lab.ctx_with(None);
    let f = expect_fail(
        https.run(&untrusted, T, None),
        "a certificate of a CA not trusted",
    );
    assert_contains(&f.got, &["TLS", "UnknownIssuer"]);

    // --- A database role without access, and a failing command.
    let other = lab.project.service("other").unwrap().clone();
    let db = verify::end_to_end(&lab.project, &other)
        .into_iter()
        .find(|p| p.kind_name() == "db")
        .unwrap();
    let f = expect_fail(run(&db), "a role without CONNECT");
    assert_eq!(f.check, "end-to-end db");
    assert_contains(
        &f.to_string(),
        &[
            "database `locked` as `locked`",
            "expected `locked` to log in to `locked`",
            "psql exited with 2",
            "permission denied for database \"locked\"",
        ],
    );
    let failing = lab.probe(
        Role::Startup,
        Check::Command(vec!["test".into(), "-e".into(), "/nonexistent".into()]),
    );
    let f = expect_fail(run(&failing), "a command exiting 1");
    assert_eq!(
        f.to_string(),
        format!(
            "startup command check on `test -e /nonexistent` on app ({}): expected exit status 0, got exit 1: no output",
            net.app()
        )
    );

    // --- An http check's status and body.
    let status = lab.http_probe("http://app.lab.lan:8080/health", Some(204), None);
    assert_contains(
        &expect_fail(run(&status), "another status").to_string(),
        &["expected status 204, got status 200"],
    );
    let body = lab.http_probe("http://app.lab.lan:8080/", None, Some("welcome"));
    assert_contains(
        &expect_fail(run(&body), "another body").got,
        &["status 200 with a body without it", "the app"],
    );

    // --- A stopped app: its own check is refused, the proxy answers 502, the gate gives up
    // after `retries` counted failures.
    lab.app.stop();
    assert_contains(
        &expect_fail(run(&http), "a stopped app").to_string(),
        &[
            "readiness http check on http://app.lab.lan:8080/health",
            "got connection refused",
        ],
    );
    let proxy = e2e.iter().find(|p| p.kind_name() == "proxy").unwrap();
    let f = expect_fail(run(proxy), "a route to a stopped app");
    assert_contains(
        &f.to_string(),
        &[
            "end-to-end proxy check on https://web.lab.lan/ through the reverse proxy",
            "expected an answer that is not a server error (below 500), got status 502",
        ],
    );
    let e = steps::after_deploy(&ctx, &app, Instant::now(), None, None).unwrap_err();
    assert_contains(
        &e,
        &[
            "readiness http check on https://web.lab.lan/",
            "got status 502",
            "unhealthy after 2 consecutive failure(s); 2 attempt(s)",
        ],
    );

    // --- Stopped servers: PostgreSQL, Unbound, Caddy.
    lab.pg.stop();
    assert_contains(
        &expect_fail(run(&tcp), "a stopped PostgreSQL").got,
        &["connection refused"],
    );
    let db_app = &e2e[3];
    assert_contains(
        &expect_fail(run(db_app), "the db check with PostgreSQL stopped").got,
        &["psql exited with 2", "Connection refused"],
    );
    lab.unbound.stop();
    let f = expect_fail(run(&dns), "a stopped DNS server");
    assert!(
        f.got == "port unreachable (nothing listens)" || f.got == "no answer in time",
        "{f}"
    );
    lab.caddy.stop();
    assert_contains(
        &expect_fail(run(&https), "a stopped reverse proxy").got,
        &["connection refused"],
    );
    // And a host whose SSH port is closed (OpenSSH keeps a shared connection open after its
    // server stops listening, so the closed port is another one): the command check says so.
    let mut no_ssh = lab.ctx();
    no_ssh.connect_to.insert(
        SocketAddrV4::new(net.app(), 22),
        SocketAddrV4::new(net.app(), 9),
    );
    assert_contains(
        &expect_fail(command.run(&no_ssh, T, None), "a closed SSH port").got,
        &[
            "no connection over SSH (ssh exited with 255)",
            "Connection refused",
        ],
    );
}

#[test]
fn gates_hold_back_dependents_and_verify_runs_end_to_end_checks_through_up_and_ps() {
    let net = Net { base: 70 };
    let mut lab = Lab::start(net, false, &[]);

    let out = lab.nixmox(&["up"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "up failed:\n{stderr}");
    assert_contains(
        &stderr,
        &[
            "nix:core:postgresql",
            "1 startup/readiness check(s) passed",
            "nix:core:caddy",
            "2 startup/readiness check(s) passed",
            "verify:app",
            "1 liveness check(s) and 3 end-to-end check(s) (dns, proxy) passed",
        ],
    );
    let logs = lab.nixmox(&["logs", "verify:app"]);
    assert_contains(
        &String::from_utf8_lossy(&logs.stdout),
        &[
            "[health] end-to-end proxy check on https://web.lab.lan/",
            "passed: status 200",
        ],
    );

    // ps: every service healthy, deployed by the run just made.
    let ps = lab.nixmox(&["ps", "--format", "json"]);
    assert!(
        ps.status.success(),
        "{}",
        String::from_utf8_lossy(&ps.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let rows = v["services"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert_eq!(r["health"], "healthy", "{r:#}");
        assert_eq!(r["state"], "running", "{r:#}");
        assert_eq!(r["last_deploy"]["result"], "succeeded", "{r:#}");
        assert_eq!(r["last_deploy"]["run"], 1, "{r:#}");
    }
    let app = rows.iter().find(|r| r["name"] == "app").unwrap();
    assert_eq!(app["ip"], net.app().to_string());
    assert_eq!(app["vmid"], 900 + 70 + 5);
    assert_eq!(app["last_deploy"]["step"], "nix:service-config:app");
    assert_eq!(app["checks"].as_array().unwrap().len(), 2);

    // PostgreSQL down: its gate fails after its retries, naming the check, and nothing that
    // depends on it runs.
    lab.pg.stop();
    let out = lab.nixmox(&["up", "--force-step", "nix:core:postgresql"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(
        &stderr,
        &[&format!(
            "nix:core:postgresql: health gate failed: readiness tcp check on postgresql.lab.lan:5432 ({}:5432): expected a TCP connection, got connection refused (unhealthy after 2 consecutive failure(s)",
            net.pg()
        )],
    );
    // ps tells the truth: postgresql unhealthy, its last deploy failed; the table names the
    // failing check.
    let ps = lab.nixmox(&["ps"]);
    let table = String::from_utf8_lossy(&ps.stdout).into_owned();
    assert!(ps.status.success(), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("postgresql "))
        .unwrap_or_else(|| panic!("{table}"));
    assert_contains(
        line,
        &["deploy failed", "unhealthy (0/1)", "failed (run 2)"],
    );
    assert_contains(
        &table,
        &[
            "STATE (LAST KNOWN)",
            "Failing checks:",
            "postgresql: readiness tcp check on postgresql.lab.lan:5432",
        ],
    );
    let line = table.lines().find(|l| l.starts_with("dns ")).unwrap();
    assert_contains(line, &["running", "healthy (1/1)", "succeeded (run 1)"]);
}
