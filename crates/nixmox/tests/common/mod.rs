//! The harness shared by the integration tests that run `nixmox` against the Terraform test
//! project (Terraform 1.0.3 with the null provider, offline, from `.tools/`, and the test
//! deployer `tests/fixtures/bin/deploy-test`).

// Each test binary uses a different part of this harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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

    pub fn cmd(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nixmox"));
        c.arg("-C").arg(&self.project).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.cmd(args, extra).output().unwrap()
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

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
