//! The one place NixMox spawns processes.
//!
//! Command lines are data ([`Cmd`]: a program, its arguments, a working directory and extra
//! environment variables), built by pure functions elsewhere and never a shell string. [`run`]
//! starts one in its own process group, feeds it stdin, reads stdout and stderr on threads (so a
//! chatty child never deadlocks on a full pipe), appends both to a log file with secrets
//! redacted, and enforces a timeout and a cancellation flag by signalling the whole process group:
//! SIGTERM first, SIGKILL after a grace period.
//!
//! The workspace forbids `unsafe` code, so `kill(2)` cannot be called through `libc`: process
//! groups are signalled with the system's `kill` program (`kill -s TERM -- -PGID`, procps or
//! coreutils), falling back to [`std::process::Child::kill`] on the group leader if that program
//! is missing.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How much of each of stdout and stderr [`Finished`] keeps (the tail).
pub const CAPTURE_LIMIT: usize = 64 * 1024;
/// Time between SIGTERM and SIGKILL when no [`RunOpts::grace`] is given.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How often the cancellation flag and the deadline are checked, at most.
const POLL: Duration = Duration::from_millis(50);
/// After the child exits, how long to wait for its pipes to close (a background process it left
/// behind may hold them open forever; its output after that is dropped).
const DRAIN: Duration = Duration::from_secs(2);
/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// One command line, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// Set on top of the inherited environment.
    pub env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Cmd {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Cmd {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The program as given, for messages.
    pub fn program_name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    /// The argv quoted like a POSIX shell would need it, for logs and messages only (never run).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How to run a [`Cmd`].
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
    /// Append a header line with the argv, stdout and stderr (line by line, as they come) and a
    /// footer with the result to this file (created with its parent directories).
    pub log: Option<PathBuf>,
    /// Checked about every 50 ms; once set, the process group gets SIGTERM, then SIGKILL after
    /// the grace period, and [`run`] returns [`ExecError::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Secret values, replaced by `<redacted>` in the log and in the captured output.
    pub redact: Vec<String>,
    /// Written to the child's stdin, which is then closed (default: /dev/null).
    pub stdin: Option<Vec<u8>>,
    /// SIGTERM-to-SIGKILL delay on timeout or cancel (default [`DEFAULT_GRACE`]).
    pub grace: Option<Duration>,
    /// stdout is machine-readable data that may carry secrets by design (`terraform output
    /// -json`, `terraform show -json`): it is captured in full and unredacted for the caller and
    /// never written to the log. stderr is handled as usual.
    pub stdout_is_data: bool,
}

/// A process that ran to its end (whatever its exit code).
#[derive(Debug, Clone)]
pub struct Finished {
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// Redacted, the last [`CAPTURE_LIMIT`] bytes (everything, unredacted, with
    /// [`RunOpts::stdout_is_data`]).
    pub stdout: String,
    /// Redacted, the last [`CAPTURE_LIMIT`] bytes.
    pub stderr: String,
    pub duration: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("`{program}` not found; install it or check its path")]
    NotFound { program: String },
    #[error("`{program}` timed out after {}; it was stopped", human_duration(*after))]
    TimedOut { program: String, after: Duration },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// `1.5s`, `2m 03s`: for messages.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.1}");
        format!("{}s", s.strip_suffix(".0").unwrap_or(&s))
    } else {
        let total = d.as_secs();
        format!("{}m {:02}s", total / 60, total % 60)
    }
}

