//! The engine against real components: Terraform 1.0.3 with the null provider (offline, from
//! `.tools/`) and the test deployer `tests/fixtures/bin/deploy-test`, which stands in for
//! nixos-rebuild because NixOS activation cannot run on this machine. The deployer and a
//! wrapper around Terraform log every invocation, so the tests can see exactly which processes
//! a run started.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, Lab};

fn wait_for(mut cond: impl FnMut() -> bool, secs: u64) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 11: with a relative project directory (`cd project && nixmox up`, or `-C project`),
/// Terraform's state once resolved inside the build directory and the next render wiped it, so
/// an existing resource was created again under a new id.
#[test]
fn terraform_state_survives_a_render_when_run_from_inside_the_project_or_with_a_relative_dir() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let before = lab.resource_ids();
    let bucket = "module.bucket_0_0.null_resource.bucket[0]";
    assert!(before.contains_key(bucket), "{before:?}");
    assert!(
        Lab::state_files(&lab.project.join(".nixmox/build")).is_empty(),
        "Terraform state inside the build directory"
    );

    // Add one resource to the service's module, and run again with a relative `-C`.
    let module = lab.project.join("services/app/terraform/bucket/main.tf");
    let mut text_of_module = std::fs::read_to_string(&module).unwrap();
    text_of_module.push_str("\nresource \"null_resource\" \"extra\" {}\n");
    std::fs::write(&module, text_of_module).unwrap();
    let out = lab.run_relative(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let after = lab.resource_ids();
    assert!(
        after.contains_key("module.bucket_0_0.null_resource.extra"),
        "{after:?}"
    );
    assert_eq!(
        before[bucket], after[bucket],
        "the existing resource was created again"
    );
    for (addr, id) in &before {
        assert_eq!(after.get(addr), Some(id), "{addr} changed id");
    }
    assert!(Lab::state_files(&lab.project.join(".nixmox/build")).is_empty());
}

#[test]
fn first_up_applies_second_skips_everything_and_a_change_reapplies_only_its_service() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    assert!(calls.iter().any(|c| c == "terraform init"), "{calls:?}");
    assert!(calls.iter().any(|c| c == "terraform apply"), "{calls:?}");
    for host in ["app", "worker", "solo"] {
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with(&format!("start {host} "))),
            "{host} not deployed: {calls:?}"
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STEP") && err.contains("RESULT") && err.contains("DURATION"),
        "summary table: {err}"
    );
    // The sensitive output is recorded only as a hash.
    let db = std::fs::read(lab.project.join(".nixmox/state.db")).unwrap();
    let wal = std::fs::read(lab.project.join(".nixmox/state.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !String::from_utf8_lossy(bytes).contains("canary-"),
            "a sensitive output is in the state store in clear"
        );
    }

    // Nothing changed: no process at all, and quick.
    lab.clear();
    let start = Instant::now();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.invocations().is_empty(),
        "a no-op up started processes: {:?}",
        lab.invocations()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // (That run re-rendered with the outputs the first one recorded.) Another no-op run leaves
    // the build tree as it is: nothing rewritten.
    let host_file = lab.project.join(".nixmox/build/nix/hosts/app.nix");
    let written = std::fs::metadata(&host_file).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.invocations().is_empty(), "{:?}", lab.invocations());
    assert_eq!(
        std::fs::metadata(&host_file).unwrap().modified().unwrap(),
        written,
        "a no-op up rewrote the build tree"
    );

    // Change app's Terraform variable: app's Terraform re-applies and app's later steps run;
    // worker and solo stay untouched.
    let manifest = lab.project.join("services/app/manifest.yaml");
    let m = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("size: 3", "size: 4");
    std::fs::write(&manifest, m).unwrap();
    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    assert!(calls.iter().any(|c| c == "terraform apply"), "{calls:?}");
    assert!(
        calls.iter().any(|c| c.starts_with("start app ")),
        "{calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("start worker ") || c.starts_with("start solo ")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c == "terraform init"),
        "init again although providers did not change: {calls:?}"
    );

    // History and logs.
    let h = lab.history();
    assert_eq!(h["runs"].as_array().unwrap().len(), 4);
    assert_eq!(h["runs"][0]["result"], "success");
    let logs = lab.run(&["logs", "tf:service-infra:app"], &[]);
    assert!(logs.status.success(), "{}", text(&logs));
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("terraform"),
        "{}",
        text(&logs)
    );
}

