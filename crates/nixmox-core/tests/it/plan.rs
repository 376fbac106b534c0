//! Planner tests: snapshots of the example's plan, change detection against a record, and
//! properties over random valid projects.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use nixmox_core::plan::{plan, Change, Phase, PlanInput, Selection};
use nixmox_core::plan_out;
use nixmox_core::record::{Record, StepRecord};
use nixmox_core::step_id::StepId;
use nixmox_core::{SourceFile, Sources};
use proptest::prelude::*;

fn full(p: &nixmox_core::Project, record: Option<&Record>) -> nixmox_core::plan::Plan {
    plan(
        p,
        &Selection::default(),
        &PlanInput {
            record,
            files: None,
            flake_lock: None,
        },
    )
}

fn record_of(pl: &nixmox_core::plan::Plan) -> Record {
    Record {
        steps: pl
            .steps
            .iter()
            .map(|s| {
                (
                    s.id.to_string(),
                    StepRecord {
                        hash: s.hash.clone(),
                        parts: s.parts.clone(),
                        duration_ms: None,
                    },
                )
            })
            .collect(),
        ..Record::default()
    }
}

#[test]
fn example_plan_text_and_json() {
    let p = common::example();
    let pl = full(&p, None);
    insta::assert_snapshot!("example_plan_text", plan_out::to_text(&pl));
    let json = plan_out::to_json(&pl);
    // Hashes are content hashes: stable, but noise in a review; check their shape, then drop them.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for s in v["steps"].as_array().unwrap() {
        assert_eq!(s["hash"].as_str().unwrap().len(), 64);
    }
    let redacted: String = json
        .lines()
        .filter(|l| !l.trim_start().starts_with("\"hash\""))
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("example_plan_json", redacted);
}

#[test]
fn example_phase_order() {
    let p = common::example();
    let pl = full(&p, None);
    let idx = |id: &str| pl.index_of(id).unwrap_or_else(|| panic!("{id} missing"));
    assert!(idx("tf:infra") < idx("nix:core:dns"));
    assert!(
        idx("nix:core:postgresql") < idx("nix:core:authentik"),
        "authentik has a db"
    );
    assert!(pl.steps[idx("nix:core:authentik")]
        .after
        .contains(&idx("nix:core:postgresql")));
    for s in ["dns", "postgresql", "caddy", "authentik"] {
        assert!(pl.steps[idx("tf:auth-core")]
            .after
            .contains(&idx(&format!("nix:core:{s}"))));
    }
    assert!(pl.steps[idx("tf:service-infra:guacamole")]
        .after
        .contains(&idx("tf:auth-core")));
    // Unrelated services share no edge.
    let g = idx("tf:service-infra:guacamole");
    assert!(!pl.steps[g]
        .after
        .iter()
        .any(|&a| pl.steps[a].service() == Some("vaultwarden")));
}

