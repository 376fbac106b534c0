//! The Proxmox VE driver against fakepve, a fake of the PVE 9 API that checks every parameter
//! against PVE's own schema (installed by `scripts/install-tools fakepve`; AGPL, so it is only
//! ever run, never vendored). Each test starts its own fake on its own loopback address through
//! `tests/fixtures/fakepve/launch.py`, which registers an API token and lets the test inject
//! faults. A missing fakepve fails the test with the command that installs it.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{copy_dir, use_nix_stubs, Nixmox};
use nixmox::engine::scheduler::Outcome;
use nixmox::proxmox::{
    self, lifecycle, template, Api, Client, ClientOptions, Credentials, HttpApi, HttpOptions,
    PveError, Retry, Secret, Settings,
};
use nixmox_core::model::{InfraBackend, SecretRef};
use nixmox_core::Project;
use serde_json::{json, Value};

const TOKEN_ID: &str = "root@pam!nixmox";
const TOKEN_SECRET: &str = "9f3c1a52-6b0e-4c1d-b7a8-0d2e6f4a8c11";
const TEMPLATE: &str = "nixos-26.05-x86_64-linux.tar.xz";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `fakepve-python`: `$NIXMOX_TOOLS/bin`, then the repository's `.tools/bin`.
fn fakepve_python() -> PathBuf {
    let mut places = Vec::new();
    if let Some(t) = std::env::var_os("NIXMOX_TOOLS") {
        places.push(PathBuf::from(t).join("bin/fakepve-python"));
    }
    places.push(repo().join(".tools/bin/fakepve-python"));
    places
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "fakepve is required by this test and is not installed: run `scripts/install-tools fakepve` \
                 (scripts/test does it)"
            )
        })
}

