//! Data-driven validation tests: every project under tests/fixtures/invalid must fail with
//! the diagnostics in its snapshot; every one under tests/fixtures/warnings must pass with
//! warnings; the seed's verbatim guacamole manifest and the example must validate; the hostile
//! projects under tests/fixtures/hostile are refused (issue 13).

use crate::common;

use std::fs;

use common::{load_dir, repo_root};
use nixmox_core::diag::render_all;

fn dirs(kind: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = fs::read_dir(repo_root().join("tests/fixtures").join(kind))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

#[test]
fn invalid_fixtures_fail_with_located_diagnostics() {
    let all = dirs("invalid");
    assert!(
        all.len() >= 40,
        "expected at least 40 invalid fixtures, found {}",
        all.len()
    );
    let mut failures = Vec::new();
    for dir in all {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let loaded = load_dir(&dir);
        let errors: Vec<_> = loaded.errors().collect();
        if errors.is_empty() || loaded.project.is_some() {
            failures.push(format!("{name}: expected an error, got none"));
            continue;
        }
        // A fixture holds one problem: the first error must say what `expect.txt` says it is.
        let rendered = render_all(&loaded.diagnostics);
        let expect = fs::read_to_string(dir.join("expect.txt")).unwrap_or_default();
        insta::assert_snapshot!(format!("invalid__{name}"), rendered, &expect);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Issue 13: the hostile projects (one per class) are refused with every problem located; the
/// diagnostics are snapshots. `render-escapes` is the one that validates (its rendering is
/// checked by the CLI tests).
#[test]
fn hostile_fixtures_are_refused_with_located_diagnostics() {
    for dir in dirs("hostile") {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let loaded = load_dir(&dir);
        if name == "render-escapes" {
            assert!(
                loaded.project.is_some(),
                "{}",
                render_all(&loaded.diagnostics)
            );
            continue;
        }
        assert!(loaded.project.is_none(), "{name}: expected errors");
        assert!(
            loaded
                .errors()
                .all(|d| d.span.is_some() && d.field.is_some()),
            "{name}: every error has a location and a field"
        );
        insta::assert_snapshot!(format!("hostile__{name}"), render_all(&loaded.diagnostics));
    }
}

/// Issue 13: a role is shared only when every service using it names the others.
#[test]
fn a_role_is_shared_only_both_ways() {
    let file = |path: &str, text: &str| nixmox_core::SourceFile {
        path: path.into(),
        bytes: text.as_bytes().to_vec(),
    };
    let load = |app: &str, worker: &str| {
        let sources = nixmox_core::Sources {
            config: Some(file(
                "nixmox.yaml",
                "project: p\ndomain: p.lan\nnetwork: { cidr: 10.1.0.0/24, gateway: 10.1.0.1 }\n",
            )),
            manifests: vec![
                file(
                    "services/pg/manifest.yaml",
                    "name: pg\nprovides: { database: { type: postgresql } }\n",
                ),
                file("services/app/manifest.yaml", app),
                file("services/worker/manifest.yaml", worker),
            ],
            lock: None,
        };
        nixmox_core::load(&sources, &|_| true)
    };
    let both = load(
        "name: app\ninterface:\n  db: { database: app, role: app, share_role_with: [worker] }\n",
        "name: worker\ninterface:\n  db: { database: jobs, role: app, share_role_with: [app] }\n",
    );
    assert!(both.project.is_some(), "{}", render_all(&both.diagnostics));
    let one = load(
        "name: app\ninterface:\n  db: { database: app, role: app }\n",
        "name: worker\ninterface:\n  db: { database: jobs, role: app, share_role_with: [app] }\n",
    );
    let errors: Vec<_> = one.errors().collect();
    assert_eq!(errors.len(), 1, "{}", render_all(&one.diagnostics));
    assert_eq!(errors[0].file, "services/app/manifest.yaml");
    assert!(errors[0].message.contains("also used by `worker`"));
}

#[test]
fn warning_fixtures_pass_with_warnings() {
    for dir in dirs("warnings") {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        // The project layout is the shell's to read; the CLI tests cover this one.
        if name == "service-dir-without-manifest" {
            continue;
        }
        let loaded = load_dir(&dir);
        assert!(
            loaded.errors().next().is_none(),
            "{name}: {}",
            render_all(&loaded.diagnostics)
        );
        assert!(
            loaded.warnings().next().is_some(),
            "{name}: expected a warning"
        );
        assert!(loaded.project.is_some());
        insta::assert_snapshot!(format!("warnings__{name}"), render_all(&loaded.diagnostics));
    }
}

#[test]
fn seed_guacamole_manifest_validates_verbatim() {
    let loaded = load_dir(&repo_root().join("tests/fixtures/seed"));
    assert!(
        loaded.errors().next().is_none(),
        "{}",
        render_all(&loaded.diagnostics)
    );
    let p = loaded.project.unwrap();
    let g = p.service("guacamole").unwrap();
    // The vision form means the same as the interface form.
    assert_eq!(g.dbs[0].database, "guacamole");
    assert_eq!(g.dbs[0].role, "guacamole");
    assert_eq!(g.proxies[0].domain.as_str(), "guac.nixmox.lan");
    assert!(g.proxies[0].authz);
    let oidc = g.auth.as_ref().unwrap().oidc.as_ref().unwrap();
    assert_eq!(oidc.client_id, "guacamole-client");
    assert_eq!(oidc.redirect_uris, ["https://guac.nixmox.lan/guacamole/"]);
    assert_eq!(g.auth.as_ref().unwrap().display_name, "Guacamole Provider");
    let kinds: Vec<_> = p
        .deps_of(p.index_of("guacamole").unwrap())
        .map(|e| (p.services[e.to].name.to_string(), e.kind.as_str()))
        .collect();
    assert!(
        kinds.contains(&("postgresql".to_string(), "db")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("caddy".to_string(), "proxy")), "{kinds:?}");
    assert!(
        kinds.contains(&("authentik".to_string(), "auth")),
        "{kinds:?}"
    );
}

#[test]
fn example_validates_and_resolves() {
    let p = common::example();
    assert_eq!(p.services.len(), 9);
    let config = nixmox_core::yaml_out::to_yaml(&nixmox_core::config_out::resolved(&p, &[]));
    insta::assert_snapshot!("example_config", config);
}

/// `config --format json` is streamed one service at a time (issue 17): the text must be exactly
/// the pretty JSON of the whole resolved tree, for all services and for a selection.
#[test]
fn streamed_config_json_is_the_resolved_tree() {
    let p = common::example();
    for only in [vec![], vec![0, 3]] {
        let tree = nixmox_core::config_out::resolved(&p, &only);
        let mut want = serde_json::to_string_pretty(&tree).unwrap();
        want.push('\n');
        let mut got = Vec::new();
        nixmox_core::config_out::write_json(&p, &only, &mut got).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }
}

#[test]
fn allocation_is_stable_when_services_are_added() {
    let p = common::example();
    let mut lock = nixmox_core::lock::Lock::default();
    for s in &p.services {
        if s.host.ip_origin != nixmox_core::model::Origin::Manifest
            || s.host.vmid_origin != nixmox_core::model::Origin::Manifest
        {
            lock.services.insert(
                s.name.to_string(),
                nixmox_core::lock::LockEntry {
                    ip: (s.host.ip_origin != nixmox_core::model::Origin::Manifest)
                        .then_some(s.host.ip),
                    vmid: (s.host.vmid_origin != nixmox_core::model::Origin::Manifest)
                        .then_some(s.host.vmid.get()),
                    node: None,
                },
            );
        }
    }
    // Add a service named to sort first: with the lock it must not take anyone's address.
    let root = repo_root().join("examples/homelab");
    let mut sources = common::read_sources(&root);
    sources.lock = Some(nixmox_core::SourceFile {
        path: "nixmox.lock".into(),
        bytes: lock.render().into_bytes(),
    });
    sources.manifests.push(nixmox_core::SourceFile {
        path: "services/aaa/manifest.yaml".into(),
        bytes: b"name: aaa\n".to_vec(),
    });
    let exists = |rel: &str| root.join(rel).exists();
    let loaded = nixmox_core::load(&sources, &exists);
    let q = loaded.project.expect("valid");
    for s in &p.services {
        let t = q.service(s.name.as_str()).unwrap();
        assert_eq!(
            (t.host.ip, t.host.vmid),
            (s.host.ip, s.host.vmid),
            "{} was renumbered",
            s.name
        );
    }
    let aaa = q.service("aaa").unwrap();
    assert_eq!(aaa.host.ip_origin, nixmox_core::model::Origin::Allocated);
    assert!(loaded.lock_changed);
    assert!(loaded.lock.services.contains_key("aaa"));
    // Removing it again leaves the others where they were.
    sources.manifests.pop();
    let again = nixmox_core::load(&sources, &exists);
    assert!(
        !again.lock_changed,
        "the lock should be unchanged once `aaa` is gone"
    );
}

#[test]
fn depends_on_accepts_the_compose_long_form() {
    use nixmox_core::{SourceFile, Sources};
    let file = |path: &str, text: &str| SourceFile {
        path: path.into(),
        bytes: text.as_bytes().to_vec(),
    };
    let sources = Sources {
        config: Some(file(
            "nixmox.yaml",
            "project: p\ndomain: p.lan\nnetwork: { cidr: 10.0.0.0/24, gateway: 10.0.0.1 }\n",
        )),
        manifests: vec![
            file("services/a/manifest.yaml", "name: a\n"),
            file(
                "services/b/manifest.yaml",
                "name: b\ndepends_on:\n  a: { condition: service_healthy }\n",
            ),
        ],
        lock: None,
    };
    let loaded = nixmox_core::load(&sources, &|_: &str| true);
    let p = loaded.project.expect("valid");
    let b = p.index_of("b").unwrap();
    let deps: Vec<&str> = p
        .deps_of(b)
        .map(|e| p.services[e.to].name.as_str())
        .collect();
    assert_eq!(deps, ["a"]);
}