/// Replaces secrets in text. Multi-line secrets are also matched line by line (output is logged
/// line by line), for lines of at least 4 characters.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    patterns: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: &[String]) -> Redactor {
        let mut patterns: Vec<String> = Vec::new();
        for s in secrets {
            if s.is_empty() {
                continue;
            }
            patterns.push(s.clone());
            if s.contains('\n') {
                for line in s.lines().map(str::trim) {
                    if line.chars().count() >= 4 {
                        patterns.push(line.to_string());
                    }
                }
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Redactor { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for p in &self.patterns {
            if out.contains(p.as_str()) {
                out = out.replace(p.as_str(), REDACTED);
            }
        }
        out
    }
}

/// Replaces known secret values in a message.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}

/// Appends `text` (redacted) to a log file, creating it and its parent directories.
pub fn append_log(path: &Path, text: &str, redact: &[String]) -> Result<(), ExecError> {
    let mut f = open_log(path)?;
    let mut text = Redactor::new(redact).apply(text);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    f.write_all(text.as_bytes()).map_err(|e| ExecError::Io {
        context: format!("writing log `{}`", path.display()),
        source: e,
    })
}

fn open_log(path: &Path) -> Result<File, ExecError> {
    let io_err = |e| ExecError::Io {
        context: format!("opening log `{}`", path.display()),
        source: e,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err)
}

/// Runs `cmd` to its end, or until its timeout or cancellation.
pub fn run(cmd: &Cmd, opts: &RunOpts) -> Result<Finished, ExecError> {
    let program = cmd.program_name();
    check_runnable(cmd, opts, &program)?;
    let redactor = Arc::new(Redactor::new(&opts.redact));
    let mut log = open_run_log(cmd, opts, &redactor)?;
    let start = Instant::now();
    let mut child = match command(cmd, opts).spawn() {
        Ok(c) => c,
        Err(e) => {
            let err = if e.kind() == io::ErrorKind::NotFound {
                ExecError::NotFound {
                    program: program.clone(),
                }
            } else {
                ExecError::Io {
                    context: format!("cannot start `{program}`"),
                    source: e,
                }
            };
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "[{err}]");
            }
            return Err(err);
        }
    };
    if let (Some(input), Some(mut pipe)) = (opts.stdin.clone(), child.stdin.take()) {
        // A child that never reads its stdin must not block us: write on a thread.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let shared = Arc::new(Mutex::new(Shared {
        log,
        closed: false,
        out: Capture::new(!opts.stdout_is_data),
        err: Capture::new(true),
    }));
    let drained = spawn_readers(&mut child, opts, &shared, &redactor);
    let (status, stopped) = wait(&mut child, opts, &program, start)?;
    let duration = start.elapsed();
    drained.wait();
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    shared.closed = true;
    if let Some(f) = shared.log.as_mut() {
        let _ = writeln!(f, "{}", footer(stopped, &status, opts, duration));
        let _ = f.flush();
    }
    shared.log = None;
    match stopped {
        Some(Stop::TimedOut) => {
            return Err(ExecError::TimedOut {
                program,
                after: opts.timeout.unwrap_or_default(),
            })
        }
        Some(Stop::Cancelled) => return Err(ExecError::Cancelled),
        None => {}
    }
    let stdout = if opts.stdout_is_data {
        String::from_utf8_lossy(&std::mem::take(&mut shared.out.buf)).into_owned()
    } else {
        shared.out.finish(&redactor)
    };
    let stderr = shared.err.finish(&redactor);
    Ok(Finished {
        code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        duration,
    })
}

fn cancelled(opts: &RunOpts) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::SeqCst))
}

/// Nothing is started when the run is already cancelled or its directory is missing.
fn check_runnable(cmd: &Cmd, opts: &RunOpts, program: &str) -> Result<(), ExecError> {
    if cancelled(opts) {
        return Err(ExecError::Cancelled);
    }
    if let Some(dir) = &cmd.cwd {
        if !dir.is_dir() {
            return Err(ExecError::Io {
                context: format!("cannot run `{program}` in `{}`", dir.display()),
                source: io::Error::new(io::ErrorKind::NotFound, "no such directory"),
            });
        }
    }
    Ok(())
}

/// The run's log, opened with its header line (the redacted command line), when it has one.
fn open_run_log(cmd: &Cmd, opts: &RunOpts, redactor: &Redactor) -> Result<Option<File>, ExecError> {
    let Some(path) = &opts.log else {
        return Ok(None);
    };
    let mut f = open_log(path)?;
    let mut header = format!("[{}] $ {}", utc_now(), cmd.display());
    if let Some(dir) = &cmd.cwd {
        header.push_str(&format!("    (in {})", dir.display()));
    }
    header.push('\n');
    let _ = f.write_all(redactor.apply(&header).as_bytes());
    Ok(Some(f))
}

