//! Issue 12's Terraform contract check: every `*.tf.json` the renderers write for the example,
//! the fixtures and random projects is read against the providers' schemas at the pinned
//! versions (`tests/contracts/terraform/`, transcribed from the providers' Go sources by
//! `scripts/extract-tf-contracts`); and the check fails on planted mistakes.

use crate::common;

use std::path::Path;

use nixmox_core::providers::authentik::AUTHENTIK_PROVIDER;
use nixmox_core::providers::postgresql::POSTGRESQL_PROVIDER;
use nixmox_core::render::terraform::PROXMOX_PROVIDER;
use nixmox_core::render::{render, Outputs};
use serde_json::{json, Value};

use common::contract::{check_file, check_file_with, check_rendered, contracts};

fn rendered_of(dir: &Path) -> Vec<nixmox_core::RenderedFile> {
    let loaded = common::load_dir(dir);
    let Some(p) = loaded.project else {
        panic!(
            "{} does not load:\n{}",
            dir.display(),
            nixmox_core::diag::render_all(&loaded.diagnostics)
        );
    };
    render(&p, &Outputs::default()).files
}

#[test]
fn contracts_name_the_pinned_versions_and_their_sources() {
    let c = contracts();
    for (name, (source, constraint)) in [
        ("proxmox", PROXMOX_PROVIDER),
        ("authentik", AUTHENTIK_PROVIDER),
        ("postgresql", POSTGRESQL_PROVIDER),
    ] {
        assert_eq!(c[name]["source"], source);
        let tag = c[name]["tag"].as_str().unwrap().trim_start_matches('v');
        assert!(
            constraint.starts_with("~> ")
                && tag.starts_with(
                    constraint
                        .trim_start_matches("~> ")
                        .rsplit_once('.')
                        .unwrap()
                        .0
                ),
            "{name}: contract read at {tag}, pinned {constraint}"
        );
        assert_eq!(c[name]["commit"].as_str().unwrap().len(), 40);
        for kind in ["resources", "data_sources"] {
            for (rtype, r) in c[name][kind].as_object().unwrap() {
                assert!(
                    r["source_file"].as_str().unwrap().ends_with(".go"),
                    "{rtype}"
                );
                assert!(!r["arguments"].as_object().unwrap().is_empty(), "{rtype}");
            }
        }
    }
}

#[test]
fn the_example_keeps_the_contracts() {
    let files = rendered_of(&common::repo_root().join("examples/homelab"));
    assert!(
        files
            .iter()
            .filter(|f| f.path.ends_with(".tf.json"))
            .count()
            >= 4
    );
    let errors = check_rendered(&files);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_fixtures_keep_the_contracts() {
    let fixtures = common::repo_root().join("tests/fixtures");
    let mut dirs = vec![
        fixtures.join("seed"),
        fixtures.join("tf-project"),
        fixtures.join("render-safety"),
    ];
    // The hostile and warning fixtures that load (some are meant to be refused).
    for group in ["hostile", "warnings"] {
        for e in std::fs::read_dir(fixtures.join(group)).unwrap() {
            let d = e.unwrap().path();
            if common::load_dir(&d).project.is_some() {
                dirs.push(d);
            }
        }
    }
    let mut checked = 0;
    for d in dirs {
        let files = rendered_of(&d);
        checked += files
            .iter()
            .filter(|f| f.path.ends_with(".tf.json"))
            .count();
        let errors = check_rendered(&files);
        assert!(errors.is_empty(), "{}:\n{}", d.display(), errors.join("\n"));
    }
    assert!(checked > 10, "only {checked} workspaces checked");
}

/// A workspace of the example, as JSON, for planting mistakes in.
fn example_workspace(path: &str) -> Value {
    let files = rendered_of(&common::repo_root().join("examples/homelab"));
    let f = files.iter().find(|f| f.path == path).unwrap();
    serde_json::from_str(&f.contents).unwrap()
}

fn breaches(v: &Value) -> String {
    check_file("planted.tf.json", &v.to_string()).join("\n")
}

#[test]
fn planted_mistakes_fail_the_check() {
    let infra = example_workspace("terraform/infra/main.tf.json");
    let ct = "/resource/proxmox_virtual_environment_container/postgresql";
    assert_eq!(breaches(&infra), "");

    let mut v = infra.clone();
    v.pointer_mut(ct).unwrap()["hostame"] = json!("typo");
    assert!(
        breaches(&v).contains("unknown argument `hostame`"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v.pointer_mut(ct)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("node_name");
    assert!(
        breaches(&v).contains("missing required argument `node_name`"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v.pointer_mut(&format!("{ct}/operating_system"))
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("template_file_id");
    assert!(
        breaches(&v).contains("operating_system[0]: missing required argument `template_file_id`"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v.pointer_mut(ct).unwrap()["tags"] = json!("nixmox");
    assert!(
        breaches(&v).contains(".tags: expected list"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v.pointer_mut(ct).unwrap()["cpu"] = json!([{"cores": 1}, {"cores": 2}]);
    assert!(
        breaches(&v).contains(".cpu: 2 item(s), at most 1 allowed"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v.pointer_mut(&format!("{ct}/initialization/dns")).unwrap()["server"] = json!("10.0.0.1");
    assert!(
        breaches(&v).contains("`server` is deprecated"),
        "{}",
        breaches(&v)
    );

    let mut v = infra.clone();
    v["terraform"]["required_providers"]["proxmox"]["version"] = json!("~> 0.86.0");
    assert!(
        breaches(&v).contains("does not allow the contract's v0.82.1"),
        "{}",
        breaches(&v)
    );

    let auth = example_workspace("terraform/auth-core/main.tf.json");
    assert_eq!(breaches(&auth), "");
    let mut v = auth.clone();
    v["data"]["authentik_certificate_key_pair"]["signing"]["certificate_data"] = json!("x");
    assert!(
        breaches(&v).contains("`certificate_data` is read-only"),
        "{}",
        breaches(&v)
    );
    let mut v = auth.clone();
    v["resource"]["authentik_outpost_provider_attachment"]["x"] = json!({"outpost": "o"});
    assert!(
        breaches(&v).contains("missing required argument `protocol_provider`"),
        "{}",
        breaches(&v)
    );
    let mut v = auth;
    v["resource"]["authentik_outpost_x"] = json!({"x": {}});
    assert!(
        breaches(&v).contains("resource type `authentik_outpost_x` has no contract"),
        "{}",
        breaches(&v)
    );
}

/// bpg/proxmox requires at least one DNS server from v0.86 (`MinItems: 1`, read in
/// `proxmoxtf/resource/container/container.go` at v0.86.0): against such a contract the check
/// refuses an empty list, which the renderer no longer writes (issue 12, item 2).
#[test]
fn an_empty_list_where_one_item_is_required_fails_the_check() {
    let mut c = contracts();
    c.get_mut("proxmox").unwrap()["resources"]["proxmox_virtual_environment_container"]
        ["arguments"]["initialization"]["block"]["dns"]["block"]["servers"]["min_items"] = json!(1);
    c.get_mut("proxmox").unwrap()["tag"] = json!("v0.82.1");
    let mut v = example_workspace("terraform/infra/main.tf.json");
    v["resource"]["proxmox_virtual_environment_container"]["postgresql"]["initialization"]["dns"]
        ["servers"] = json!([]);
    let errors = check_file_with(&c, "planted.tf.json", &v.to_string()).join("\n");
    assert!(
        errors.contains("initialization[0].dns[0].servers: 0 item(s), at least 1 required"),
        "{errors}"
    );
}
