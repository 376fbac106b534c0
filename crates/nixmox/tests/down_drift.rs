//! `nixmox drift` and `nixmox down` against the Terraform test project (Terraform 1.0.3 with
//! the null provider, offline, and the test deployer).

mod common;

use common::{text, Lab};

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