/// A running fakepve.
struct Fake {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    url: String,
    ca: PathBuf,
    /// SHA-256 of the certificate, lowercase hex.
    fingerprint: String,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fake {
    fn start(host: &str, extra: Value) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = json!({
            "host": host,
            "dir": dir.path(),
            "tokens": {TOKEN_ID: TOKEN_SECRET},
            "nodes": ["pve"],
            "templates": [{"name": TEMPLATE, "size": 4096}],
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let stderr = dir.path().join("stderr.log");
        let mut child = Command::new(fakepve_python())
            .arg(repo().join("tests/fixtures/fakepve/launch.py"))
            .arg(cfg.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start fakepve-python");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hello: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "fakepve did not start: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        Fake {
            stdin: child.stdin.take(),
            child,
            stdout,
            url: hello["url"].as_str().unwrap().into(),
            ca: hello["ca"].as_str().unwrap().into(),
            fingerprint: hello["fingerprint"].as_str().unwrap().into(),
            stderr,
            _dir: dir,
        }
    }

    fn cmd(&mut self, c: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{c}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "fakepve answered {line:?} to {c}: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        });
        if let Some(e) = answer.get("error") {
            panic!("fakepve: {c} failed: {e}");
        }
        answer["ok"].clone()
    }

    fn call(&mut self, method: &str, args: Value) -> Value {
        self.cmd(json!({"cmd": "call", "method": method, "args": args}))
    }

    fn call_kw(&mut self, method: &str, args: Value, kwargs: Value) -> Value {
        self.cmd(json!({"cmd": "call", "method": method, "args": args, "kwargs": kwargs}))
    }

    fn requests(&mut self) -> Vec<(String, String, String)> {
        self.cmd(json!({"cmd": "requests"}))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                    r[2].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Requests other than GET.
    fn writes(&mut self) -> Vec<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter(|(m, _, _)| m != "GET")
            .collect()
    }

    /// Writes other than snapshots: the snapshot a deploy step takes first (issue 14) is not
    /// `tf:infra`'s.
    fn infra_writes(&mut self) -> Vec<(String, String, String)> {
        self.writes()
            .into_iter()
            .filter(|(_, p, _)| !p.contains("/snapshot"))
            .collect()
    }

    fn clear_requests(&mut self) {
        self.cmd(json!({"cmd": "clear_requests"}));
    }

    fn cts(&mut self) -> Vec<Value> {
        self.cmd(json!({"cmd": "cts"})).as_array().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        // Closing stdin stops it; kill in case it does not.
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example project, pointed at the fake: its endpoint, its CA, the API token in a file.
struct Lab {
    fake: Fake,
    project: Project,
    root: tempfile::TempDir,
}

fn load_example() -> Project {
    let root = repo().join("examples/homelab");
    let read = nixmox::project_fs::read_project(&root).unwrap();
    let exists = nixmox::project_fs::exists_in(&root);
    let loaded = nixmox_core::load(&read.sources, &exists);
    loaded.project.expect("the example project loads")
}

impl Lab {
    fn new(host: &str) -> Lab {
        Lab::with(host, json!({}))
    }

    fn with(host: &str, extra: Value) -> Lab {
        let fake = Fake::start(host, extra);
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("pve-token"),
            format!("{TOKEN_ID}={TOKEN_SECRET}\n"),
        )
        .unwrap();
        let mut project = load_example();
        project.infra = InfraBackend::ProxmoxApi;
        project.proxmox.endpoint = Some(fake.url.clone());
        project.proxmox.token = SecretRef::File("pve-token".into());
        project.proxmox.tls.ca_file = Some(fake.ca.to_string_lossy().into_owned());
        Lab {
            fake,
            project,
            root,
        }
    }

    fn client_with(&self, opts: ClientOptions) -> Client {
        let settings = Settings::from_project(&self.project, self.root.path()).unwrap();
        proxmox::connect(&settings, opts).unwrap()
    }

    fn client(&self) -> Client {
        self.client_with(quick())
    }
}

fn quick() -> ClientOptions {
    ClientOptions {
        retry: Retry {
            attempts: 4,
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        poll: Duration::from_millis(10),
        poll_max: Duration::from_millis(100),
        task_timeout: Duration::from_secs(60),
    }
}

fn vmid_of(project: &Project, service: &str) -> u32 {
    project.service(service).unwrap().host.vmid.get()
}

#[test]
fn creates_the_example_from_scratch_and_a_rerun_sends_no_writes() {
    let mut lab = Lab::new("127.0.0.21");
    let client = lab.client();
    let report = lifecycle::converge(&client, &lab.project, 4).unwrap();
    let n = lab.project.services.len();
    assert_eq!(report.created.len(), n, "{report:?}");
    assert_eq!(report.started.len(), n);
    assert!(report.updated.is_empty() && report.orphans.is_empty());
    assert_eq!(
        report.summary(),
        format!("created {n}, updated 0, started {n}")
    );

    let cts = lab.fake.cts();
    assert_eq!(cts.len(), n);
    let dns = vmid_of(&lab.project, "dns");
    let ct = cts.iter().find(|c| c["vmid"] == dns).unwrap();
    assert_eq!(ct["status"], "running");
    assert_eq!(ct["node"], "pve");
    let cfg = &ct["config"];
    assert_eq!(cfg["tags"], "core;homelab;nixmox");
    assert_eq!(cfg["ostype"], "nixos");
    assert_eq!(cfg["features"], "nesting=1");
    assert_eq!(cfg["startup"], "order=1");
    let net0 = cfg["net0"].as_str().unwrap();
    for part in [
        "name=eth0",
        "bridge=vmbr0",
        "ip=192.168.99.10/24",
        "gw=192.168.99.1",
        "tag=99",
    ] {
        assert!(net0.contains(part), "{net0}");
    }
    assert!(cfg["rootfs"].as_str().unwrap().starts_with("local-lvm:"));
    let app = cts
        .iter()
        .find(|c| c["vmid"] == vmid_of(&lab.project, "nextcloud"))
        .unwrap();
    assert_eq!(app["config"]["tags"], "homelab;nixmox;service");
    // Apps start after the core services they need.
    assert_ne!(app["config"]["startup"], "order=1");

    // Again, with nothing changed: reads only.
    lab.fake.clear_requests();
    let client = lab.client();
    let report = lifecycle::converge(&client, &lab.project, 4).unwrap();
    assert_eq!(report.writes, 0, "{report:?}");
    assert_eq!(lab.fake.writes(), vec![]);
    assert_eq!(report.summary(), format!("created 0, updated 0, started 0"));
}

#[test]
fn a_changed_memory_updates_only_that_key_of_that_container() {
    let mut lab = Lab::new("127.0.0.22");
    lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    lab.fake.clear_requests();
    let i = lab.project.index_of("vaultwarden").unwrap();
    lab.project.services[i].host.resources.memory = 2048;
    let vmid = lab.project.services[i].host.vmid.get();

    let report = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    assert_eq!(report.updated.len(), 1);
    assert_eq!(report.updated[&vmid], vec!["memory".to_string()]);
    // Memory is applied to a running container at once: no restart needed.
    assert!(report.restart_needed.is_empty(), "{report:?}");
    assert_eq!(
        lab.fake.writes(),
        vec![(
            "PUT".to_string(),
            format!("/api2/json/nodes/pve/lxc/{vmid}/config"),
            "memory=2048".to_string()
        )]
    );
    let ct = lab
        .fake
        .cts()
        .into_iter()
        .find(|c| c["vmid"] == vmid)
        .unwrap();
    assert_eq!(ct["config"]["memory"], 2048);
}

#[test]
fn a_one_time_500_on_create_is_retried_without_a_duplicate() {
    let mut lab = Lab::new("127.0.0.23");
    lab.fake.call_kw(
        "fail",
        json!(["POST", "/nodes/pve/lxc", 500, "injected failure"]),
        json!({"times": 1}),
    );
    let report = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    let n = lab.project.services.len();
    assert_eq!(report.created.len(), n);
    let creates = lab
        .fake
        .writes()
        .into_iter()
        .filter(|(m, p, _)| m == "POST" && p == "/api2/json/nodes/pve/lxc")
        .count();
    assert_eq!(creates, n + 1, "one create sent twice");
    let cts = lab.fake.cts();
    assert_eq!(cts.len(), n);
    let mut ids: Vec<u64> = cts.iter().map(|c| c["vmid"].as_u64().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), n);
}

#[test]
fn a_flaky_network_still_converges() {
    let mut lab = Lab::new("127.0.0.24");
    lab.fake.call_kw(
        "flaky_network",
        json!([]),
        json!({"drop_rate": 0.2, "seed": 7}),
    );
    let opts = ClientOptions {
        retry: Retry {
            attempts: 10,
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        ..quick()
    };
    let report = lifecycle::converge(&lab.client_with(opts.clone()), &lab.project, 4)
        .unwrap_or_else(|e| panic!("{e}"));
    let n = lab.project.services.len();
    assert_eq!(report.created.len(), n);
    let dropped_some = lab.fake.requests().len();
    assert!(dropped_some > 0);
    let cts = lab.fake.cts();
    assert_eq!(cts.len(), n);
    assert!(cts
        .iter()
        .all(|c| c["status"] == "running" && c["lock"].is_null()));
    // Still flaky, and still nothing to write.
    lab.fake.clear_requests();
    let report = lifecycle::converge(&lab.client_with(opts), &lab.project, 4).unwrap();
    assert_eq!(report.writes, 0);
    assert_eq!(lab.fake.writes(), vec![]);
}

#[test]
fn a_held_config_lock_times_out_naming_the_container() {
    let mut lab = Lab::new("127.0.0.25");
    lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    let i = lab.project.index_of("postgresql").unwrap();
    let vmid = lab.project.services[i].host.vmid.get();
    lab.project.services[i].host.resources.cores += 1;
    lab.fake.call("hold_config_lock", json!([vmid, null]));

    let e = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.failures.len(), 1, "{msg}");
    assert!(
        msg.starts_with(&format!("CT {vmid} (`postgresql`) on node pve: update config: its configuration stayed locked by another task")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "can't lock file '/run/lock/lxc/pve-config-{vmid}.lock' - got timeout"
        )),
        "{msg}"
    );
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");

    lab.fake.call("release_config_lock", json!([vmid]));
    let report = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    assert_eq!(report.updated[&vmid], vec!["cores".to_string()]);
}

#[test]
fn lost_quorum_fails_with_pves_message_and_leaves_nothing_half_done() {
    let mut lab = Lab::new("127.0.0.26");
    lab.fake.call("lose_quorum", json!([]));
    let log = lab.root.path().join("tf_infra.log");
    let client = lab.client();
    let outcome = proxmox::step::run_with(&client, &lab.project, &log, 4, &[], None, &[]);
    let Outcome::Failed { error, transient } = outcome else {
        panic!("the step should fail")
    };
    assert!(!transient);
    assert!(error.starts_with("tf:infra: "), "{error}");
    let n = lab.project.services.len();
    assert!(
        error.starts_with(&format!(
            "tf:infra: create failed for {n} containers on node pve (CT 900 `dns`, "
        )),
        "{error}"
    );
    assert!(
        error.ends_with("POST /nodes/pve/lxc failed with HTTP 500: cluster not ready - no quorum? (gave up after 4 attempts)"),
        "{error}"
    );
    // Nothing was created, nothing is locked; the log says what was tried.
    assert_eq!(lab.fake.cts(), Vec::<Value>::new());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no quorum"), "{text}");
    assert!(text.contains("POST /nodes/pve/lxc"), "{text}");

    lab.fake.call("regain_quorum", json!([]));
    let report = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap();
    assert_eq!(report.created.len(), lab.project.services.len());
}

#[test]
fn a_wrong_token_is_a_clear_authentication_error_without_the_token() {
    let lab = Lab::new("127.0.0.27");
    let wrong = "root@pam!nixmox=00000000-wrong-secret-0000";
    std::fs::write(lab.root.path().join("pve-token"), wrong).unwrap();
    let log = lab.root.path().join("tf_infra.log");
    let outcome = proxmox::step::run_infra(
        &lab.project,
        lab.root.path(),
        &log,
        &proxmox::step::StepSettings {
            parallel: 4,
            timeout: Duration::from_secs(60),
            remove_orphans: Vec::new(),
        },
        &[],
    );
    let Outcome::Failed { error, .. } = outcome else {
        panic!("the step should fail")
    };
    assert_eq!(
        error,
        format!(
            "tf:infra: authentication to {} failed: PVE says \"authentication failure\"; check the API token in \
             the file `pve-token` (proxmox.token): it must be `user@realm!tokenid=secret` of an existing, unexpired token",
            lab.fake.url
        )
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("wrong-secret") && !error.contains("wrong-secret"),
        "{text}"
    );

    // Not even a token: said plainly.
    std::fs::remove_file(lab.root.path().join("pve-token")).unwrap();
    let e = Settings::from_project(&lab.project, lab.root.path()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("no Proxmox credentials: put an API token"),
        "{e}"
    );
}

#[test]
fn an_untrusted_certificate_is_refused_unless_pinned_or_its_ca_configured() {
    let mut lab = Lab::new("127.0.0.28");
    // No CA, no pin: refused, and the message shows what to pin.
    lab.project.proxmox.tls.ca_file = None;
    let e = lab.client().version().unwrap_err();
    let pretty = proxmox::tls::format_fingerprint(
        &proxmox::tls::parse_fingerprint(&lab.fake.fingerprint).unwrap(),
    );
    let msg = e.to_string();
    assert!(matches!(e, PveError::Tls(_)), "{msg}");
    assert!(
        msg.starts_with(&format!("refusing the TLS certificate of {}", lab.fake.url)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("Its SHA-256 fingerprint is {pretty}")),
        "{msg}"
    );
    // Nothing reached the server but the handshake.
    assert_eq!(lab.fake.requests(), vec![]);

    // Pinned (with colons, as PVE shows it): accepted.
    lab.project.proxmox.tls.fingerprint = Some(pretty.clone());
    lab.client().version().unwrap();
    // Pinned to another certificate: refused.
    lab.project.proxmox.tls.fingerprint = Some("AB:".repeat(31) + "AB");
    let e = lab.client().version().unwrap_err();
    assert!(
        e.to_string()
            .contains("not the one pinned in proxmox.tls.fingerprint"),
        "{e}"
    );
    // Its CA configured: accepted.
    lab.project.proxmox.tls.fingerprint = None;
    lab.project.proxmox.tls.ca_file = Some(lab.fake.ca.to_string_lossy().into_owned());
    lab.client().version().unwrap();
    // insecure: accepted, with a warning for every run.
    lab.project.proxmox.tls.ca_file = None;
    lab.project.proxmox.tls.insecure = true;
    let settings = Settings::from_project(&lab.project, lab.root.path()).unwrap();
    assert!(settings
        .tls
        .warning()
        .unwrap()
        .contains("verification of the Proxmox API is OFF"));
    proxmox::connect(&settings, quick())
        .unwrap()
        .version()
        .unwrap();
}

#[test]
fn a_failing_start_task_reports_pves_message_and_the_task_log() {
    let mut lab = Lab::new("127.0.0.29");
    let mut one = lab.project.clone();
    one.services.retain(|s| s.name.as_str() == "dns");
    one.edges.clear();
    lab.project = one;
    let vmid = vmid_of(&lab.project, "dns");
    // Create it stopped, then make its start fail.
    lab.project.services[0].host.start = false;
    lifecycle::converge(&lab.client(), &lab.project, 1).unwrap();
    lab.fake.cmd(json!({"cmd": "ct_set", "vmid": vmid, "attr": "start_error", "value": "startup for container '900' failed"}));
    lab.project.services[0].host.start = true;
    let e = lifecycle::converge(&lab.client(), &lab.project, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("CT {vmid} (`dns`) on node pve: start: vzstart task on pve failed: startup for container '900' failed")
    );
}

#[test]
fn parameter_errors_show_every_field_in_pves_words() {
    let lab = Lab::new("127.0.0.30");
    let client = lab.client();
    let e = client
        .create_ct(
            "pve",
            950,
            &[
                ("ostemplate".into(), format!("local:vztmpl/{TEMPLATE}")),
                ("memory".into(), "lots".into()),
                ("cores".into(), "0".into()),
            ],
            &|_| true,
        )
        .unwrap_err();
    let PveError::Params { fields, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(
        fields["memory"],
        "type check ('integer') failed - got 'lots'"
    );
    assert!(fields.contains_key("cores"), "{fields:?}");
    assert!(
        e.to_string()
            .starts_with("PVE rejected the parameters of POST /nodes/pve/lxc"),
        "{e}"
    );
}

#[test]
fn containers_without_the_projects_tags_are_never_touched() {
    let mut lab = Lab::new("127.0.0.31");
    let dns = vmid_of(&lab.project, "dns");
    // Someone else's container on the vmid the project wants, and one elsewhere.
    lab.fake.call_kw(
        "add_ct",
        json!([dns, "someone-elses"]),
        json!({"node": "pve", "status": "running", "config": {"tags": "prod"}}),
    );
    lab.fake.call_kw(
        "add_ct",
        json!([990, "unrelated"]),
        json!({"node": "pve", "config": {"tags": "homelab"}}),
    );
    // An orphan: the project's, but no host of it any more.
    lab.fake.call_kw(
        "add_ct",
        json!([991, "old-app"]),
        json!({"node": "pve", "config": {"tags": "homelab;nixmox;service"}}),
    );
    let e = lifecycle::converge(&lab.client(), &lab.project, 4).unwrap_err();
    assert_eq!(e.failures.len(), 1);
    assert!(
        e.failures[0].starts_with(&format!(
            "vmid {dns} of `dns` is taken by CT {dns} (`someone-elses`)"
        )),
        "{e}"
    );
    assert_eq!(e.report.created.len(), lab.project.services.len() - 1);
    assert_eq!(
        e.report.orphans.iter().map(|g| g.vmid).collect::<Vec<_>>(),
        vec![991]
    );
    let touched: Vec<String> = lab
        .fake
        .writes()
        .into_iter()
        .map(|(_, p, _)| p)
        .filter(|p| p.contains(&format!("/{dns}")) || p.contains("/990") || p.contains("/991"))
        .collect();
    assert_eq!(touched, Vec::<String>::new());

    // Orphans go only when asked, and only the project's.
    let removed = lifecycle::remove_orphans(&lab.client(), &lab.project, 4).unwrap();
    assert_eq!(removed.destroyed, vec![991]);
    let left: Vec<u64> = lab
        .fake
        .cts()
        .iter()
        .map(|c| c["vmid"].as_u64().unwrap())
        .collect();
    assert!(left.contains(&u64::from(dns)) && left.contains(&990) && !left.contains(&991));
    // `down` takes the project's containers, not the others.
    let downed = lifecycle::down(&lab.client(), &lab.project, 4).unwrap();
    assert_eq!(downed.destroyed.len(), lab.project.services.len() - 1);
    let mut left: Vec<u64> = lab
        .fake
        .cts()
        .iter()
        .map(|c| c["vmid"].as_u64().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, vec![u64::from(dns), 990]);
}

#[test]
fn ticket_login_with_csrf_and_a_new_ticket_when_it_is_revoked() {
    let mut lab = Lab::new("127.0.0.32");
    let api = HttpApi::new(
        &lab.fake.url,
        Credentials::Password {
            user: "root@pam".into(),
            password: Secret::new("secret"),
        },
        &proxmox::TlsSettings {
            ca_file: Some(lab.fake.ca.clone()),
            ..Default::default()
        },
        &HttpOptions::default(),
    )
    .unwrap();
    let api: Arc<dyn Api> = Arc::new(api);
    let client = Client::new(api.clone(), quick());
    let mut one = lab.project.clone();
    one.services.retain(|s| s.name.as_str() == "dns");
    one.edges.clear();
    let report = lifecycle::converge(&client, &one, 1).unwrap();
    assert_eq!(report.created.len(), 1);
    lab.fake.call("revoke_tickets", json!([]));
    client.version().unwrap();
    let logins = lab
        .fake
        .requests()
        .into_iter()
        .filter(|(_, p, _)| p == "/api2/json/access/ticket")
        .collect::<Vec<_>>();
    assert_eq!(logins.len(), 2);
    assert!(logins
        .iter()
        .all(|(_, _, body)| body.contains("password=***")));
}

#[test]
fn template_upload_and_list() {
    let lab = Lab::new("127.0.0.33");
    let client = lab.client();
    let (storage, name) = template::template_location(&lab.project).unwrap();
    assert_eq!((storage.as_str(), name.as_str()), ("local", TEMPLATE));
    let file = lab.root.path().join("nixos-test-x86_64-linux.tar.xz");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let sent = template::upload(&client, "pve", &storage, &file, false).unwrap();
    assert_eq!(
        sent,
        template::Uploaded::Sent("local:vztmpl/nixos-test-x86_64-linux.tar.xz".into())
    );
    let list = template::list(&client, "pve", &storage).unwrap();
    let ids: Vec<&str> = list.iter().map(|v| v.volid.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "local:vztmpl/nixos-26.05-x86_64-linux.tar.xz",
            "local:vztmpl/nixos-test-x86_64-linux.tar.xz"
        ]
    );
    assert_eq!(list[1].size, 100_000);
    let again = template::upload(&client, "pve", &storage, &file, false).unwrap();
    assert!(matches!(again, template::Uploaded::AlreadyThere(_)));
}

/// Switches the project at `cfg` (whose text is `text`) to the Terraform backend, run by the
/// stand-in `FAKE_TERRAFORM` written under `scratch`; returns the stand-in's directory (where
/// it logs its argv and looks for failure switches).
fn use_terraform_standin(scratch: &Path, cfg: &Path, text: &str) -> PathBuf {
    let bin = scratch.join("tf");
    std::fs::create_dir_all(&bin).unwrap();
    let terraform = bin.join("terraform");
    std::fs::write(&terraform, FAKE_TERRAFORM).unwrap();
    std::fs::set_permissions(
        &terraform,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let text = text
        .replace("backend: proxmox-api", "backend: terraform")
        .replace(
            "  binary: terraform\n",
            &format!("  binary: {}\n", terraform.display()),
        );
    std::fs::write(cfg, text).unwrap();
    bin
}

/// The example project in a new temporary directory, rewritten for the fake (see
/// `example_dir`); the directory lives as long as the returned guard.
fn homelab(fake: &Fake) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("homelab");
    example_dir(fake, &dir);
    (tmp, dir)
}

/// The example on disk, rewritten for the fake: proxmox-api backend, the fake's endpoint and
/// CA, the token in a file, the test deployer.
fn example_dir(fake: &Fake, dir: &Path) {
    copy_dir(&repo().join("examples/homelab"), dir);
    let path = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(
            text.contains(from),
            "the example's nixmox.yaml has no `{from}`"
        );
        text.replace(from, to)
    };
    let text = replace(
        text,
        "endpoint: https://pve.nixmox.lan:8006",
        &format!(
            "endpoint: {}\n  tls: {{ ca_file: {} }}",
            fake.url,
            fake.ca.display()
        ),
    );
    let text = replace(
        text,
        "token: { env: PROXMOX_API_TOKEN }",
        "token: { file: pve-token }",
    );
    let text = replace(text, "backend: terraform", "backend: proxmox-api");
    let text = replace(
        text,
        "deployer: nixos-rebuild",
        r#"deployer: { command: ["deploy-test", "{host}", "{ip}", "{flake}"], rollback: ["rollback-test", "{host}"] }"#,
    );
    std::fs::write(&path, text).unwrap();
    use_nix_stubs(dir);
    std::fs::write(
        dir.join("pve-token"),
        format!("{TOKEN_ID}={TOKEN_SECRET}\n"),
    )
    .unwrap();
}

fn nixmox(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["-C", dir.to_str().unwrap()];
    all.extend(args);
    nixmox_in(dir, &all)
}

/// `nixmox ARGS` run from inside the project directory, as people do.
fn nixmox_in(dir: &Path, args: &[&str]) -> std::process::Output {
    let path = format!(
        "{}:{}",
        repo().join("tests/fixtures/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Nixmox::new()
        .project(dir)
        .args(args)
        .env("PATH", path)
        // The deploy fails at once: this test is about tf:infra, and a deployed host would be
        // health-checked at its manifest address, which is nobody's here.
        .env("DEPLOY_FAIL_HOST", "dns")
        .output()
}

#[test]
fn up_runs_tf_infra_through_the_api_and_template_commands_work() {
    let mut fake = Fake::start("127.0.0.34", json!({}));
    let (tmp, dir) = homelab(&fake);

    let out = nixmox(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("done   tf:infra changed in")
            && stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    assert!(stderr.contains("FAILED nix:core:dns"), "{stderr}");
    assert_eq!(fake.cts().len(), 9);
    let logs = dir.join(".nixmox/logs");
    let run = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let log = std::fs::read_to_string(run.join("tf_infra.log")).unwrap();
    assert!(
        log.contains("result: created 9, updated 0, started 9"),
        "{log}"
    );
    assert!(!log.contains(TOKEN_SECRET), "{log}");

    // Forced again: reads only.
    fake.clear_requests();
    let out = nixmox(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("done   tf:infra unchanged in")
            && stderr.contains(": created 0, updated 0, started 0"),
        "{stderr}"
    );
    assert_eq!(fake.infra_writes(), vec![]);

    // Templates.
    let out = nixmox(&dir, &["template", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("* local:vztmpl/{TEMPLATE}")),
        "{stdout}"
    );
    let file = tmp.path().join("nixos-25.11-x86_64-linux.tar.xz");
    std::fs::write(&file, b"not really a template").unwrap();
    let out = nixmox(&dir, &["template", "upload", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "local:vztmpl/nixos-25.11-x86_64-linux.tar.xz\n"
    );
    let out = nixmox(&dir, &["template", "list", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["templates"].as_array().unwrap().len(), 2);
    let configured: Vec<&Value> = doc["templates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["configured"] == true)
        .collect();
    assert_eq!(configured.len(), 1, "{doc}");
    assert!(configured[0].to_string().contains(TEMPLATE), "{doc}");
}

#[test]
fn up_keeps_orphans_with_a_warning_and_remove_orphans_destroys_exactly_them() {
    let mut fake = Fake::start("127.0.0.35", json!({}));
    let (_tmp, dir) = homelab(&fake);
    let out = nixmox(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    let gone = vmid_of(&load_example(), "vaultwarden");
    let vmids = |fake: &mut Fake| -> Vec<u64> {
        let mut v: Vec<u64> = fake
            .cts()
            .iter()
            .map(|c| c["vmid"].as_u64().unwrap())
            .collect();
        v.sort();
        v
    };
    let before = vmids(&mut fake);
    assert!(before.contains(&u64::from(gone)));

    // Dropped from the project: `up` leaves its container alone and says so.
    std::fs::remove_dir_all(dir.join("services/vaultwarden")).unwrap();
    fake.clear_requests();
    let out = nixmox(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no longer in the project, left alone")
            && stderr.contains(&format!("CT {gone} (`vaultwarden`)")),
        "{stderr}"
    );
    assert_eq!(fake.infra_writes(), vec![]);
    assert_eq!(vmids(&mut fake), before);

    // `--remove-orphans` lists it first; without a terminal and without --yes it refuses
    // (exit 2) and nothing is written (issue 18).
    fake.clear_requests();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps", "--remove-orphans"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "CT {gone} (`vaultwarden`) on node pve: through the Proxmox API; no backup configured"
        )) && stderr.contains("--yes"),
        "{stderr}"
    );
    assert_eq!(fake.writes(), vec![]);
    assert_eq!(vmids(&mut fake), before);

    // With --yes it destroys exactly it (tf:infra runs without being forced).
    let out = nixmox_in(
        &dir,
        &["up", "dns", "--no-deps", "--remove-orphans", "--yes"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 0, updated 0, started 0, destroyed 1"),
        "{stderr}"
    );
    let destroys: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|(m, _, _)| m == "DELETE")
        .map(|(_, p, _)| p)
        .collect();
    assert_eq!(destroys.len(), 1, "{destroys:?}");
    assert!(
        destroys[0].contains(&format!("/lxc/{gone}")),
        "{destroys:?}"
    );
    let after: Vec<u64> = before
        .iter()
        .copied()
        .filter(|v| *v != u64::from(gone))
        .collect();
    assert_eq!(vmids(&mut fake), after);
}

#[test]
fn ps_shows_live_state_and_drift_finds_config_changed_behind_our_back() {
    let mut fake = Fake::start("127.0.0.36", json!({}));
    let (_tmp, dir) = homelab(&fake);
    let out = nixmox(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    let project = load_example();
    let (dns, caddy) = (vmid_of(&project, "dns"), vmid_of(&project, "caddy"));
    let client = {
        let mut p = project.clone();
        p.proxmox.endpoint = Some(fake.url.clone());
        p.proxmox.token = SecretRef::File("pve-token".into());
        p.proxmox.tls.ca_file = Some(fake.ca.to_string_lossy().into_owned());
        let settings = Settings::from_project(&p, &dir).unwrap();
        proxmox::connect(&settings, quick()).unwrap()
    };
    let ps = |dir: &Path| -> Value {
        let out = nixmox(dir, &["ps", "--format", "json", "--timeout", "200ms"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    let row = |doc: &Value, vmid: u32| -> Value {
        doc["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["vmid"] == vmid)
            .unwrap()
            .clone()
    };

    // ps: live from the API.
    let doc = ps(&dir);
    for s in doc["services"].as_array().unwrap() {
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["state_source"], "live", "{s}");
    }
    client.stop_ct("pve", caddy).unwrap();
    let doc = ps(&dir);
    assert_eq!(row(&doc, caddy)["state"], "stopped");
    assert_eq!(row(&doc, dns)["state"], "running");
    let out = nixmox(&dir, &["ps", "--timeout", "200ms"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("STATE (LIVE)"), "{text}");

    // drift: nothing yet; memory changed behind NixMox's back is found, and nothing written.
    let out = nixmox(&dir, &["drift"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    client
        .update_ct("pve", dns, &[("memory".into(), "4096".into())], &[])
        .unwrap();
    fake.clear_requests();
    let out = nixmox(&dir, &["drift"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "container CT {dns} (`dns`): differs from the manifest: memory"
        )),
        "{stdout}"
    );
    assert_eq!(fake.writes(), vec![]);

    // Unreachable API: last known state, with a note.
    drop(fake);
    let out = nixmox(&dir, &["ps", "--format", "json", "--timeout", "200ms"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row(&doc, dns)["state_source"], "last known");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not be reached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces the value of the project's `proxmox.<key>:` line.
fn set_proxmox_key(dir: &Path, key: &str, value: &str) {
    let path = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let prefix = format!("  {key}: ");
    assert!(text.lines().any(|l| l.starts_with(&prefix)), "no {key}");
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

/// Issue 11: with `proxmox-api`, converging never destroys a container. The template is taken
/// only at creation (a change writes nothing); a storage change, which only re-creating could
/// make, fails the step naming each container and the key, even with `--allow-destroy`, and
/// leaves every container as it was.
#[test]
fn issue_11_a_change_needing_re_creation_is_refused_without_destroying() {
    let mut fake = Fake::start("127.0.0.37", json!({}));
    let (_tmp, dir) = homelab(&fake);
    // The containers are compared whole: no snapshot (issue 14) moves their `parent`.
    set_proxmox_key(&dir, "storage", "local-lvm\n  snapshots: { mode: off }");
    let out = nixmox(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    let before = fake.cts();

    // A new template is for new containers only.
    set_proxmox_key(
        &dir,
        "template",
        "local:vztmpl/nixos-newer-x86_64-linux.tar.xz",
    );
    fake.clear_requests();
    let out = nixmox(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("done   tf:infra unchanged in")
            && stderr.contains(": created 0, updated 0, started 0"),
        "{stderr}"
    );
    assert_eq!(fake.infra_writes(), vec![]);

    // Another storage: refused, with and without --allow-destroy.
    set_proxmox_key(&dir, "storage", "local-zfs");
    let dns = vmid_of(&load_example(), "dns");
    for extra in [&[][..], &["--allow-destroy"][..]] {
        fake.clear_requests();
        let mut args = vec!["up", "dns", "--no-deps"];
        args.extend_from_slice(extra);
        let out = nixmox(&dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "CT {dns} (`dns`) on node pve: refused: changing rootfs needs the container re-created (its root volume is on storage `local-lvm`, the project says `local-zfs`"
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains("not even with --allow-destroy")
                && stderr.contains("`nixmox down dns` then `nixmox up dns`"),
            "{stderr}"
        );
        assert_eq!(fake.writes(), vec![], "{extra:?}");
        assert_eq!(fake.cts(), before);
    }
}

/// Issue 18: `down` with `infra.backend: proxmox-api` lists every container with its vmid and
/// node; without a terminal and without `--yes` it destroys nothing and changes no state (exit
/// 2); `--dry-run` lists and keeps everything; `--keep-host` lists none; `--yes` destroys
/// exactly the listed ones. Run from inside the project.
#[test]
fn down_lists_the_containers_and_destroys_exactly_them_only_when_confirmed() {
    let mut fake = Fake::start("127.0.0.37", json!({}));
    let (_tmp, dir) = homelab(&fake);
    // The containers are compared whole: no snapshot (issue 14) moves their `parent`.
    set_proxmox_key(&dir, "storage", "local-lvm\n  snapshots: { mode: off }");
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    // Someone else's container is never listed nor touched.
    fake.call_kw(
        "add_ct",
        json!([990, "unrelated"]),
        json!({"node": "pve", "config": {"tags": "homelab"}}),
    );
    let project = load_example();
    let vmids = |fake: &mut Fake| -> Vec<u64> {
        let mut v: Vec<u64> = fake
            .cts()
            .iter()
            .map(|c| c["vmid"].as_u64().unwrap())
            .collect();
        v.sort();
        v
    };
    let before = vmids(&mut fake);
    let state_db = dir.join(".nixmox/state.db");
    let record = || -> Vec<String> {
        let store = nixmox::state::Store::open(&state_db).unwrap();
        store.record().unwrap().steps.into_keys().collect()
    };
    let steps = record();
    let listed = |stderr: &str| -> Vec<u32> {
        let mut v: Vec<u32> = stderr
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("CT "))
            .filter(|l| l.contains(") on node pve: through the Proxmox API; no backup configured"))
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect();
        v.sort();
        v
    };
    let mut all: Vec<u32> = project.services.iter().map(|s| s.host.vmid.get()).collect();
    all.sort();

    fake.clear_requests();
    let out = nixmox_in(&dir, &["down"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(listed(&stderr), all, "{stderr}");
    assert!(!stderr.contains("CT 990"), "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(fake.writes(), vec![]);
    assert_eq!(vmids(&mut fake), before);
    assert_eq!(record(), steps);

    let out = nixmox_in(&dir, &["down", "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(listed(&stderr), all, "{stderr}");
    let out = nixmox_in(&dir, &["down", "--dry-run", "--keep-host"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(listed(&stderr), Vec::<u32>::new(), "{stderr}");
    assert!(
        stderr.contains("kept: the containers (--keep-host)"),
        "{stderr}"
    );
    assert_eq!(fake.writes(), vec![]);
    assert_eq!(vmids(&mut fake), before);
    assert_eq!(record(), steps);

    let out = nixmox_in(&dir, &["down", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(listed(&stderr), all, "{stderr}");
    let mut destroyed: Vec<u32> = fake
        .writes()
        .into_iter()
        .filter(|(m, _, _)| m == "DELETE")
        .map(|(_, p, _)| {
            p.rsplit("/lxc/")
                .next()
                .unwrap()
                .split(['/', '?'])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    destroyed.sort();
    assert_eq!(destroyed, all);
    assert_eq!(vmids(&mut fake), vec![990]);
    assert_eq!(record(), Vec::<String>::new());
}

/// Issue 15: a three-node cluster through the binary, run from inside the project: placement
/// across the nodes, recorded in nixmox.lock; a service added moves nobody; a new pin migrates
/// the container (same vmid, no create, no destroy); a migration PVE refuses is reported and
/// leaves the container where it was; an offline node fails only its containers, and `ps`
/// shows them unreachable.
#[test]
fn issue_15_cluster_placement_migration_and_an_offline_node() {
    let mut fake = Fake::start("127.0.0.40", json!({"nodes": ["pve2", "pve3"]}));
    let (_tmp, dir) = homelab(&fake);
    let cfg = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        // The fake's nodes report 8 GiB each, which the example fills: the project gives
        // their size.
        text.replace(
            "  node: pve\n",
            "  nodes:\n    - { name: pve1, memory: 16384 }\n    - { name: pve2, memory: 16384 }\n    - { name: pve3, memory: 16384 }\n",
        ),
    )
    .unwrap();
    let placed = |fake: &mut Fake| -> std::collections::BTreeMap<u64, String> {
        fake.cts()
            .iter()
            .map(|c| {
                (
                    c["vmid"].as_u64().unwrap(),
                    c["node"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };

    // Placement: every node gets containers, and the lock records where.
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    let first = placed(&mut fake);
    for node in ["pve1", "pve2", "pve3"] {
        assert!(
            first.values().any(|n| n == node),
            "{node} unused: {first:?}"
        );
    }
    let lock = std::fs::read_to_string(dir.join("nixmox.lock")).unwrap();
    assert_eq!(lock.matches("    node: pve").count(), 9, "{lock}");
    let config = nixmox_in(&dir, &["config", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&config.stdout).unwrap();
    for (name, s) in doc["services"].as_object().unwrap() {
        let vmid = s["host"]["vmid"].as_u64().unwrap();
        assert_eq!(
            s["host"]["node"].as_str(),
            Some(first[&vmid].as_str()),
            "{name}"
        );
    }

    // Two services in one spread group, one sorting first: nobody moves.
    for (name, ip) in [("aaa", "10"), ("zzz", "11")] {
        let svc = dir.join("services").join(name);
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(
            svc.join("manifest.yaml"),
            format!("name: {name}\nhost:\n  spread: pair\n  resources: {{ memory: 512 }}\n"),
        )
        .unwrap();
        let _ = ip;
    }
    fake.clear_requests();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 2, updated 0, started 2"),
        "{stderr}"
    );
    let second = placed(&mut fake);
    for (vmid, node) in &first {
        assert_eq!(&second[vmid], node, "CT {vmid} moved");
    }
    let project_vmid = |dir: &Path, name: &str| -> u64 {
        let out = nixmox_in(dir, &["config", "--format", "json"]);
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["services"][name]["host"]["vmid"].as_u64().unwrap()
    };
    let (aaa, zzz) = (project_vmid(&dir, "aaa"), project_vmid(&dir, "zzz"));
    assert_ne!(second[&aaa], second[&zzz], "spread group on one node");
    assert!(
        !fake
            .writes()
            .iter()
            .any(|(_, p, _)| p.ends_with("/migrate")),
        "nothing migrates when a service is added"
    );

    // A new pin migrates the container: same vmid, no create, no destroy.
    let vw = project_vmid(&dir, "vaultwarden");
    let from = second[&vw].clone();
    let to = ["pve1", "pve2", "pve3"]
        .into_iter()
        .find(|n| *n != from)
        .unwrap();
    let manifest = dir.join("services/vaultwarden/manifest.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("host:\n", &format!("host:\n  node: {to}\n")),
    )
    .unwrap();
    let plan = nixmox_in(&dir, &["config", "vaultwarden", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(doc["services"]["vaultwarden"]["host"]["node"], to);
    fake.clear_requests();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("migrated 1 (CT {vw} {from} → {to})")),
        "{stderr}"
    );
    let third = placed(&mut fake);
    assert_eq!(third[&vw], to);
    assert_eq!(third.len(), second.len());
    let writes = fake.writes();
    assert!(
        writes.iter().any(|(m, p, b)| m == "POST"
            && p == &format!("/api2/json/nodes/{from}/lxc/{vw}/migrate")
            && b.contains(&format!("target={to}"))
            && b.contains("restart=1")),
        "{writes:?}"
    );
    assert!(
        !writes
            .iter()
            .any(|(m, p, _)| m == "DELETE" || (m == "POST" && p.ends_with("/lxc"))),
        "{writes:?}"
    );

    // A migration PVE refuses (the container is locked by a backup): the error names the
    // container, both nodes and PVE's reason; the container stays where it was.
    fake.cmd(json!({"cmd": "ct_set", "vmid": vw, "attr": "lock", "value": "backup"}));
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(&format!("node: {to}"), &format!("node: {from}")),
    )
    .unwrap();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("CT {vw}"))
            && stderr.contains(&format!("migrate to node {from}"))
            && stderr.contains("locked"),
        "{stderr}"
    );
    assert_eq!(
        placed(&mut fake)[&vw],
        to,
        "a refused migration leaves it in place"
    );
    fake.cmd(json!({"cmd": "ct_set", "vmid": vw, "attr": "lock", "value": null}));
    std::fs::write(&manifest, text).unwrap();

    // An offline node: its containers are unreachable in `ps`, fail naming the node in `up`,
    // and the others go on.
    let down = first.values().find(|n| **n != to).unwrap().clone();
    fake.call("set_node_offline", json!([down]));
    let out = nixmox_in(&dir, &["ps"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("NODE"), "{stdout}");
    assert!(
        stdout.contains(&format!("unreachable (node {down} offline)")),
        "{stdout}"
    );
    let out = nixmox_in(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("node {down} is offline")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("created 1"),
        "nothing is placed on an offline node: {stderr}"
    );
}

/// Stands in for Terraform with bpg/proxmox, which cannot run here (no provider binary is
/// reachable offline). It records every argv in `argv.log` next to itself and plays the parts
/// of the commands the migration depends on against the real local state file: `state rm`
/// drops the resource, `import ADDR NODE/VMID` records it from that node (as bpg/proxmox's
/// importer does: the node from the ID, the rest read from PVE), failing when `fail-import`
/// exists next to it; `plan` has no changes, `output -json` prints `{}`.
const FAKE_TERRAFORM: &str = r#"#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "argv.log"), "a") as f:
    f.write(" ".join(args) + "\n")
state = next((a[len("-state="):] for a in args if a.startswith("-state=")), None)
def load():
    with open(state) as f:
        return json.load(f)
def save(doc):
    doc["serial"] += 1
    with open(state, "w") as f:
        json.dump(doc, f, indent=2)
if args[:2] == ["state", "rm"]:
    doc = load()
    doc["resources"] = [r for r in doc["resources"] if r["type"] + "." + r["name"] != args[-1]]
    save(doc)
elif args[0] == "import":
    if os.path.exists(os.path.join(here, "fail-import")):
        sys.stderr.write("\nError: error reading container: received an HTTP 596 response\n\n")
        sys.exit(1)
    node, vmid = args[-1].split("/")
    typ, name = args[-2].split(".")
    doc = load()
    doc["resources"].append({"mode": "managed", "type": typ, "name": name,
        "provider": "provider[\"registry.terraform.io/bpg/proxmox\"]",
        "instances": [{"schema_version": 0, "attributes": {"id": vmid, "node_name": node, "vm_id": int(vmid)}}]})
    save(doc)
elif args[0] == "output":
    print("{}")
"#;

/// The state bpg/proxmox would have written for the project's containers where they are.
fn tf_state(containers: &[(String, u64, String)]) -> String {
    let resources: Vec<Value> = containers
        .iter()
        .map(|(name, vmid, node)| {
            json!({"mode": "managed", "type": "proxmox_virtual_environment_container", "name": name,
                "provider": "provider[\"registry.terraform.io/bpg/proxmox\"]",
                "instances": [{"schema_version": 0, "attributes": {
                    "id": vmid.to_string(), "node_name": node, "vm_id": vmid,
                    "operating_system": [{"template_file_id": format!("local:vztmpl/{TEMPLATE}"), "type": "nixos"}]}}]})
        })
        .collect();
    serde_json::to_string_pretty(
        &json!({"version": 4, "terraform_version": "1.0.3", "serial": 1,
        "lineage": "5b0c5d0e-0000-4000-8000-000000000015", "outputs": {}, "resources": resources}),
    )
    .unwrap()
}

/// Issue 15 with `infra.backend: terraform`: a container whose node changes is migrated
/// through the PVE API (fakepve, real), then Terraform's state follows it (`state rm` and
/// `import <node>/<vmid>`, issued to the recording stand-in above) before the plan, so nothing
/// is re-created. A migration PVE refuses and an import that fails leave the container and the
/// state as they were; the next run finishes the move without migrating twice.
#[test]
fn issue_15_terraform_backend_migrates_then_the_state_follows() {
    let mut fake = Fake::start("127.0.0.41", json!({"nodes": ["pve2", "pve3"]}));
    let (tmp, dir) = homelab(&fake);
    let cfg = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  node: pve\n",
        "  nodes:\n    - { name: pve1, memory: 16384 }\n    - { name: pve2, memory: 16384 }\n    - { name: pve3, memory: 16384 }\n",
    );
    std::fs::write(&cfg, &text).unwrap();
    // The containers exist (made through the API, as Terraform would have made them).
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    let placed = |fake: &mut Fake| -> std::collections::BTreeMap<u64, String> {
        fake.cts()
            .iter()
            .map(|c| {
                (
                    c["vmid"].as_u64().unwrap(),
                    c["node"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let first = placed(&mut fake);

    // From now on the Terraform backend, with the stand-in, and the state it would have.
    let bin = use_terraform_standin(tmp.path(), &cfg, &text);
    let config = nixmox_in(&dir, &["config", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&config.stdout).unwrap();
    let services = doc["services"].as_object().unwrap();
    let vmid_of = |name: &str| services[name]["host"]["vmid"].as_u64().unwrap();
    let containers: Vec<(String, u64, String)> = services
        .keys()
        .map(|name| {
            (
                name.replace('-', "_"),
                vmid_of(name),
                first[&vmid_of(name)].clone(),
            )
        })
        .collect();
    let state_dir = dir.join(".nixmox/terraform/infra");
    std::fs::create_dir_all(&state_dir).unwrap();
    let state = state_dir.join("terraform.tfstate");
    std::fs::write(&state, tf_state(&containers)).unwrap();
    let node_in_state = |name: &str| -> String {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        doc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| {
                r["instances"][0]["attributes"]["node_name"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .unwrap_or_else(|| panic!("{name} is not in the state: {doc}"))
    };
    let argv = bin.join("argv.log");
    let argv_lines = || std::fs::read_to_string(&argv).unwrap_or_default();
    let addr = "proxmox_virtual_environment_container.vaultwarden";
    let state_arg = format!("-state={}", state.canonicalize().unwrap().display());

    // A new pin: migrated through the API, then the state follows, then the plan.
    let vw = vmid_of("vaultwarden");
    let from = first[&vw].clone();
    let to = ["pve1", "pve2", "pve3"]
        .into_iter()
        .find(|n| *n != from)
        .unwrap()
        .to_string();
    let manifest = dir.join("services/vaultwarden/manifest.yaml");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let pin = |node: &str| {
        std::fs::write(
            &manifest,
            original.replace("host:\n", &format!("host:\n  node: {node}\n")),
        )
        .unwrap()
    };
    pin(&to);
    fake.clear_requests();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("done   tf:infra")
            && stderr.contains(&format!("migrated 1 (CT {vw} {from} → {to})")),
        "{stderr}\n{}",
        argv_lines()
    );
    assert_eq!(placed(&mut fake)[&vw], to);
    let writes = fake.writes();
    assert!(
        writes.iter().any(|(m, p, b)| m == "POST"
            && p == &format!("/api2/json/nodes/{from}/lxc/{vw}/migrate")
            && b.contains(&format!("target={to}"))
            && b.contains("restart=1")),
        "{writes:?}"
    );
    assert!(
        !writes
            .iter()
            .any(|(m, p, _)| m == "DELETE" || (m == "POST" && p.ends_with("/lxc"))),
        "no create, no destroy: {writes:?}"
    );
    let lines = argv_lines();
    let commands: Vec<&str> = lines.lines().filter(|l| !l.starts_with("init")).collect();
    assert_eq!(
        commands[..2],
        [
            format!("state rm {state_arg} {addr}"),
            format!("import -no-color -input=false {state_arg} {addr} {to}/{vw}"),
        ],
        "{lines}"
    );
    assert!(
        commands[2].starts_with("plan "),
        "the plan comes after: {lines}"
    );
    assert_eq!(node_in_state("vaultwarden"), to);

    // A migration PVE refuses: the container and the state stay; Terraform is not asked.
    fake.cmd(json!({"cmd": "ct_set", "vmid": vw, "attr": "lock", "value": "backup"}));
    pin(&from);
    let before = std::fs::read(&state).unwrap();
    std::fs::write(&argv, "").unwrap();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "tf:infra: CT {vw} (vaultwarden) on node {to}: migrate to node {from}:"
        )) && stderr.contains("locked"),
        "{stderr}"
    );
    assert_eq!(placed(&mut fake)[&vw], to);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the state is untouched"
    );
    assert!(
        !argv_lines().contains("import") && !argv_lines().contains("state rm"),
        "{}",
        argv_lines()
    );
    fake.cmd(json!({"cmd": "ct_set", "vmid": vw, "attr": "lock", "value": null}));

    // The migration goes through but the import fails: the state is put back as it was
    // (naming the old node), the error says so.
    std::fs::write(bin.join("fail-import"), "").unwrap();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "CT {vw} is on node {from} but its state could not follow"
        )) && stderr.contains("HTTP 596")
            && stderr.contains("the state was put back as it was"),
        "{stderr}"
    );
    assert_eq!(placed(&mut fake)[&vw], from);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the state is put back"
    );

    // The next run finds the container on its node already: no second migration, the state
    // follows.
    std::fs::remove_file(bin.join("fail-import")).unwrap();
    fake.clear_requests();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("migrated 1 (CT {vw} {to} → {from})")),
        "{stderr}"
    );
    assert!(
        !fake
            .writes()
            .iter()
            .any(|(_, p, _)| p.ends_with("/migrate")),
        "migrated once only"
    );
    assert_eq!(node_in_state("vaultwarden"), from);
}

/// Issue 15: `nixmox rebalance` on a cluster that grew. The containers were all placed on one
/// node; two nodes are added; `rebalance` lists the moves (its warnings once, nothing written),
/// and `rebalance --yes` records them and migrates exactly those containers (no create, no
/// destroy).
#[test]
fn issue_15_rebalance_lists_the_moves_and_yes_migrates_them() {
    let mut fake = Fake::start("127.0.0.42", json!({"nodes": ["pve2", "pve3"]}));
    let (_tmp, dir) = homelab(&fake);
    let cfg = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        // Every deploy fails at once: this test is about the containers.
        .replace("\"deploy-test\", \"{host}\"", "\"false\", \"{host}\"");
    std::fs::write(
        &cfg,
        text.replace(
            "  node: pve\n",
            "  nodes:\n    - { name: pve1, memory: 65536 }\n",
        ),
    )
    .unwrap();
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": created 9, updated 0, started 9"),
        "{stderr}"
    );
    assert!(fake.cts().iter().all(|c| c["node"] == "pve1"));

    std::fs::write(
        &cfg,
        text.replace(
            "  node: pve\n",
            "  nodes:\n    - { name: pve1, memory: 16384 }\n    - { name: pve2, memory: 16384 }\n    - { name: pve3, memory: 16384 }\n",
        ),
    )
    .unwrap();
    // A warning the project gives on every load.
    std::fs::create_dir_all(dir.join("services/notes")).unwrap();
    std::fs::write(dir.join("services/notes/README"), "later\n").unwrap();
    let lock = std::fs::read_to_string(dir.join("nixmox.lock")).unwrap();
    fake.clear_requests();
    let out = nixmox_in(&dir, &["rebalance"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("`services/notes` has no manifest").count(),
        1,
        "{stderr}"
    );
    let moves: Vec<&str> = stdout.lines().collect();
    assert!(moves.len() >= 2, "{stdout}");
    assert!(
        moves
            .iter()
            .all(|l| l.starts_with("move ") && l.contains(": pve1 → pve")),
        "{stdout}"
    );
    assert_eq!(
        fake.writes(),
        vec![],
        "rebalance without --yes writes nothing"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("nixmox.lock")).unwrap(),
        lock
    );

    let out = nixmox_in(&dir, &["rebalance", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), stdout, "{stderr}");
    assert!(
        stderr.contains(&format!("migrated {}", moves.len())),
        "{stderr}"
    );
    assert_ne!(
        std::fs::read_to_string(dir.join("nixmox.lock")).unwrap(),
        lock
    );
    let cts = fake.cts();
    for line in &moves {
        // move NAME (CT VMID): pve1 → NODE
        let vmid: u64 = line
            .split("(CT ")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let to = line.rsplit(' ').next().unwrap();
        assert!(
            cts.iter().any(|c| c["vmid"] == vmid && c["node"] == to),
            "{line}: {cts:?}"
        );
    }
    let writes = fake.writes();
    assert_eq!(
        writes
            .iter()
            .filter(|(_, p, _)| p.ends_with("/migrate"))
            .count(),
        moves.len(),
        "{writes:?}"
    );
    assert!(
        !writes
            .iter()
            .any(|(m, p, _)| m == "DELETE" || (m == "POST" && p.ends_with("/lxc"))),
        "{writes:?}"
    );
    let out = nixmox_in(&dir, &["rebalance"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "balanced now");
}

// ------------------------------------------------------------------------------------------
// Issue 14: snapshots around changes. The engine's test project (`tests/fixtures/tf-project`:
// app, worker, solo, the test deployer) with `infra.backend: proxmox-api` on a fake, run
// through the binary from inside the project directory (`common::Lab`).

/// The test project pointed at `fake`, with `proxmox.snapshots` set to `snapshots` (YAML flow
/// mapping).
fn snapshot_lab(fake: &Fake, snapshots: &str) -> common::Lab {
    let lab = common::Lab::new();
    let yaml = lab.project.join("nixmox.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(text.contains("infra: { backend: none }"), "{text}");
    let text = text.replace(
        "infra: { backend: none }",
        &format!(
            "infra: {{ backend: proxmox-api }}\nproxmox:\n  endpoint: {}\n  node: pve\n  template: local:vztmpl/{TEMPLATE}\n  token: {{ file: pve-token }}\n  tls: {{ ca_file: {} }}\n  snapshots: {snapshots}",
            fake.url,
            fake.ca.display()
        ),
    );
    std::fs::write(&yaml, text).unwrap();
    std::fs::write(
        lab.project.join("pve-token"),
        format!("{TOKEN_ID}={TOKEN_SECRET}\n"),
    )
    .unwrap();
    lab
}

/// The names of each container's snapshots, by vmid.
fn snapshots_of(fake: &mut Fake, vmid: u32) -> Vec<String> {
    let all = fake.cmd(json!({"cmd": "snapshots"}));
    let mut names: Vec<String> = all[vmid.to_string()]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A snapshot someone else took, through the API as they would.
fn foreign_snapshot(fake: &Fake, lab: &common::Lab, vmid: u32, name: &str) {
    let read = nixmox::project_fs::read_project(&lab.project).unwrap();
    let loaded = nixmox_core::load(&read.sources, &nixmox::project_fs::exists_in(&lab.project));
    let project = loaded.project.expect("the test project loads");
    assert_eq!(project.proxmox.endpoint.as_deref(), Some(fake.url.as_str()));
    let settings = Settings::from_project(&project, &lab.project).unwrap();
    let client = proxmox::connect(&settings, quick()).unwrap();
    proxmox::snapshot::take(
        &client,
        "pve",
        vmid,
        name,
        "the operator's own",
        Instant::now() + Duration::from_secs(10),
    )
    .unwrap();
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn issue_14_a_deploy_snapshots_first_and_an_unreachable_host_is_rolled_back_through_the_api() {
    let mut fake = Fake::start("127.0.0.140", json!({}));
    let lab = snapshot_lab(&fake, "{ mode: required, keep: 3 }");
    // The first deploy of app fails: its snapshot was taken before the deployer ran.
    let out = lab.run(&["up"], &[("DEPLOY_FAIL_HOST", "app")]);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert_eq!(snapshots_of(&mut fake, 910), vec!["nixmox-r1-svc-app"]);
    let log = std::fs::read_to_string(
        lab.project
            .join(".nixmox/logs/1/nix_service-config_app.log"),
    )
    .unwrap();
    let snap_at = log
        .find("snapshot nixmox-r1-svc-app of CT 910")
        .expect(&log);
    let deploy_at = log.find("activation of app failed").expect(&log);
    assert!(snap_at < deploy_at, "the snapshot comes first:\n{log}");

    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert_eq!(
        snapshots_of(&mut fake, 910),
        vec!["nixmox-r1-svc-app", "nixmox-r2-svc-app"]
    );
    // solo did not change: no new snapshot of it.
    assert_eq!(snapshots_of(&mut fake, 912), vec!["nixmox-r1-svc-solo"]);
    foreign_snapshot(&fake, &lab, 910, "before-upgrade");

    // A deploy after which app is unreachable (a firewall or network change): its health
    // gate fails over SSH, and the rollback needs no network path to it.
    edit(
        &lab.project.join("services/app/configuration.nix"),
        "{",
        "{\n  # a change that cuts the host off\n",
    );
    edit(
        &lab.project.join("services/app/manifest.yaml"),
        "startup: \"test -e /etc/hostname\"",
        "startup: \"test -e /etc/hostname\"\n    retries: 1\n    interval: 1s",
    );
    lab.clear();
    fake.clear_requests();
    let out = lab.run(&["up"], &[("SSH_FAIL_HOST", "10.77.0.10")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        err.contains("ROLLED BACK nix:service-config:app")
            && err.contains("CT 910 (`app`) rolled back to snapshot nixmox-r3-svc-app and started"),
        "{err}"
    );
    assert!(
        err.contains("health after the rollback: still failing"),
        "{err}"
    );
    let rollbacks: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|(_, p, _)| p.contains("/rollback"))
        .map(|(m, p, b)| format!("{m} {p} {b}"))
        .collect();
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert!(
        rollbacks[0].contains("/nodes/pve/lxc/910/snapshot/nixmox-r3-svc-app/rollback")
            && rollbacks[0].contains("start=1"),
        "{rollbacks:?}"
    );
    assert!(
        !lab.invocations().iter().any(|c| c.starts_with("rollback ")),
        "the snapshot replaces the generation rollback: {:?}",
        lab.invocations()
    );
    assert_eq!(lab.history()["runs"][0]["result"], "rolled_back");
    let ct = fake.cts().into_iter().find(|c| c["vmid"] == 910).unwrap();
    assert_eq!(ct["status"], "running", "{ct}");
    assert_eq!(ct["config"]["parent"], "nixmox-r3-svc-app", "{ct}");
    // `ps` shows what it was rolled back to.
    let ps = lab.run(&["ps", "--format", "json", "--timeout", "200ms"], &[]);
    let doc: Value =
        serde_json::from_slice(&ps.stdout).unwrap_or_else(|_| panic!("{}", common::text(&ps)));
    let app = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["last_deploy"]["result"], "rolled back", "{app}");
    assert_eq!(
        app["last_deploy"]["rolled_back_to"], "snapshot nixmox-r3-svc-app",
        "{app}"
    );

    // The next `up` does not repeat the same failure: held, with the run and the reason.
    let dry = lab.run(&["up", "--dry-run"], &[]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.lines().any(|l| l.contains("held")
            && l.contains("nix:service-config:app")
            && l.contains("failed in run 3")
            && l.contains("health gate failed")),
        "{}",
        common::text(&dry)
    );
    let json_plan = lab.run(&["plan", "--format", "json"], &[]);
    let doc: Value = serde_json::from_slice(&json_plan.stdout).unwrap();
    let held: Vec<&Value> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("held").is_some())
        .collect();
    assert_eq!(held.len(), 1, "{doc}");
    assert_eq!(held[0]["id"], "nix:service-config:app");
    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        !lab.invocations()
            .iter()
            .any(|c| c.starts_with("start app ")),
        "{:?}",
        lab.invocations()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("nix:service-config:app not run: failed in run 3"),
        "{}",
        common::text(&out)
    );
    // Forced, it runs again (and, reachable now, succeeds).
    let out = lab.run(&["up", "--force-step", "nix:service-config:app"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let out = lab.run(&["up", "--dry-run"], &[]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("held"),
        "{}",
        common::text(&out)
    );
    // The operator's snapshot was never touched.
    assert!(snapshots_of(&mut fake, 910).contains(&"before-upgrade".to_string()));
}

#[test]
fn issue_14_retention_keeps_the_newest_n_and_never_touches_foreign_snapshots() {
    let mut fake = Fake::start("127.0.0.141", json!({}));
    let lab = snapshot_lab(&fake, "{ keep: 2 }");
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    foreign_snapshot(&fake, &lab, 912, "mine");
    for _ in 0..3 {
        let out = lab.run(
            &["up", "solo", "--force-step", "nix:service-config:solo"],
            &[],
        );
        assert!(out.status.success(), "{}", common::text(&out));
    }
    assert_eq!(
        snapshots_of(&mut fake, 912),
        vec!["mine", "nixmox-r3-svc-solo", "nixmox-r4-svc-solo"]
    );
    // `snapshot list` tells them apart.
    let out = lab.run(&["snapshot", "list", "solo", "--format", "json"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["version"], 1);
    let by: Vec<(String, String)> = doc["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["taken_by"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(by.contains(&("mine".into(), "foreign".into())), "{by:?}");
    assert!(
        by.contains(&("nixmox-r4-svc-solo".into(), "nixmox".into())),
        "{by:?}"
    );
    // A snapshot now, and a rollback to it: refused without a terminal or --yes.
    let out = lab.run(&["snapshot", "create", "solo"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        name.starts_with("nixmox-r") && name.ends_with("-man-solo"),
        "{name}"
    );
    fake.clear_requests();
    let out = lab.run(&["snapshot", "rollback", "solo"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --yes"),
        "{}",
        common::text(&out)
    );
    assert_eq!(fake.writes(), vec![]);
    let out = lab.run(&["snapshot", "rollback", "solo", "--yes"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let writes = fake.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(
        writes[0]
            .1
            .ends_with(&format!("/lxc/912/snapshot/{name}/rollback")),
        "the newest NixMox snapshot: {writes:?}"
    );
    assert!(snapshots_of(&mut fake, 912).contains(&"mine".to_string()));
}

#[test]
fn issue_14_required_fails_on_a_storage_that_cannot_snapshot_and_best_effort_warns() {
    let mut fake = Fake::start("127.0.0.142", json!({}));
    let lab = snapshot_lab(&fake, "{ mode: required }");
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    // The root volumes' storage can no longer snapshot (a `dir` storage).
    fake.cmd(json!({"cmd": "storage_set", "storage": "local-lvm", "key": "type", "value": "dir"}));
    lab.clear();
    let out = lab.run(
        &["up", "solo", "--force-step", "nix:service-config:solo"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        err.contains("FAILED nix:service-config:solo")
            && err.contains("snapshot of CT 912 (`solo`) on node pve")
            && err.contains("snapshot feature is not available")
            && err.contains("nothing was deployed"),
        "{err}"
    );
    assert!(
        !lab.invocations()
            .iter()
            .any(|c| c.starts_with("start solo ")),
        "required: the deploy did not run: {:?}",
        lab.invocations()
    );
    // Best effort: a warning, and the deploy goes on.
    edit(
        &lab.project.join("nixmox.yaml"),
        "mode: required",
        "mode: best-effort",
    );
    lab.clear();
    let out = lab.run(
        &["up", "solo", "--force-step", "nix:service-config:solo"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        err.contains("warning") && err.contains("snapshot feature is not available"),
        "{err}"
    );
    assert!(lab
        .invocations()
        .iter()
        .any(|c| c.starts_with("start solo ")));
}

#[test]
fn issue_14_a_container_locked_by_a_backup_is_waited_for_then_fails_clearly() {
    let mut fake = Fake::start("127.0.0.143", json!({}));
    let lab = snapshot_lab(&fake, "{ mode: required }");
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    // A backup (vzdump) holds CT 912's lock for 2 seconds.
    fake.cmd(json!({"cmd": "set", "attr": "time_scale", "value": 1}));
    fake.call_kw("backup", json!([912]), json!({"secs": 2}));
    let started = Instant::now();
    let out = lab.run(
        &["up", "solo", "--force-step", "nix:service-config:solo"],
        &[],
    );
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let run = lab.history()["runs"][0]["id"].as_i64().unwrap();
    let log = std::fs::read_to_string(
        lab.project
            .join(format!(".nixmox/logs/{run}/nix_service-config_solo.log")),
    )
    .unwrap();
    assert!(log.contains("CT 912 was locked (backup): waited"), "{log}");
    assert!(
        snapshots_of(&mut fake, 912).contains(&format!("nixmox-r{run}-svc-solo")),
        "{log}"
    );
    // A backup that outlasts the step's timeout: the step fails, naming the lock.
    fake.call_kw("backup", json!([912]), json!({"secs": 30}));
    let out = lab.run(
        &[
            "up",
            "solo",
            "--force-step",
            "nix:service-config:solo",
            "--timeout",
            "2s",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        err.contains("FAILED nix:service-config:solo")
            && err.contains("CT 912 stayed locked (backup)"),
        "{err}"
    );
}

/// Issue 14 (backups) and 18 (the hook before `down` destroys): `nixmox backup` asks PVE for a
/// vzdump of the container and waits for it; `down` does the same first for a host with
/// `host.backup`, and destroys nothing when the backup cannot be found. fakepve 0.5 has no
/// model of vzdump: it checks the request against PVE's schema (a wrong parameter is a 400)
/// and runs a task that writes no archive, so the archive's volume id cannot be shown here;
/// what is tested is the request, the awaited task, and that a backup NixMox cannot confirm
/// stops `down` with nothing destroyed. `--no-backup` destroys without one.
#[test]
fn issue_14_backup_and_down_ask_for_a_vzdump_and_an_unconfirmed_backup_destroys_nothing() {
    let mut fake = Fake::start("127.0.0.144", json!({}));
    let lab = snapshot_lab(&fake, "{ mode: best-effort }");
    edit(
        &lab.project.join("services/solo/manifest.yaml"),
        "vmid: 912 }",
        "vmid: 912, backup: { storage: local, schedule: \"sun 02:30\", keep: 7 } }",
    );
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    // The backup job: fakepve checks `/cluster/backup` requests against PVE's schema (a wrong
    // parameter is a 400) and answers a listing from it without storing jobs, so only the
    // request is checked here (the create/update/remove decisions are unit-tested in
    // `proxmox::backup`), and that the listed job that is not NixMox's is left alone.
    let jobs: Vec<(String, String, String)> = fake
        .writes()
        .into_iter()
        .filter(|(_, p, _)| p.contains("/cluster/backup"))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, "POST");
    for want in [
        "id=nixmox_tfproj_solo",
        "schedule=sun+02%3A30",
        "vmid=912",
        "storage=local",
        "prune-backups=keep-last%3D7",
    ] {
        assert!(jobs[0].2.contains(want), "{want}: {jobs:?}");
    }

    fake.clear_requests();
    let out = lab.run(&["backup", "solo"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lists no new archive"),
        "{}",
        common::text(&out)
    );
    let vzdump: Vec<(String, String, String)> = fake
        .writes()
        .into_iter()
        .filter(|(_, p, _)| p.ends_with("/nodes/pve/vzdump"))
        .collect();
    assert_eq!(vzdump.len(), 1, "{vzdump:?}");
    assert!(
        vzdump[0].2.contains("vmid=912")
            && vzdump[0].2.contains("storage=local")
            && vzdump[0].2.contains("mode=snapshot"),
        "{vzdump:?}"
    );
    assert!(
        fake.requests()
            .iter()
            .any(|(m, p, _)| m == "GET" && p.contains("/tasks/UPID") && p.contains("vzdump")),
        "the task is awaited"
    );

    // `down solo`: listed as backed up first; the backup cannot be confirmed, so nothing goes.
    let out = lab.run(&["down", "solo", "--yes"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        err.contains("CT 912 (`solo`) on node pve")
            && err.contains("backed up first (vzdump to `local`, mode snapshot)")
            && err.contains("nothing was destroyed"),
        "{err}"
    );
    assert!(fake.cts().iter().any(|c| c["vmid"] == 912));

    // `--no-backup`: destroyed without one, as listed.
    let out = lab.run(&["down", "solo", "--yes", "--no-backup"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(err.contains("no backup (--no-backup)"), "{err}");
    assert!(!fake.cts().iter().any(|c| c["vmid"] == 912));
}

/// Issue 14: `nixmox restore SERVICE --from VOLID` asks first (exit 2 without a terminal or
/// `--yes`, nothing written), then stops the container, restores the backup over it
/// (`restore=1`, `force=1`), starts it and runs the service's health checks. The archive is put
/// on the storage through fakepve's Python API (`store_file`), as a vzdump would have left it.
#[test]
fn issue_14_restore_replaces_the_container_after_confirmation_and_checks_health() {
    let mut fake = Fake::start("127.0.0.145", json!({}));
    let lab = snapshot_lab(&fake, "{ mode: off }");
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let archive = "vzdump-lxc-912-2026_11_29-21_00_00.tar.zst";
    fake.call_kw(
        "store_file",
        json!(["local", archive, 1024]),
        json!({"content": "backup"}),
    );
    let volid = format!("local:backup/{archive}");

    fake.clear_requests();
    let out = lab.run(&["restore", "solo", "--from", &volid], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --yes to restore"),
        "{}",
        common::text(&out)
    );
    assert_eq!(fake.writes(), vec![]);

    let out = lab.run(
        &[
            "restore",
            "solo",
            "--from",
            "local:vztmpl/x.tar.xz",
            "--yes",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));

    let out = lab.run(&["restore", "solo", "--from", &volid, "--yes"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        err.contains(&format!(
            "CT 912 (`solo`) restored from {volid} and started"
        )) && err.contains("health:"),
        "{err}"
    );
    let writes: Vec<String> = fake
        .writes()
        .into_iter()
        .map(|(m, p, b)| format!("{m} {p} {b}"))
        .collect();
    let stop = writes
        .iter()
        .position(|w| w.contains("/lxc/912/status/stop"));
    let restore = writes
        .iter()
        .position(|w| w.starts_with("POST /api2/json/nodes/pve/lxc ") && w.contains("restore=1"));
    let start = writes
        .iter()
        .position(|w| w.contains("/lxc/912/status/start"));
    assert!(
        stop < restore && restore < start && stop.is_some(),
        "{writes:?}"
    );
    let r = &writes[restore.unwrap()];
    assert!(r.contains("force=1") && r.contains("vmid=912"), "{r}");
    let ct = fake.cts().into_iter().find(|c| c["vmid"] == 912).unwrap();
    assert_eq!(ct["status"], "running", "{ct}");
}

/// Issue 14 with `infra.backend: terraform`: bpg/proxmox `~> 0.82` has no resource for
/// `/cluster/backup` jobs, so `tf:infra` keeps them in step through the PVE API exactly as the
/// `proxmox-api` backend does (after Terraform, with the project's token). fakepve checks the
/// `/cluster/backup` requests against PVE's schema (a wrong parameter is a 400) and answers a
/// listing without storing jobs, so the create request is what is checked here; the
/// create/update/remove decisions are unit-tested in `proxmox::backup`. A project without
/// backup jobs asks PVE nothing about them.
#[test]
fn issue_14_terraform_backend_keeps_backup_jobs_through_the_api() {
    let mut fake = Fake::start("127.0.0.146", json!({}));
    let (tmp, dir) = homelab(&fake);
    let cfg = dir.join("nixmox.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // The containers exist (made through the API, as Terraform would have made them); the
    // later steps fail here (no age keys), which does not matter to `tf:infra`.
    let out = nixmox_in(&dir, &["up", "dns", "--no-deps"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("done   tf:infra"),
        "{}",
        common::text(&out)
    );

    use_terraform_standin(tmp.path(), &cfg, &text);
    let placed: std::collections::BTreeMap<u64, String> = fake
        .cts()
        .iter()
        .map(|c| {
            (
                c["vmid"].as_u64().unwrap(),
                c["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let config = nixmox_in(&dir, &["config", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&config.stdout).unwrap();
    let services = doc["services"].as_object().unwrap();
    let containers: Vec<(String, u64, String)> = services
        .iter()
        .map(|(name, s)| {
            let vmid = s["host"]["vmid"].as_u64().unwrap();
            (name.replace('-', "_"), vmid, placed[&vmid].clone())
        })
        .collect();
    let state_dir = dir.join(".nixmox/terraform/infra");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join("terraform.tfstate"), tf_state(&containers)).unwrap();

    // No host.backup.schedule anywhere: PVE is not asked about jobs.
    fake.clear_requests();
    let out = nixmox_in(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("done   tf:infra"),
        "{}",
        common::text(&out)
    );
    assert!(
        !fake
            .requests()
            .iter()
            .any(|(_, p, _)| p.contains("/cluster/backup")),
        "{:?}",
        fake.requests()
    );

    // A schedule: the job is created through the API, named and commented as NixMox's.
    let manifest = dir.join("services/vaultwarden/manifest.yaml");
    edit(
        &manifest,
        "host:\n",
        "host:\n  backup: { storage: local, schedule: \"sun 02:30\", keep: 7 }\n",
    );
    fake.clear_requests();
    let out = nixmox_in(
        &dir,
        &["up", "dns", "--no-deps", "--force-step", "tf:infra"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("done   tf:infra")
            && stderr.contains("backup job nixmox_homelab_vaultwarden created"),
        "{stderr}"
    );
    let jobs: Vec<(String, String, String)> = fake
        .writes()
        .into_iter()
        .filter(|(_, p, _)| p.contains("/cluster/backup"))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, "POST");
    let vmid = services["vaultwarden"]["host"]["vmid"].as_u64().unwrap();
    for want in [
        "id=nixmox_homelab_vaultwarden".to_string(),
        "schedule=sun+02%3A30".to_string(),
        format!("vmid={vmid}"),
        "storage=local".to_string(),
        "prune-backups=keep-last%3D7".to_string(),
        "comment=managed+by+NixMox".to_string(),
    ] {
        assert!(jobs[0].2.contains(&want), "{want}: {jobs:?}");
    }
}
