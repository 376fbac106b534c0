//! The destroy guard (issue 11, section 4) through the binary, run from inside the project
//! directory as users do: a saved Terraform plan that deletes or replaces a protected resource
//! is refused (exit 1, nothing applied, the refusal remembered for `plan`) unless
//! `up --allow-destroy`; unprotected replacements are applied as before. Terraform 1.0.3 with
//! the null provider, offline, from `.tools/`.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{text, Lab};

/// `nixmox ARGS` run from inside the project directory, as people do (the `Lab`'s default).
fn in_project(lab: &Lab, args: &[&str]) -> Output {
    lab.run(args, &[])
}

/// The ids of the resources of a workspace's Terraform state, by address (`module.m.type.name`
/// with `[i]` for counted instances).
fn state_ids(project: &Path, slug: &str) -> Vec<(String, String)> {
    let path = project.join(format!(".nixmox/terraform/{slug}/terraform.tfstate"));
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let mut ids = Vec::new();
    for r in state["resources"].as_array().unwrap() {
        let base = format!(
            "{}{}.{}",
            r["module"]
                .as_str()
                .map(|m| format!("{m}."))
                .unwrap_or_default(),
            r["type"].as_str().unwrap(),
            r["name"].as_str().unwrap()
        );
        for i in r["instances"].as_array().unwrap() {
            let addr = match i.get("index_key") {
                Some(k) => format!("{base}[{k}]"),
                None => base.clone(),
            };
            ids.push((addr, i["attributes"]["id"].as_str().unwrap().to_string()));
        }
    }
    ids.sort();
    ids
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {}", path.display());
    fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn issue_11_a_protected_replacement_is_refused_until_allow_destroy() {
    let lab = Lab::new();
    let manifest = lab.project.join("services/worker/manifest.yaml");
    edit(
        &manifest,
        "    variables: { target: app.tf.lan }",
        "    variables: { target: app.tf.lan }\n    protect: [null_resource.hook]",
    );
    let out = in_project(&lab, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    let slug = "service-config--worker";
    let before = state_ids(&lab.project, slug);
    assert_eq!(before.len(), 1, "{before:?}");

    // A changed trigger replaces the protected resource: refused, nothing applied.
    edit(&manifest, "target: app.tf.lan", "target: other.tf.lan");
    lab.clear();
    let out = in_project(&lab, &["up"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module.hook_0_0.null_resource.hook (replace, forced by triggers)"),
        "{err}"
    );
    assert!(err.contains("--allow-destroy"), "{err}");
    let calls = lab.invocations();
    assert!(calls.iter().any(|c| c == "terraform show"), "{calls:?}");
    assert!(
        !calls.iter().any(|c| c == "terraform apply"),
        "a refused plan was applied: {calls:?}"
    );
    assert_eq!(state_ids(&lab.project, slug), before, "the state changed");
    // The deploy after it did not run either.
    assert!(
        !calls.iter().any(|c| c.starts_with("start worker ")),
        "{calls:?}"
    );

    // `plan` and `up --dry-run` now know the step needs the flag.
    let out = in_project(&lab, &["plan"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("needs --allow-destroy: its last run was refused because the plan would delete or replace module.hook_0_0.null_resource.hook (replace, forced by triggers)"),
        "{plan}"
    );
    let out = in_project(&lab, &["plan", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["version"], 1);
    let step = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "tf:service-config:worker")
        .unwrap();
    assert_eq!(
        step["needs_allow_destroy"],
        serde_json::json!(["module.hook_0_0.null_resource.hook (replace, forced by triggers)"])
    );
    let others = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("needs_allow_destroy").is_some())
        .count();
    assert_eq!(others, 1, "{json}");
    let out = in_project(&lab, &["up", "--dry-run"]);
    let dry = String::from_utf8_lossy(&out.stdout);
    assert!(dry.contains("needs --allow-destroy"), "{dry}");

    // With the flag it is applied: a new id, and the note is gone.
    let out = in_project(&lab, &["up", "--allow-destroy"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = state_ids(&lab.project, slug);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].0, before[0].0);
    assert_ne!(after[0].1, before[0].1, "not replaced");
    let out = in_project(&lab, &["plan", "--format", "json"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("needs_allow_destroy"),
        "{}",
        text(&out)
    );
}

#[test]
fn issue_11_unprotected_replacements_apply_and_protected_types_refuse_deletes() {
    let lab = Lab::new();
    let manifest = lab.project.join("services/app/manifest.yaml");
    let out = in_project(&lab, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    let slug = "service-infra--app";
    let first = state_ids(&lab.project, slug);
    assert_eq!(first.len(), 3, "{first:?}");

    // Nothing of app's module is protected: its replacement is applied as before.
    edit(&manifest, "second line", "2nd line");
    let out = in_project(&lab, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    let second = state_ids(&lab.project, slug);
    assert_eq!(second.len(), 3);
    assert!(
        first.iter().zip(&second).all(|(a, b)| a.1 != b.1),
        "{first:?} {second:?}"
    );

    // A protected resource type: a delete (one instance fewer) is refused too.
    edit(
        &manifest,
        "      size: 3",
        "      size: 2\n    protect: null_resource",
    );
    let out = in_project(&lab, &["up"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("would delete protected resource(s)")
            && err.contains("module.bucket_0_0.null_resource.bucket[2] (delete)"),
        "{err}"
    );
    assert_eq!(state_ids(&lab.project, slug), second);

    // Undoing the edit undoes the need: the step is unchanged, no note.
    edit(
        &manifest,
        "      size: 2\n    protect: null_resource",
        "      size: 3\n    protect: null_resource",
    );
    let out = in_project(&lab, &["plan"]);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(!plan.contains("needs --allow-destroy"), "{plan}");
    let out = in_project(&lab, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn issue_11_protect_entries_are_checked_where_they_are_written() {
    let lab = Lab::new();
    let manifest = lab.project.join("services/worker/manifest.yaml");
    edit(
        &manifest,
        "    variables: { target: app.tf.lan }",
        "    variables: { target: app.tf.lan }\n    protect: [null_resource.hook, data.x.y, \"bad type\", module.m.null_resource.ok]",
    );
    let out = in_project(&lab, &["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface.terraform.protect[1]")
            && err.contains("`data.x.y` is a data source; data sources are never destroyed"),
        "{err}"
    );
    assert!(
        err.contains("interface.terraform.protect[2]")
            && err.contains("`bad type` is not a resource type"),
        "{err}"
    );
    assert!(err.contains("manifest.yaml:9:"), "{err}");
    assert!(
        !err.contains("protect[0]") && !err.contains("protect[3]"),
        "{err}"
    );
}