#[test]
fn dry_run_explains_and_executes_nothing() {
    let lab = Lab::new();
    let out = lab.run(&["up", "--dry-run"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("run    nix:service-config:app"), "{stdout}");
    assert!(stdout.contains("never run before"), "{stdout}");
    assert!(lab.invocations().is_empty());
    assert!(
        !lab.project.join(".nixmox/state.db").exists(),
        "dry run created state"
    );
}

#[test]
fn a_failed_deploy_stops_only_its_dependents() {
    let lab = Lab::new();
    let out = lab.run(&["up", "--parallel", "4"], &[("DEPLOY_FAIL_HOST", "app")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nix:service-config:app"), "{err}");
    assert!(
        err.contains("activation of app failed"),
        "the deployer's own message: {err}"
    );
    let calls = lab.invocations();
    assert!(
        calls.iter().any(|c| c.starts_with("end solo ")),
        "the independent service deployed: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("start worker ")),
        "worker depends on app: {calls:?}"
    );
    // The next run retries what failed and skips what succeeded.
    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    assert!(
        calls.iter().any(|c| c.starts_with("start app ")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("start solo ")),
        "{calls:?}"
    );
}

#[test]
fn independent_services_deploy_in_parallel_within_the_limit() {
    let lab = Lab::new();
    let out = lab.run(&["up", "--parallel", "4"], &[("DEPLOY_SLEEP", "1")]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    let pos = |prefix: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing: {calls:?}"))
    };
    // solo has no path to app: its deploy runs while app's Terraform step is still running.
    assert!(pos("start solo ") < pos("terraform output"), "{calls:?}");
    // worker waits for app (its verify) before its first step.
    assert!(pos("start worker ") > pos("end app "), "{calls:?}");
}

#[test]
fn a_hanging_step_times_out_with_a_clear_error() {
    let lab = Lab::new();
    let start = Instant::now();
    let out = lab.run(&["up", "--timeout", "2s"], &[("DEPLOY_HANG_HOST", "solo")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nix:service-config:solo") && err.contains("timed out"),
        "{err}"
    );
}

#[test]
fn a_terraform_failure_stops_only_its_dependents() {
    let lab = Lab::new();
    let module = lab.project.join("services/worker/terraform/hook/main.tf");
    let broken = std::fs::read_to_string(&module)
        .unwrap()
        .replace("var.target", "var.undeclared");
    std::fs::write(&module, broken).unwrap();
    let out = lab.run(&["up"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tf:service-config:worker"), "{err}");
    assert!(err.contains("undeclared"), "Terraform's own message: {err}");
    assert!(err.lines().count() < 80, "not a wall of output");
    let calls = lab.invocations();
    assert!(
        calls.iter().any(|c| c.starts_with("end solo ")),
        "{calls:?}"
    );
}

#[test]
fn a_second_up_is_refused_while_one_runs() {
    let lab = Lab::new();
    let mut first = lab.spawn(&["up"], &[("DEPLOY_SLEEP", "4")]);
    wait_for(
        || lab.invocations().iter().any(|c| c.starts_with("start ")),
        60,
    );
    let second = lab.run(&["up"], &[]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("locked by pid") && err.contains(&first.id().to_string()),
        "names the holder: {err}"
    );
    assert!(first.wait().unwrap().success());
}

#[test]
fn kill_9_mid_run_then_up_converges() {
    let lab = Lab::new();
    let mut first = lab.spawn(&["up", "--parallel", "1"], &[("DEPLOY_SLEEP", "2")]);
    wait_for(
        || lab.invocations().iter().any(|c| c.starts_with("start ")),
        60,
    );
    unsafe_kill(first.id(), 9);
    let _ = first.wait();
    // The lock of the dead process is taken over; the run converges.
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale lock"),
        "{}",
        text(&out)
    );
    let again = lab.run(&["plan", "--detailed-exitcode"], &[]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "everything recorded after convergence: {}",
        text(&again)
    );
    let h = lab.history();
    let results: Vec<&str> = h["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["success", "interrupted"]);
}

#[test]
fn ctrl_c_lets_running_steps_finish_records_and_exits_130() {
    let lab = Lab::new();
    let run = lab.spawn(&["up", "--parallel", "1"], &[("DEPLOY_SLEEP", "2")]);
    wait_for(
        || lab.invocations().iter().any(|c| c.starts_with("start ")),
        60,
    );
    unsafe_kill(run.id(), 2);
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let calls = lab.invocations();
    let started: Vec<&String> = calls.iter().filter(|c| c.starts_with("start ")).collect();
    let ended: Vec<&String> = calls.iter().filter(|c| c.starts_with("end ")).collect();
    assert_eq!(
        started.len(),
        ended.len(),
        "the running deploy finished: {calls:?}"
    );
    assert_eq!(
        started.len(),
        1,
        "nothing new started after Ctrl-C: {calls:?}"
    );
    let h = lab.history();
    assert_eq!(h["runs"][0]["result"], "interrupted");
    // The lock was released and the next run continues.
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn json_progress_is_one_object_per_line() {
    let lab = Lab::new();
    let out = lab.run(&["up", "--format", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "run_started");
    assert!(lines.iter().all(|l| l["version"] == 1));
    assert!(lines
        .iter()
        .any(|l| l["event"] == "step_finished" && l["step"] == "nix:service-config:app"));
    assert_eq!(lines.last().unwrap()["event"], "summary");
}

fn unsafe_kill(pid: u32, sig: i32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_configured_backend_keeps_each_workspace_state_where_it_says() {
    let lab = Lab::new();
    let states = lab.project.parent().unwrap().join("states");
    let yaml = lab.project.join("nixmox.yaml");
    let mut config = std::fs::read_to_string(&yaml).unwrap();
    config.push_str(&format!(
        "terraform:\n  backend:\n    type: local\n    config: {{ path: \"{}/{{workspace}}.tfstate\" }}\n",
        states.display()
    ));
    std::fs::write(&yaml, config).unwrap();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        states.join("app-infra.tfstate").is_file(),
        "{:?}",
        std::fs::read_dir(&states).map(|d| d.count())
    );
    assert!(states.join("worker-config.tfstate").is_file());
    // The second run finds the state there: nothing to do.
    lab.clear();
    let out = lab.run(&["up", "--force"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !lab.invocations().iter().any(|c| c == "terraform apply"),
        "{:?}",
        lab.invocations()
    );
}

#[test]
fn an_unhealthy_deploy_is_rolled_back_and_the_run_fails() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    // app: a changed variable (its Terraform step runs again) and a startup check that fails.
    let manifest = lab.project.join("services/app/manifest.yaml");
    let m = std::fs::read_to_string(&manifest).unwrap();
    let changed = m.replace("size: 3", "size: 4").replace(
        "startup: \"test -e /etc/hostname\"",
        "startup: \"false\"\n    retries: 1\n    interval: 1s",
    );
    assert_ne!(m, changed);
    std::fs::write(&manifest, changed).unwrap();

    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let calls = lab.invocations();
    let rollback = calls
        .iter()
        .position(|c| c.starts_with("rollback app "))
        .unwrap_or_else(|| panic!("rollback-test not run for app: {calls:?}"));
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("rollback ") && !c.starts_with("rollback app ")),
        "only app is rolled back: {calls:?}"
    );
    assert!(
        calls[rollback..].iter().any(|c| c == "terraform apply"),
        "the app's Terraform step is re-applied from its recorded inputs: {calls:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ROLLED BACK nix:service-config:app") && err.contains("rolled back:"),
        "{}",
        text(&out)
    );
    assert_eq!(lab.history()["runs"][0]["result"], "rolled_back");
    // The restored step is recorded at its previous inputs, so the new ones differ from its
    // record; but (issue 14) what was rolled back is held, not repeated with the same input:
    // here the Terraform change (the deploy is unchanged once its outputs are restored).
    let dry = lab.run(&["up", "--dry-run"], &[]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.lines().any(|l| l.starts_with("  held")
            && l.contains("tf:service-infra:app")
            && l.contains("failed in run 2")
            && l.contains("nix:service-config:app after it applied")),
        "{}",
        text(&dry)
    );

    lab.clear();
    let out = lab.run(
        &[
            "up",
            "--no-rollback",
            "--force-step",
            "tf:service-infra:app",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let calls = lab.invocations();
    assert!(
        !calls.iter().any(|c| c.starts_with("rollback ")),
        "--no-rollback: {calls:?}"
    );
    assert_eq!(lab.history()["runs"][0]["result"], "failed");
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    common::check(
        Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.email=test@nixmox", "-c", "user.name=test"])
            .args(args),
        "git",
    )
}

fn nix_eval(reference: &str) -> std::process::Output {
    Command::new(common::tool("nix", "nix"))
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--raw",
        ])
        .arg(reference)
        .output()
        .unwrap()
}

/// Issue 11: most projects live in git with `.nixmox/` ignored (as `nixmox init` writes it).
/// A bare path to the build flake is read by Nix as the enclosing git repository, which does
/// not have the ignored build; the deployers get a `path:` reference, which works. The
/// deployer here evaluates each host with the real Nix from that reference (activation cannot
/// run on this machine).
#[test]
fn a_git_project_with_the_build_ignored_deploys_from_a_path_flake_reference() {
    let lab = Lab::new();
    let yaml = lab.project.join("nixmox.yaml");
    let config = std::fs::read_to_string(&yaml).unwrap().replace(
        r#"command: ["deploy-test", "{host}", "{ip}", "{flake}"]"#,
        r#"command: ["deploy-nix-eval", "{host}", "{flake}"]"#,
    );
    assert!(config.contains("deploy-nix-eval"));
    std::fs::write(&yaml, config).unwrap();
    git(&lab.project, &["init", "-q"]);
    std::fs::write(lab.project.join(".gitignore"), ".nixmox/\n").unwrap();
    git(&lab.project, &["add", "-A"]);
    git(&lab.project, &["commit", "-q", "-m", "project"]);

    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    for host in ["app", "worker", "solo"] {
        assert!(
            calls.contains(&format!("eval {host} stub-toplevel-{host}")),
            "{host} was not evaluated from the flake reference: {calls:?}"
        );
    }
    // The lock is the project's, to commit: not ignored, not inside the build.
    let status = git(&lab.project, &["status", "--porcelain"]);
    assert!(status.contains("?? flake.lock"), "{status}");

    // What the fix is about: the bare path does not evaluate in a git repository.
    let build = lab.project.join(".nixmox/build/nix");
    let bare = nix_eval(&format!(
        "{}#nixosConfigurations.app.config.networking.hostName",
        build.display()
    ));
    assert!(
        !bare.status.success(),
        "a bare path evaluated in a git repo"
    );
    let reference = nix_eval(&format!(
        "path:{}#nixosConfigurations.app.config.networking.hostName",
        build.display()
    ));
    assert_eq!(String::from_utf8_lossy(&reference.stdout), "app");
}

/// Issue 11: the flake's inputs are pinned in the project's `flake.lock`: created by the first
/// `up`, never touched by a no-op one, moved by `nixmox update` (old → new printed; the hosts
/// built from the input redeploy with that reason) and following a changed `nix.inputs` URL.
#[test]
fn flake_lock_is_created_once_updated_on_request_and_follows_overrides() {
    let lab = Lab::new();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.invocations().iter().any(|c| c == "nix flake lock"),
        "{:?}",
        lab.invocations()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked flake inputs"));
    let lock = std::fs::read_to_string(lab.project.join("flake.lock")).unwrap();
    assert!(lock.contains("nix-stubs/nixpkgs"), "{lock}");
    assert_eq!(
        std::fs::read_to_string(lab.project.join(".nixmox/build/nix/flake.lock")).unwrap(),
        lock,
        "the build flake builds from the project's lock"
    );

    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.invocations().is_empty(), "{:?}", lab.invocations());

    // nixpkgs moves on (the stand-in changes); only `update` takes it into the lock.
    std::fs::write(
        lab.project.join("nix-stubs/nixpkgs/NEWS"),
        "a new revision\n",
    )
    .unwrap();
    let out = lab.run(&["update", "sops-nix-typo"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(lab.project.join("flake.lock")).unwrap(),
        lock
    );
    let out = lab.run(&["update", "nixpkgs"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let (old, new) = printed
        .trim()
        .strip_prefix("nixpkgs: ")
        .and_then(|r| r.split_once(" → "))
        .unwrap_or_else(|| panic!("no `nixpkgs: old → new` line: {printed}"));
    assert_ne!(old, new);
    let plan = lab.run(&["plan"], &[]);
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    let reason = format!("nixpkgs updated {old} → {new}");
    assert_eq!(
        plan_text.matches(&reason).count(),
        3,
        "every host's nix step, and nothing else: {plan_text}"
    );
    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = lab.invocations();
    for host in ["app", "worker", "solo"] {
        assert!(calls
            .iter()
            .any(|c| c.starts_with(&format!("start {host} "))));
    }
    // Later steps of a redeployed service re-run (and find nothing to apply).
    assert!(!calls.iter().any(|c| c == "terraform apply"), "{calls:?}");

    // A fork of nixpkgs given in nixmox.yaml follows into the lock on the next up.
    common::copy_dir(
        &lab.project.join("nix-stubs/nixpkgs"),
        &lab.project.join("nix-stubs/nixpkgs-fork"),
    );
    let yaml = lab.project.join("nixmox.yaml");
    let text_of_yaml = std::fs::read_to_string(&yaml).unwrap().replace(
        "path:./nix-stubs/nixpkgs\"",
        "path:./nix-stubs/nixpkgs-fork\"",
    );
    std::fs::write(&yaml, text_of_yaml).unwrap();
    lab.clear();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.invocations().iter().any(|c| c == "nix flake lock"));
    let lock = std::fs::read_to_string(lab.project.join("flake.lock")).unwrap();
    assert!(lock.contains("nix-stubs/nixpkgs-fork"), "{lock}");
}

/// Issue "Shape": `nixmox render` wrote a different tree from the one `up` deploys, without the
/// Terraform outputs earlier runs recorded (which a service's `tf:service-config` workspace
/// gets as `locals`). After an `up` that rendered with recorded outputs, `render` writes the
/// same tree.
#[test]
fn render_after_up_writes_the_tree_up_deployed() {
    use nixmox::state::{OutputValue, RunResult, StepFinish, StepStatus, Store};
    use nixmox_core::ids::ServiceName;
    use nixmox_core::plan::Phase;
    use nixmox_core::step_id::StepId;

    let lab = Lab::new();
    // A service-config workspace, which takes the service-infra step's recorded outputs.
    let app = lab.project.join("services/app");
    common::copy_dir(
        &lab.project.join("services/worker/terraform/hook"),
        &app.join("terraform/hook"),
    );
    let manifest = std::fs::read_to_string(app.join("manifest.yaml"))
        .unwrap()
        .replace(
            "  terraform:\n    phase: service-infra",
            "  terraform:\n    - phase: service-infra",
        )
        .replace("    modules: [./terraform/bucket]", "      modules: [./terraform/bucket]")
        .replace("    variables:\n      greeting", "      variables:\n        greeting")
        .replace("      size: 3", "        size: 3")
        .replace(
            "  health:",
            "    - phase: service-config\n      modules: [./terraform/hook]\n      variables: { target: app.tf.lan }\n  health:",
        );
    std::fs::write(app.join("manifest.yaml"), manifest).unwrap();
    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));

    // The fixture's modules output nothing at the workspace's root (only generated OIDC and
    // database resources do, which need Authentik and PostgreSQL): the service-infra step's
    // record gets an output as such a step would leave it, at its same input.
    let mut store = Store::open(&lab.project.join(".nixmox/state.db")).unwrap();
    let infra =
        StepId::of_service(Phase::TfServiceInfra, &ServiceName::new("app").unwrap()).unwrap();
    let record = store.record().unwrap().steps[infra.as_str()].clone();
    let run = store.start_run(&[]).unwrap();
    let output = OutputValue {
        name: "client_id".into(),
        value: serde_json::json!("app-client"),
        sensitive: false,
    };
    let fin = StepFinish {
        step_id: infra,
        input_hash: record.hash,
        parts: record.parts,
        status: StepStatus::Changed,
        duration_ms: 1,
        error: None,
        outputs: vec![output],
        rendered: None,
        refused: None,
        held: None,
        snapshots: Vec::new(),
    };
    store.step_finished(run, &fin).unwrap();
    store.finish_run(run, RunResult::Success, "").unwrap();
    drop(store);

    let out = lab.run(&["up"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let deployed = nixmox::engine::read_inputs(&lab.project.join(".nixmox/build"));
    let config = String::from_utf8_lossy(&deployed["terraform/services/app/config/main.tf.json"])
        .into_owned();
    assert!(config.contains("app-client"), "{config}");

    let out = lab.run(&["render", "--out", "rendered"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let rendered = nixmox::engine::read_inputs(&lab.project.join("rendered"));
    assert_eq!(
        deployed.keys().collect::<Vec<_>>(),
        rendered.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &deployed {
        assert!(
            rendered[path] == *bytes,
            "{path} differs:\n{}\n---\n{}",
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&rendered[path])
        );
    }
}