/// The child as `cmd` says, in a process group of its own, its output piped.
fn command(cmd: &Cmd, opts: &RunOpts) -> Command {
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(if opts.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &cmd.cwd {
        command.current_dir(dir);
    }
    command
}

/// The threads reading the child's stdout and stderr, to be waited for once it exits.
struct Readers {
    done: mpsc::Receiver<()>,
    count: usize,
}

impl Readers {
    /// Waits (bounded by [`DRAIN`]) for both pipes to reach end of file.
    fn wait(self) {
        let drain_until = Instant::now() + DRAIN;
        for _ in 0..self.count {
            let left = drain_until.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

fn spawn_readers(
    child: &mut Child,
    opts: &RunOpts,
    shared: &Arc<Mutex<Shared>>,
    redactor: &Arc<Redactor>,
) -> Readers {
    let (done_tx, done) = mpsc::channel::<()>();
    let mut count = 0;
    if let Some(out) = child.stdout.take() {
        let stream = if opts.stdout_is_data {
            Stream::Data
        } else {
            Stream::Out
        };
        spawn_reader(out, stream, shared, redactor, done_tx.clone());
        count += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, Stream::Err, shared, redactor, done_tx.clone());
        count += 1;
    }
    Readers { done, count }
}

/// Polls the child (backing off to [`POLL`]) until it exits, or stops its process group on
/// the deadline or cancellation: its status, and why it was stopped if it was.
fn wait(
    child: &mut Child,
    opts: &RunOpts,
    program: &str,
    start: Instant,
) -> Result<(ExitStatus, Option<Stop>), ExecError> {
    let pgid = child.id();
    let deadline = opts.timeout.map(|t| start + t);
    let grace = opts.grace.unwrap_or(DEFAULT_GRACE);
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((status, None)),
            Ok(None) => {}
            Err(e) => {
                kill_group(child, pgid, grace);
                return Err(ExecError::Io {
                    context: format!("waiting for `{program}`"),
                    source: e,
                });
            }
        }
        let stopped = if cancelled(opts) {
            Some(Stop::Cancelled)
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Stop::TimedOut)
        } else {
            None
        };
        if stopped.is_some() {
            return Ok((kill_group(child, pgid, grace), stopped));
        }
        let mut nap = pause;
        if let Some(d) = deadline {
            nap = nap.min(d.saturating_duration_since(Instant::now()));
        }
        thread::sleep(nap);
        pause = (pause * 2).min(POLL);
    }
}

/// The log's last line: how the run ended and after how long.
fn footer(
    stopped: Option<Stop>,
    status: &ExitStatus,
    opts: &RunOpts,
    duration: Duration,
) -> String {
    match stopped {
        Some(Stop::TimedOut) => format!(
            "[timed out after {}; process group stopped]",
            human_duration(opts.timeout.unwrap_or_default())
        ),
        Some(Stop::Cancelled) => format!(
            "[cancelled after {}; process group stopped]",
            human_duration(duration)
        ),
        None => format!(
            "[{} after {}]",
            describe_status(status),
            human_duration(duration)
        ),
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    TimedOut,
    Cancelled,
}

fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "ended".to_string(),
    }
}

/// SIGTERM to the group, SIGKILL after `grace` if the leader is still there, then reap it; a
/// final SIGKILL to the group takes out members that outlived the leader.
fn kill_group(child: &mut Child, pgid: u32, grace: Duration) -> ExitStatus {
    signal_group(pgid, "TERM");
    let until = Instant::now() + grace;
    let mut status = None;
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let status = match status {
        Some(s) => s,
        None => {
            if !signal_group(pgid, "KILL") {
                let _ = child.kill();
            }
            match child.wait() {
                Ok(s) => s,
                Err(_) => ExitStatus::from_raw(libc::SIGKILL),
            }
        }
    };
    signal_group(pgid, "KILL");
    status
}

