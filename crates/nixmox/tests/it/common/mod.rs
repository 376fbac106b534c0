//! The harness shared by the integration tests: `Nixmox`, the one builder that starts the
//! binary (from inside the project directory, as a user works; a run that hangs fails the test),
//! the `Lab` that runs `nixmox` against the
//! Terraform test project (Terraform 1.0.3 with the null provider, offline, from `.tools/`, and
//! the test deployer `tests/fixtures/bin/deploy-test`), and the helpers for tests that start
//! real programs (finding a tool, running a command, a server stopped when dropped).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn real_terraform() -> PathBuf {
    let p = repo().join(".tools/bin/terraform");
    assert!(
        p.exists(),
        "Terraform 1.0.3 is required: run `scripts/install-tools terraform` (scripts/test does it)"
    );
    assert!(
        repo().join(".tools/terraformrc").exists(),
        "the offline provider mirror is missing: run `scripts/install-tools terraform`"
    );
    p
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Gives a test project the stand-ins for the flake's inputs (`tests/fixtures/nix-stubs`,
/// copied into the project) as `nix.inputs` overrides, so `up` locks them offline with the real
/// `nix flake lock`.
pub fn use_nix_stubs(project: &Path) {
    copy_dir(
        &repo().join("tests/fixtures/nix-stubs"),
        &project.join("nix-stubs"),
    );
    let inputs = "  inputs: { nixpkgs: \"path:./nix-stubs/nixpkgs\", sops-nix: \"path:./nix-stubs/sops-nix\", authentik-nix: \"path:./nix-stubs/authentik-nix\" }\n";
    let yaml = project.join("nixmox.yaml");
    let text = fs::read_to_string(&yaml).unwrap();
    // `nix.nixpkgs` (the older spelling) gives way to the stand-in.
    let text: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("nixpkgs:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = if let Some(at) = text.find("\nnix:\n") {
        let at = at + "\nnix:\n".len();
        format!("{}{inputs}{}", &text[..at], &text[at..])
    } else {
        assert!(
            !text.contains("\nnix:"),
            "use_nix_stubs: write `nix:` in block style"
        );
        format!("{text}\nnix:\n{inputs}")
    };
    fs::write(&yaml, text).unwrap();
}

