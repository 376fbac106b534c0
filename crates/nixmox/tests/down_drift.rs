//! `nixmox drift` and `nixmox down` against the Terraform test project (Terraform 1.0.3 with
//! the null provider, offline, and the test deployer).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn real_terraform() -> PathBuf {
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

fn copy_dir(from: &Path, to: &Path) {
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
#[allow(dead_code)]
struct Lab {
    _tmp: tempfile::TempDir,
    project: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Lab {
    fn new() -> Lab {
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

    fn cmd(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
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

    fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.cmd(args, extra).output().unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn state(lab: &Lab, step_slug: &str) -> serde_json::Value {
    let path = lab
        .project
        .join(format!(".nixmox/terraform/{step_slug}/terraform.tfstate"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn resources(lab: &Lab, step_slug: &str) -> usize {
    state(lab, step_slug)["resources"].as_array().unwrap().len()
}

fn recorded_steps(lab: &Lab) -> Vec<String> {
    let db = lab.project.join(".nixmox/state.db");
    let store = nixmox::state::Store::open(&db).unwrap();
    store.record().unwrap().steps.into_keys().collect()
}

#[test]
fn drift_is_clean_after_up_and_names_a_resource_changed_behind_our_back() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));

    let out = lab.run(&["drift"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tf:service-config:worker: no drift"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("custom deployer"), "{}", text(&out));

    // Behind NixMox's back: the hook's object is gone as far as its provider can tell (an
    // empty id makes the null provider's refresh drop it).
    let path = lab
        .project
        .join(".nixmox/terraform/service-config--worker/terraform.tfstate");
    let mut st = state(&lab, "service-config--worker");
    for r in st["resources"].as_array_mut().unwrap() {
        if r["type"] == "null_resource" {
            r["instances"][0]["attributes"]["id"] = "".into();
        }
    }
    st["serial"] = (st["serial"].as_u64().unwrap() + 1).into();
    std::fs::write(&path, st.to_string()).unwrap();

    let out = lab.run(&["drift"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tf:service-config:worker:") && stdout.contains("null_resource.hook"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("tf:service-infra:app: no drift"),
        "{}",
        text(&out)
    );

    let out = lab.run(&["drift", "--format", "json"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["drifted"], true);
}

#[test]
fn down_removes_exactly_a_service_and_refuses_to_orphan_a_dependent() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(resources(&lab, "service-config--worker") > 0);
    assert!(resources(&lab, "service-infra--app") > 0);

    // app alone: worker depends on it.
    let out = lab.run(&["down", "app"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`app`") && err.contains("`worker`"),
        "{}",
        text(&out)
    );
    assert!(resources(&lab, "service-infra--app") > 0);

    let out = lab.run(&["down", "worker"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(resources(&lab, "service-config--worker"), 0);
    assert!(resources(&lab, "service-infra--app") > 0);
    let steps = recorded_steps(&lab);
    assert!(
        !steps.iter().any(|s| s.ends_with(":worker")),
        "worker's steps still recorded: {steps:?}"
    );
    assert!(
        steps.iter().any(|s| s == "tf:service-infra:app"),
        "{steps:?}"
    );
    // Now app may go.
    let out = lab.run(&["down", "app"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(resources(&lab, "service-infra--app"), 0);
}