#[test]
fn unchanged_when_recorded_and_reasons_when_a_service_is_added() {
    let p = common::example();
    let first = full(&p, None);
    assert!(first.steps.iter().all(|s| s.change == Change::Create));
    let record = record_of(&first);
    let again = full(&p, Some(&record));
    assert!(
        !again.has_changes(),
        "{:?}",
        again
            .steps
            .iter()
            .filter(|s| s.change != Change::Unchanged)
            .map(|s| &s.id)
            .collect::<Vec<_>>()
    );

    // Add a service with a db, a route and a DNS record: exactly the provider steps it touches
    // change, and say why.
    let root = common::repo_root().join("examples/homelab");
    let mut sources = common::read_sources(&root);
    sources.manifests.push(SourceFile {
        path: "services/wiki/manifest.yaml".into(),
        bytes: b"name: wiki\nhost: { ip: 192.168.99.60, vmid: 960 }\ninterface:\n  db: { database: wiki }\n  proxy: { domain: wiki.nixmox.lan, upstream: 3000 }\n".to_vec(),
    });
    let exists = |rel: &str| root.join(rel).exists();
    let q = nixmox_core::load(&sources, &exists).project.expect("valid");
    let next = full(&q, Some(&record));
    let changed: BTreeMap<&str, (Change, Vec<String>)> = next
        .steps
        .iter()
        .filter(|s| s.change != Change::Unchanged)
        .map(|s| (s.id.as_str(), (s.change, s.reasons.clone())))
        .collect();
    let ids: BTreeSet<&str> = changed.keys().copied().collect();
    let expected: BTreeSet<&str> = [
        "tf:infra",
        "nix:core:postgresql",
        "nix:core:caddy",
        "nix:core:dns",
        "tf:service-infra:wiki",
        "nix:service-config:wiki",
        "tf:service-config:wiki",
        "verify:wiki",
    ]
    .into();
    assert_eq!(ids, expected);
    assert_eq!(
        changed["nix:core:postgresql"].1,
        vec!["added: database requirements of `wiki`".to_string()]
    );
    assert_eq!(
        changed["nix:core:caddy"].1,
        vec!["added: proxy routes of `wiki`".to_string()]
    );
    assert_eq!(
        changed["nix:core:dns"].1,
        vec!["added: DNS records of `wiki`".to_string()]
    );
    assert_eq!(
        changed["tf:infra"].1,
        vec!["added: container of `wiki`".to_string()]
    );
    assert_eq!(changed["verify:wiki"].0, Change::Create);

    // Removing a service shows its recorded steps as orphans.
    let without = {
        let mut s = common::read_sources(&root);
        s.manifests.retain(|m| !m.path.contains("vaultwarden"));
        nixmox_core::load(&s, &exists).project.expect("valid")
    };
    let orphaned = full(&without, Some(&record));
    let deleted: Vec<&str> = orphaned
        .steps
        .iter()
        .filter(|s| s.change == Change::Delete)
        .map(|s| s.id.as_str())
        .collect();
    assert_eq!(deleted.len(), 4, "{deleted:?}");
    assert!(deleted.iter().all(|d| d.ends_with(":vaultwarden")));
}

#[test]
fn recorded_durations_weigh_the_critical_path() {
    let p = common::example();
    let first = full(&p, None);
    let mut record = record_of(&first);
    record
        .steps
        .get_mut("nix:service-config:vaultwarden")
        .unwrap()
        .duration_ms = Some(600_000);
    let pl = full(&p, Some(&record));
    let path: Vec<&str> = pl
        .critical_path
        .iter()
        .map(|&i| pl.steps[i].id.as_str())
        .collect();
    assert!(path.contains(&"nix:service-config:vaultwarden"), "{path:?}");
}

// ---- properties over random projects ----

#[derive(Clone, Debug)]
struct App {
    db: bool,
    proxy: bool,
    auth: bool,
    authz: bool,
    deps: Vec<usize>,
    tf_config: bool,
}

fn arb_project() -> impl Strategy<Value = (bool, bool, Vec<App>)> {
    let app = (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(0usize..40, 0..3),
        any::<bool>(),
    )
        .prop_map(|(db, proxy, auth, authz, deps, tf_config)| App {
            db,
            proxy,
            auth,
            authz,
            deps,
            tf_config,
        });
    (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(app, 1..25),
    )
}