/// A copy of the Terraform test project with its own bin dir, log and environment.
pub struct Lab {
    _tmp: tempfile::TempDir,
    pub project: PathBuf,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Lab {
    pub fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("project");
        copy_dir(&repo().join("tests/fixtures/tf-project"), &project);
        use_nix_stubs(&project);
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = tmp.path().join("invocations.log");
        std::fs::write(&log, "").unwrap();
        // Terraform wrapped so the tests see every invocation.
        let wrapper = bin.join("terraform");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"terraform $1\" >> \"$NIXMOX_TEST_LOG\"\nexec {} \"$@\"\n",
                real_terraform().display()
            ),
        )
        .unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&wrapper)
            .status()
            .unwrap();
        // Nix wrapped the same way (`nix flake lock` when the flake's inputs are locked).
        let nix = tool("nix", "nix");
        let nix_wrapper = bin.join("nix");
        std::fs::write(
            &nix_wrapper,
            format!(
                "#!/bin/sh\necho \"nix $3 $4\" >> \"$NIXMOX_TEST_LOG\"\nexec {} \"$@\"\n",
                nix.display()
            ),
        )
        .unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&nix_wrapper)
            .status()
            .unwrap();
        let path = format!(
            "{}:{}:{}",
            bin.display(),
            repo().join("tests/fixtures/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = vec![
            ("PATH".into(), path),
            ("NIXMOX_TEST_LOG".into(), log.display().to_string()),
            (
                "TF_CLI_CONFIG_FILE".into(),
                repo().join(".tools/terraformrc").display().to_string(),
            ),
            ("NO_COLOR".into(), "1".into()),
            // The hosts do not exist: health checks' commands run here (see the fixture).
            (
                "NIXMOX_SSH".into(),
                repo()
                    .join("tests/fixtures/bin/ssh-test")
                    .display()
                    .to_string(),
            ),
        ];
        Lab {
            _tmp: tmp,
            project,
            log,
            env,
        }
    }

    /// `nixmox ARGS` from inside the project directory, with relative paths (issue 11), and
    /// the lab's environment plus `extra`.
    pub fn nixmox(&self, args: &[&str], extra: &[(&str, &str)]) -> Nixmox {
        Nixmox::new()
            .project(&self.project)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied())
            .args(args)
    }

    pub fn cmd(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        self.nixmox(args, extra).command()
    }

    pub fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.nixmox(args, extra).output()
    }

    /// `nixmox -C project ARGS` from the project's parent directory: a relative `-C`, as in
    /// the README's `nixmox -C examples/homelab ...`.
    pub fn run_relative(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.nixmox(&[], extra)
            .cwd(self.project.parent().unwrap())
            .arg("-C")
            .arg(self.project.file_name().unwrap())
            .args(args)
            .output()
    }

    /// Every Terraform state file under `dir`, recursively.
    pub fn state_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return out;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(Lab::state_files(&p));
            } else if p.file_name().is_some_and(|n| n == "terraform.tfstate") {
                out.push(p);
            }
        }
        out
    }

    /// The ids of the resources in the project's Terraform states, by address
    /// (`module.bucket.null_resource.bucket[0]`).
    pub fn resource_ids(&self) -> std::collections::BTreeMap<String, String> {
        let mut ids = std::collections::BTreeMap::new();
        for file in Lab::state_files(&self.project.join(".nixmox/terraform")) {
            let state: serde_json::Value =
                serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
            for r in state["resources"].as_array().into_iter().flatten() {
                let mut addr = String::new();
                if let Some(m) = r["module"].as_str() {
                    addr.push_str(m);
                    addr.push('.');
                }
                addr.push_str(&format!(
                    "{}.{}",
                    r["type"].as_str().unwrap(),
                    r["name"].as_str().unwrap()
                ));
                for inst in r["instances"].as_array().into_iter().flatten() {
                    let key = match &inst["index_key"] {
                        serde_json::Value::Null => String::new(),
                        k => format!("[{k}]"),
                    };
                    ids.insert(
                        format!("{addr}{key}"),
                        inst["attributes"]["id"].as_str().unwrap_or("").to_string(),
                    );
                }
            }
        }
        ids
    }

    /// `nixmox ARGS` from inside the project on a terminal: a pseudo-terminal made by
    /// `script(1)` (util-linux), whose input is `typed`. The terminal's output (stdout and
    /// stderr together) comes back as stdout; the exit code is nixmox's (`script -e`).
    pub fn on_terminal(&self, args: &[&str], typed: &str) -> Output {
        use std::io::Write;
        let quote = |w: &str| format!("'{}'", w.replace('\'', r"'\''"));
        let mut line = quote(env!("CARGO_BIN_EXE_nixmox"));
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let script = tool("script", "util-linux");
        let mut c = Command::new(script);
        c.current_dir(&self.project)
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("script(1) from util-linux runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(typed.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    pub fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> Child {
        self.cmd(args, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn clear(&self) {
        std::fs::write(&self.log, "").unwrap();
    }

    pub fn history(&self) -> serde_json::Value {
        let out = self.run(&["history", "--format", "json"], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

// ---- the one way the tests start `nixmox` ----

/// How long any one `nixmox` run may take before the test fails instead of hanging (a FIFO
/// opened for reading, a prompt waiting for input that never comes).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// `nixmox ARGS` as a user runs it: from inside the project directory (no `-C`), no colour, no
/// Proxmox token from the developer's environment, stdin closed. Every test starts the binary
/// through this builder.
pub struct Nixmox {
    cmd: Command,
    shown: Vec<String>,
    limit: Duration,
}

/// What a finished run printed.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Nixmox {
    /// Runs in the test's own directory until [`Nixmox::project`] or [`Nixmox::cwd`] says
    /// otherwise.
    pub fn new() -> Nixmox {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixmox"));
        cmd.env("NO_COLOR", "1")
            .env_remove("PROXMOX_API_TOKEN")
            .stdin(Stdio::null());
        Nixmox {
            cmd,
            shown: Vec::new(),
            limit: RUN_LIMIT,
        }
    }
    /// From inside `dir`, as a user in their project.
    pub fn project(mut self, dir: impl AsRef<Path>) -> Nixmox {
        self.cmd.current_dir(dir);
        self
    }
    /// From another directory (a relative `-C`, a subdirectory of the project).
    pub fn cwd(self, dir: impl AsRef<Path>) -> Nixmox {
        self.project(dir)
    }
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Nixmox {
        self.shown.push(a.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(a);
        self
    }
    pub fn args<I, S>(mut self, args: I) -> Nixmox
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }
    pub fn env(mut self, k: impl AsRef<std::ffi::OsStr>, v: impl AsRef<std::ffi::OsStr>) -> Nixmox {
        self.cmd.env(k, v);
        self
    }
    pub fn envs<I, K, V>(mut self, vars: I) -> Nixmox
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        self.cmd.envs(vars);
        self
    }
    /// The command itself, for a test that spawns it or wires its stdio.
    pub fn command(self) -> Command {
        self.cmd
    }
    /// Runs to the end (at most [`RUN_LIMIT`]) and returns what it printed, raw.
    pub fn output(mut self) -> Output {
        let mut child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the nixmox binary starts");
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > self.limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`nixmox {}` did not finish in {} s",
                    self.shown.join(" "),
                    self.limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }
    /// Runs to the end and returns its exit code and output as text.
    pub fn run(self) -> Run {
        let out = self.output();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// Fails the test after `limit` instead of [`RUN_LIMIT`].
    pub fn limit(mut self, limit: Duration) -> Nixmox {
        self.limit = limit;
        self
    }
}

impl Run {
    /// Asserts the exit code, showing both streams when it differs.
    pub fn code(self, expected: i32) -> Run {
        assert_eq!(
            self.code, expected,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- tools and servers shared by the tests that run real programs ----

pub fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A program the tests need: the project's own tools first (`$NIXMOX_TOOLS/bin`, the
/// repository's `.tools/bin`, where `scripts/install-tools` puts the pinned versions; a machine
/// may have another Terraform on its PATH), then the PATH, `/usr/sbin` and `/usr/bin`. Missing,
/// it fails the test with the way to install it.
pub fn tool(program: &str, install: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(t) = std::env::var_os("NIXMOX_TOOLS") {
        dirs.push(PathBuf::from(t).join("bin"));
    }
    dirs.push(repo().join(".tools/bin"));
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/bin".into());
    for d in dirs {
        let p = d.join(program);
        if is_executable(&p) {
            return p;
        }
    }
    panic!(
        "`{program}` is not installed, and this test needs it: run `scripts/install-tools {install}` \
         (scripts/test puts .tools/bin on PATH and sets NIXMOX_TOOLS)"
    );
}

/// Runs a command to completion; panics with its output unless it succeeds. Returns stdout.
pub fn check(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\ncommand: {cmd:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A child process, stopped (signal, then SIGKILL after a grace period) when dropped.
pub struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
    signal: &'static str,
}

impl Server {
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
        signal: &'static str,
    ) -> Server {
        let file = fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Server {
            name,
            child,
            log: log.to_path_buf(),
            signal,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the server's log) if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); its log:\n{}", self.name, self.log());
        }
    }

    /// Waits until `ready` returns true, failing if the server exits or 20 s pass.
    pub fn wait_until(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_running();
            if ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready within 20 s; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{}", self.signal))
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free for both TCP and UDP on `addr`.
pub fn free_port(addr: Ipv4Addr) -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind((addr, 0)).expect("bind a loopback address");
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind((addr, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {addr}");
}

pub fn tcp_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---- PostgreSQL run by the tests ----

/// The uid and gid of the `postgres` user, when the tests run as root (PostgreSQL refuses to
/// run as root); `None` when they run unprivileged (then PostgreSQL runs as the current user).
pub fn postgres_user() -> Option<(u32, u32)> {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let euid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("effective uid in /proc/self/status");
    if euid != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let ids = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| (f[2].parse().ok(), f[3].parse().ok()))
    });
    match ids {
        Some((Some(uid), Some(gid))) => Some((uid, gid)),
        _ => panic!(
            "running as root, PostgreSQL needs the `postgres` user, which does not exist: \
             run `scripts/install-tools postgres`"
        ),
    }
}

/// Gives a directory tree to `uid:gid` (links themselves, not their targets).
pub fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if fs::symlink_metadata(p).unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

/// `program` run as PostgreSQL's OS user (`postgres` when the tests run as root).
pub fn as_postgres(user: Option<(u32, u32)>, program: &Path) -> Command {
    match user {
        Some(_) => {
            let mut c = Command::new(tool("setpriv", "postgres"));
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A new PostgreSQL cluster in `dir/data`, with its socket directory `dir/sock` (mode 0700),
/// owned by PostgreSQL's OS user when the tests run as root. Returns (data, sock).
pub fn init_postgres(user: Option<(u32, u32)>, dir: &Path) -> (PathBuf, PathBuf) {
    let initdb = tool("initdb", "postgres");
    let data = dir.join("data");
    let sock = dir.join("sock");
    fs::create_dir_all(&sock).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).unwrap();
    if let Some((uid, gid)) = user {
        chown_tree(dir, uid, gid);
    }
    check(
        as_postgres(user, &initdb)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-instructions",
                "--no-sync",
            ])
            .env("HOME", dir),
        "initdb",
    );
    (data, sock)
}

/// A temporary directory named for the tests that made it (`nixmox-<what>-...`).
pub fn scratch(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("nixmox-{what}-"))
        .tempdir()
        .expect("a temporary directory")
}