/// Sends a signal to a process group through the `kill` program (no `unsafe` allowed here).
/// Returns whether `kill` ran and reported success.
fn signal_group(pgid: u32, signal: &str) -> bool {
    let program = ["/bin/kill", "/usr/bin/kill"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("kill");
    Command::new(program)
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
    /// stdout kept whole and raw, never logged.
    Data,
}

struct Shared {
    log: Option<File>,
    /// Set once [`run`] has returned: late output of leftover processes is dropped.
    closed: bool,
    out: Capture,
    err: Capture,
}

struct Capture {
    buf: Vec<u8>,
    capped: bool,
    dropped: bool,
}

impl Capture {
    fn new(capped: bool) -> Capture {
        Capture {
            buf: Vec::new(),
            capped,
            dropped: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.capped && self.buf.len() > 2 * CAPTURE_LIMIT {
            let cut = self.buf.len() - CAPTURE_LIMIT;
            self.buf.drain(..cut);
            self.dropped = true;
        }
    }

    /// The tail (at most [`CAPTURE_LIMIT`] bytes), redacted once more as a whole so that
    /// multi-line secrets are caught too.
    fn finish(&mut self, redactor: &Redactor) -> String {
        let mut bytes = std::mem::take(&mut self.buf);
        if bytes.len() > CAPTURE_LIMIT {
            bytes.drain(..bytes.len() - CAPTURE_LIMIT);
            self.dropped = true;
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.dropped {
            // Start at a line boundary rather than mid-line (or mid-character).
            if let Some(nl) = text.find('\n') {
                text.drain(..=nl);
            }
        }
        redactor.apply(&text)
    }
}

/// Longest line kept in memory before it is flushed as if it ended there.
const MAX_LINE: usize = 64 * 1024;

fn spawn_reader<R: Read + Send + 'static>(
    mut pipe: R,
    stream: Stream,
    shared: &Arc<Mutex<Shared>>,
    redactor: &Arc<Redactor>,
    done: mpsc::Sender<()>,
) {
    let shared = Arc::clone(shared);
    let redactor = Arc::clone(redactor);
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if stream == Stream::Data {
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                if s.closed {
                    break;
                }
                s.out.push(&chunk[..n]);
                continue;
            }
            pending.extend_from_slice(&chunk[..n]);
            // Hand over every complete line (and over-long partial ones).
            let mut upto = pending.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
            if upto.is_none() && pending.len() >= MAX_LINE {
                upto = Some(pending.len());
            }
            if let Some(upto) = upto {
                let lines: Vec<u8> = pending.drain(..upto).collect();
                if !deliver(&shared, &redactor, stream, &lines) {
                    break;
                }
            }
        }
        if !pending.is_empty() {
            pending.push(b'\n');
            deliver(&shared, &redactor, stream, &pending);
        }
        let _ = done.send(());
    });
}

/// Redacts whole lines and appends them to the log and the capture. False once closed.
fn deliver(shared: &Mutex<Shared>, redactor: &Redactor, stream: Stream, lines: &[u8]) -> bool {
    let text = String::from_utf8_lossy(lines);
    let text = if redactor.is_empty() {
        text.into_owned()
    } else {
        text.split_inclusive('\n')
            .map(|l| redactor.apply(l))
            .collect::<String>()
    };
    let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
    if s.closed {
        return false;
    }
    if let Some(f) = s.log.as_mut() {
        let _ = f.write_all(text.as_bytes());
    }
    match stream {
        Stream::Out | Stream::Data => s.out.push(text.as_bytes()),
        Stream::Err => s.err.push(text.as_bytes()),
    }
    true
}