fn sources_for(with_db: bool, with_idp: bool, apps: &[App]) -> Sources {
    let file = |path: &str, text: String| SourceFile {
        path: path.into(),
        bytes: text.into_bytes(),
    };
    let mut manifests = vec![
        file(
            "services/dns/manifest.yaml",
            "name: dns\nprovides: { dns: { type: unbound } }\n".into(),
        ),
        file(
            "services/caddy/manifest.yaml",
            "name: caddy\nprovides: { reverse_proxy: { type: caddy } }\n".into(),
        ),
    ];
    if with_db {
        manifests.push(file(
            "services/pg/manifest.yaml",
            "name: pg\nprovides: { database: { type: postgresql } }\n".into(),
        ));
    }
    if with_idp {
        let db = if with_db {
            "  db: { database: authentik }\n"
        } else {
            ""
        };
        manifests.push(file("services/idp/manifest.yaml", format!("name: idp\nprovides: {{ identity: {{ type: authentik }} }}\ninterface:\n{db}  proxy: {{ domain: auth.lab.lan, upstream: 9000 }}\n")));
    }
    for (i, a) in apps.iter().enumerate() {
        let mut t = format!("name: app{i}\n");
        let deps: BTreeSet<usize> = a.deps.iter().filter(|&&d| d < i).copied().collect();
        if !deps.is_empty() {
            t.push_str(&format!(
                "depends_on: [{}]\n",
                deps.iter()
                    .map(|d| format!("app{d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        t.push_str("interface:\n");
        if a.db && with_db {
            t.push_str(&format!("  db: {{ database: app{i} }}\n"));
        }
        if a.proxy {
            t.push_str(&format!(
                "  proxy: {{ domain: app{i}.lab.lan, upstream: 8080, authz: {} }}\n",
                a.authz && with_idp
            ));
        }
        if a.auth && with_idp {
            t.push_str(&format!(
                "  auth: {{ oidc: {{ redirect_uris: [https://app{i}.lab.lan/cb] }} }}\n"
            ));
        }
        if a.tf_config {
            t.push_str("  terraform: { phase: service-config, variables: { x: 1 } }\n");
        }
        t.push_str("  health: { liveness: true-command }\n");
        manifests.push(file(&format!("services/app{i}/manifest.yaml"), t));
    }
    Sources {
        config: Some(file("nixmox.yaml", "project: lab\ndomain: lab.lan\nnetwork: { cidr: 10.0.0.0/16, gateway: 10.0.0.1 }\npools: { vmid: 1000-9999, ip: 10.0.1.1-10.0.9.254 }\n".into())),
        manifests,
        lock: None,
    }
}

fn closure(p: &nixmox_core::Project, names: &[String]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = names.iter().cloned().collect();
    let mut todo: Vec<String> = names.to_vec();
    while let Some(n) = todo.pop() {
        let i = p.index_of(&n).unwrap();
        for e in p.deps_of(i) {
            let m = p.services[e.to].name.to_string();
            if out.insert(m.clone()) {
                todo.push(m);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Issue 12: every workspace rendered for a random project keeps the providers'
    /// contracts (terraform_contract.rs has the example, the fixtures and planted
    /// mistakes). Without the DNS service the containers get no DNS servers at all.
    #[test]
    fn random_projects_keep_the_terraform_contracts((with_db, with_idp, apps) in arb_project(), with_dns in any::<bool>()) {
        let mut sources = sources_for(with_db, with_idp, &apps);
        if !with_dns {
            sources.manifests.retain(|m| m.path != "services/dns/manifest.yaml");
        }
        let loaded = nixmox_core::load(&sources, &|_: &str| true);
        prop_assert!(loaded.errors().next().is_none(), "{}", nixmox_core::diag::render_all(&loaded.diagnostics));
        let rendered = nixmox_core::render::render(&loaded.project.unwrap(), &nixmox_core::render::Outputs::default());
        let errors = common::contract::check_rendered(&rendered.files);
        prop_assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    #[test]
    fn plans_respect_order_and_selection((with_db, with_idp, apps) in arb_project(), pick in proptest::collection::vec(0usize..25, 0..3), no_deps in any::<bool>()) {
        let sources = sources_for(with_db, with_idp, &apps);
        let loaded = nixmox_core::load(&sources, &|_: &str| true);
        prop_assert!(loaded.errors().next().is_none(), "{}", nixmox_core::diag::render_all(&loaded.diagnostics));
        let p = loaded.project.unwrap();
        let names: Vec<String> = pick.iter().filter(|&&i| i < apps.len()).map(|i| format!("app{i}")).collect();
        let sel = Selection { services: names.clone(), with_deps: !no_deps };
        let pl = plan(&p, &sel, &PlanInput::default());

        // No step twice; every step after all its prerequisites.
        let ids: BTreeSet<&str> = pl.steps.iter().map(|s| s.id.as_str()).collect();
        prop_assert_eq!(ids.len(), pl.steps.len());
        for (i, s) in pl.steps.iter().enumerate() {
            for &a in &s.after {
                prop_assert!(a < i, "{} comes before its prerequisite {}", s.id, pl.steps[a].id);
            }
        }
        // Selection equals the transitive closure (or exactly the names with --no-deps).
        let planned: BTreeSet<String> = pl.steps.iter().filter_map(|s| s.service().map(str::to_string)).collect();
        let expected: BTreeSet<String> = if names.is_empty() {
            p.services.iter().map(|s| s.name.to_string()).collect()
        } else if no_deps {
            names.iter().cloned().collect()
        } else {
            closure(&p, &names)
        };
        prop_assert_eq!(&planned, &expected);
        // Steps of services with no path between them share no edge.
        for s in &pl.steps {
            let Some(svc) = s.service().map(str::to_string) else { continue };
            let deps = closure(&p, std::slice::from_ref(&svc));
            for &a in &s.after {
                if let Some(other) = pl.steps[a].service() {
                    prop_assert!(deps.contains(other), "{} waits for {} but {svc} does not depend on {other}", s.id, pl.steps[a].id);
                }
            }
        }
        // The seed's phase order, for every non-core service.
        let idx = |id: String| pl.index_of(&id);
        for s in p.services.iter().filter(|s| !s.is_core() && planned.contains(s.name.as_str())) {
            let chain: Vec<usize> = [Phase::TfServiceInfra, Phase::NixServiceConfig, Phase::TfServiceConfig, Phase::Verify]
                .iter().map(|ph| idx(StepId::of_service(*ph, &s.name).unwrap().to_string()).unwrap()).collect();
            for w in chain.windows(2) {
                prop_assert!(pl.steps[w[1]].after.contains(&w[0]));
            }
            let auth_core = idx("tf:auth-core".into()).unwrap();
            prop_assert!(pl.steps[chain[0]].after.contains(&auth_core) || !pl.steps[chain[0]].after.is_empty());
            prop_assert!(auth_core < chain[0]);
        }
        for s in pl.steps.iter().filter(|s| s.phase() == Phase::NixCore) {
            prop_assert!(pl.index_of(&s.id) < pl.index_of("tf:auth-core"));
        }
    }
}

/// Issue 11: a step the destroy guard refused says so in the plan while it still has
/// something to apply, and not once its input is back at its last success.
#[test]
fn a_refused_step_needs_allow_destroy_until_its_input_is_unchanged() {
    let p = common::example();
    let first = full(&p, None);
    let mut record = record_of(&first);
    let refused =
        vec!["proxmox_virtual_environment_container.dns (replace, forced by vm_id)".to_string()];
    record.refused.insert("tf:infra".into(), refused.clone());

    // Unchanged since its last success: nothing to destroy, no note.
    let pl = full(&p, Some(&record));
    let infra = &pl.steps[pl.index_of("tf:infra").unwrap()];
    assert!(infra.needs_allow_destroy.is_empty());
    assert!(!plan_out::to_text(&pl).contains("needs --allow-destroy"));
    assert!(!plan_out::to_json(&pl).contains("needs_allow_destroy"));

    // Changed: the note, in text and JSON, on that step only.
    record.steps.get_mut("tf:infra").unwrap().hash = "older".into();
    let pl = full(&p, Some(&record));
    let infra = &pl.steps[pl.index_of("tf:infra").unwrap()];
    assert_eq!(infra.needs_allow_destroy, refused);
    let text = plan_out::to_text(&pl);
    assert!(
        text.contains("needs --allow-destroy: its last run was refused because the plan would delete or replace proxmox_virtual_environment_container.dns (replace, forced by vm_id)"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&plan_out::to_json(&pl)).unwrap();
    assert_eq!(v["version"], 1);
    let with: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("needs_allow_destroy").is_some())
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(with, ["tf:infra"]);
    assert_eq!(
        v["steps"][0]["needs_allow_destroy"],
        serde_json::json!(refused)
    );
}

/// Issue 13: step ids come from the state store too (orphans); a recorded id with an ESC
/// sequence or a newline is shown escaped in the plan's text, never raw.
#[test]
fn orphan_ids_with_control_characters_are_shown_escaped() {
    let p = common::example();
    let mut record = record_of(&full(&p, None));
    record.steps.insert(
        "nix:service-config:x\u{1b}[2J\nerror: forged".into(),
        StepRecord {
            hash: "0".into(),
            parts: Default::default(),
            duration_ms: None,
        },
    );
    let text = plan_out::to_text(&full(&p, Some(&record)));
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.contains("x\\u{1b}[2J\\u{a}error: forged"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("error: forged")),
        "{text}"
    );
}

/// Issue "Shape": the reverse proxy's implementation is part of the hash of every step it
/// shapes, so switching `caddy` to `nginx` redeploys the proxy's host and re-checks the routes
/// through it, and says why; nothing else changes.
#[test]
fn switching_the_reverse_proxy_implementation_redeploys_what_it_shapes() {
    let sources = |imp: &str| {
        Sources {
        config: Some(SourceFile {
            path: "nixmox.yaml".into(),
            bytes: b"project: p\ndomain: p.lan\nnetwork: { cidr: 10.0.0.0/24, gateway: 10.0.0.1 }\n"
                .to_vec(),
        }),
        manifests: vec![
            SourceFile {
                path: "services/dns/manifest.yaml".into(),
                bytes: b"name: dns\nprovides: { dns: }\n".to_vec(),
            },
            SourceFile {
                path: "services/edge/manifest.yaml".into(),
                bytes: format!("name: edge\nprovides: {{ reverse_proxy: {{ type: {imp} }} }}\n")
                    .into_bytes(),
            },
            SourceFile {
                path: "services/web/manifest.yaml".into(),
                bytes: b"name: web\ninterface: { proxy: { domain: web.p.lan, upstream: 8080, tls: false } }\n"
                    .to_vec(),
            },
            SourceFile {
                path: "services/plain/manifest.yaml".into(),
                bytes: b"name: plain\n".to_vec(),
            },
        ],
        lock: None,
    }
    };
    let load = |imp: &str| {
        let loaded = nixmox_core::load(&sources(imp), &|_: &str| true);
        loaded
            .project
            .unwrap_or_else(|| panic!("{:?}", loaded.diagnostics))
    };
    let caddy = full(&load("caddy"), None);
    let record = record_of(&caddy);
    let nginx = full(&load("nginx"), Some(&record));
    let changed: BTreeMap<&str, Vec<String>> = nginx
        .steps
        .iter()
        .filter(|s| s.change != Change::Unchanged)
        .map(|s| (s.id.as_str(), s.reasons.clone()))
        .collect();
    let reason = vec!["reverse_proxy implementation changed: caddy → nginx".to_string()];
    assert_eq!(
        changed,
        BTreeMap::from([
            ("nix:core:edge", reason.clone()),
            ("nix:service-config:web", reason.clone()),
            ("verify:web", reason),
        ])
    );
    // And back: the recorded nginx run against caddy again.
    let back = full(&load("caddy"), Some(&record_of(&nginx)));
    assert_eq!(
        back.steps
            .iter()
            .filter(|s| s.change != Change::Unchanged)
            .count(),
        3
    );
}