/// The current UTC time as `2024-05-01T12:34:56Z` (for log headers).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Cmd {
        Cmd::new("/bin/sh").arg("-c").arg(script)
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn exec_exit_codes_and_output() {
        let ok = run(&sh("echo out; echo err >&2"), &RunOpts::default()).unwrap();
        assert_eq!(ok.code, Some(0));
        assert!(ok.success());
        assert_eq!(ok.stdout, "out\n");
        assert_eq!(ok.stderr, "err\n");

        let bad = run(&sh("exit 7"), &RunOpts::default()).unwrap();
        assert_eq!(bad.code, Some(7));
        assert!(!bad.success());

        let killed = run(&sh("kill -9 $$"), &RunOpts::default()).unwrap();
        assert_eq!(killed.code, None);
        assert_eq!(killed.signal, Some(9));
    }

    #[test]
    fn exec_args_cwd_env_stdin_are_passed_as_data() {
        let dir = tmp();
        let cmd = Cmd::new("/bin/sh")
            .args([
                "-c",
                "printf '%s|' \"$1\" \"$PWD\" \"$NIXMOX_T\"; cat",
                "sh",
            ])
            .arg("a b; $(echo no)")
            .cwd(dir.path())
            .env("NIXMOX_T", "v'1");
        let opts = RunOpts {
            stdin: Some(b"from stdin".to_vec()),
            ..RunOpts::default()
        };
        let f = run(&cmd, &opts).unwrap();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            f.stdout,
            format!("a b; $(echo no)|{}|v'1|from stdin\n", cwd.display())
        );
    }

    #[test]
    fn exec_large_output_does_not_deadlock_and_is_capped() {
        // ~1 MiB on each stream at once: a child blocked on a full pipe would hang here.
        let script = "i=0; while [ $i -lt 16384 ]; do \
             echo \"line $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; \
             echo \"err $i yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\" >&2; \
             i=$((i+1)); done";
        let f = run(&sh(script), &RunOpts::default()).unwrap();
        assert!(f.success());
        assert!(f.stdout.len() <= CAPTURE_LIMIT, "{}", f.stdout.len());
        assert!(f.stdout.len() > CAPTURE_LIMIT / 2);
        assert!(f.stdout.starts_with("line "), "cut at a line boundary");
        assert!(f
            .stdout
            .ends_with("line 16383 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"));
        assert!(f.stderr.len() <= CAPTURE_LIMIT);
        assert!(f.stderr.contains("err 16383 "));
    }

    #[test]
    fn exec_timeout_kills_quickly() {
        let start = Instant::now();
        let opts = RunOpts {
            timeout: Some(Duration::from_millis(300)),
            ..RunOpts::default()
        };
        let err = run(&Cmd::new("sleep").arg("30"), &opts).unwrap_err();
        assert!(
            matches!(err, ExecError::TimedOut { ref program, after } if program == "sleep" && after == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(err.to_string().contains("timed out after 0.3s"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    fn process_gone(pid: &str) -> bool {
        // Gone, or a zombie waiting for a reaper that is not us.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn exec_timeout_kills_the_whole_process_group() {
        let dir = tmp();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
        let start = Instant::now();
        let opts = RunOpts {
            timeout: Some(Duration::from_millis(500)),
            ..RunOpts::default()
        };
        let err = run(&sh(&script), &opts).unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err:?}");
        // The grandchild held the pipes: returning at all means it died with its group.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let pid = pid.trim();
        let gone_by = Instant::now() + Duration::from_secs(2);
        while !process_gone(pid) && Instant::now() < gone_by {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(process_gone(pid), "grandchild {pid} survived");
    }

    #[test]
    fn exec_sigkill_after_grace_when_term_is_ignored() {
        let start = Instant::now();
        let opts = RunOpts {
            timeout: Some(Duration::from_millis(200)),
            grace: Some(Duration::from_millis(300)),
            ..RunOpts::default()
        };
        let err = run(&sh("trap '' TERM; sleep 30 & wait; sleep 30"), &opts).unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn exec_cancel_stops_the_process() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = Arc::clone(&flag);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                flag.store(true, Ordering::SeqCst);
            })
        };
        let start = Instant::now();
        let opts = RunOpts {
            cancel: Some(Arc::clone(&flag)),
            ..RunOpts::default()
        };
        let err = run(&sh("sleep 30 & wait"), &opts).unwrap_err();
        setter.join().unwrap();
        assert!(matches!(err, ExecError::Cancelled), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );

        // Already cancelled: nothing starts.
        let dir = tmp();
        let marker = dir.path().join("ran");
        let err = run(&sh(&format!("touch '{}'", marker.display())), &opts).unwrap_err();
        assert!(matches!(err, ExecError::Cancelled));
        assert!(!marker.exists());
    }

    #[test]
    fn exec_redacts_log_and_output() {
        let dir = tmp();
        let log = dir.path().join("logs/step.log");
        let opts = RunOpts {
            log: Some(log.clone()),
            redact: vec!["hunter2".into(), "multi\nline-secret".into()],
            ..RunOpts::default()
        };
        let script =
            "echo password=hunter2; echo token hunter2 >&2; printf 'multi\\nline-secret\\n'";
        let f = run(&sh(script).arg("ignored-hunter2"), &opts).unwrap();
        assert_eq!(f.stdout, "password=<redacted>\n<redacted>\n<redacted>\n");
        assert_eq!(f.stderr, "token <redacted>\n");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("line-secret"), "{text}");
        assert!(text.contains("password=<redacted>"), "{text}");
        // Header with the argv (redacted too) and a footer with the result.
        let first = text.lines().next().unwrap();
        assert!(
            first.contains("$ /bin/sh -c 'echo password=<redacted>;"),
            "{first}"
        );
        assert!(first.ends_with("ignored-<redacted>"), "{first}");
        assert!(
            text.lines().last().unwrap().starts_with("[exit 0 after "),
            "{text}"
        );

        // A second run appends.
        run(&sh("echo second"), &opts).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("$ /bin/sh").count(), 2, "{text}");
    }

    #[test]
    fn exec_stdout_as_data_is_raw_and_not_logged() {
        let dir = tmp();
        let log = dir.path().join("x.log");
        let opts = RunOpts {
            log: Some(log.clone()),
            redact: vec!["hunter2".into()],
            stdout_is_data: true,
            ..RunOpts::default()
        };
        let f = run(
            &sh("echo '{\"v\":\"hunter2\"}'; echo note hunter2 >&2"),
            &opts,
        )
        .unwrap();
        assert_eq!(f.stdout, "{\"v\":\"hunter2\"}\n");
        assert_eq!(f.stderr, "note <redacted>\n");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("note <redacted>"), "{text}");
    }

    #[test]
    fn exec_not_found_message() {
        let err = run(&Cmd::new("nixmox-no-such-program"), &RunOpts::default()).unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "`nixmox-no-such-program` not found; install it or check its path"
        );
        let err = run(&Cmd::new("/nonexistent/terraform"), &RunOpts::default()).unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err:?}");

        // A missing working directory is not reported as a missing program.
        let err = run(&sh("true").cwd("/nonexistent-dir"), &RunOpts::default()).unwrap_err();
        assert!(matches!(err, ExecError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
    }

    #[test]
    fn exec_leftover_background_process_does_not_hang() {
        let dir = tmp();
        let pidfile = dir.path().join("pid");
        let script = format!("echo hi; sleep 30 & echo $! > '{}'", pidfile.display());
        let start = Instant::now();
        let f = run(&sh(&script), &RunOpts::default()).unwrap();
        assert!(f.success());
        assert_eq!(f.stdout, "hi\n");
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{:?}",
            start.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        run(&sh(&format!("kill {}", pid.trim())), &RunOpts::default()).unwrap();
    }

    #[test]
    fn exec_display_quotes_for_logs() {
        let c = Cmd::new("terraform").args(["plan", "-out=/a b/p", "it's"]);
        assert_eq!(c.display(), r"terraform plan '-out=/a b/p' 'it'\''s'");
    }

    #[test]
    fn exec_utc_now_shape() {
        let t = utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
