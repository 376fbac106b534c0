//! `nixmox drift` and `nixmox down` against the Terraform test project (Terraform 1.0.3 with
//! the null provider, offline, and the test deployer).

use crate::common;

use std::collections::BTreeMap;

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
    let out = lab.run(&["down", "app", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`app`") && err.contains("`worker`"),
        "{}",
        text(&out)
    );
    assert!(resources(&lab, "service-infra--app") > 0);

    let out = lab.run(&["down", "worker", "--yes"], &[]);
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
    let out = lab.run(&["down", "app", "--yes"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(resources(&lab, "service-infra--app"), 0);
}

/// A stand-in for the reverse proxy's port 80 (reached through `NIXMOX_CONNECT_TO`): every
/// request gets `200 OK`, so `verify:worker`'s proxy check passes without leaving loopback.
fn fake_proxy() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    (addr, served)
}

#[test]
fn down_removes_a_service_from_the_provider_hosts_configurations() {
    let lab = Lab::new();
    // A core reverse proxy on its own host, and a route to worker on it.
    let proxy_dir = lab.project.join("services/proxy");
    std::fs::create_dir_all(&proxy_dir).unwrap();
    std::fs::write(
        proxy_dir.join("manifest.yaml"),
        "name: proxy\nprovides: { reverse_proxy: { type: caddy } }\n\
         host: { ip: 10.77.0.20, vmid: 920 }\n",
    )
    .unwrap();
    let worker = lab.project.join("services/worker/manifest.yaml");
    let manifest = std::fs::read_to_string(&worker).unwrap().replace(
        "interface:\n",
        "interface:\n  proxy: { domain: w.tf.lan, upstream: 8080, tls: false }\n",
    );
    assert!(manifest.contains("w.tf.lan"), "{manifest}");
    std::fs::write(&worker, manifest).unwrap();

    let (local, served) = fake_proxy();
    let connect_to = format!("10.77.0.20:80={local}");
    let env = [("NIXMOX_CONNECT_TO", connect_to.as_str())];
    let proxy_host = lab.project.join(".nixmox/build/nix/hosts/proxy.nix");

    let out = lab.run(&["up"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let rendered = std::fs::read_to_string(&proxy_host).unwrap();
    assert!(
        rendered.contains("w.tf.lan") && rendered.contains("10.77.0.11"),
        "the proxy host does not route to worker:\n{rendered}"
    );
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "verify:worker's proxy check never reached the stand-in proxy"
    );
    assert!(
        recorded_steps(&lab).iter().any(|s| s == "verify:worker"),
        "{:?}",
        recorded_steps(&lab)
    );

    lab.clear();
    let out = lab.run(&["down", "worker", "--yes"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let rendered = std::fs::read_to_string(&proxy_host).unwrap();
    assert!(
        !rendered.contains("w.tf.lan") && !rendered.contains("10.77.0.11"),
        "the proxy host still routes to worker:\n{rendered}"
    );
    let log = lab.invocations();
    assert!(
        log.iter().any(|l| l.starts_with("start proxy 10.77.0.20 ")),
        "the proxy host was not redeployed: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("start worker ")),
        "worker was deployed by `down`: {log:?}"
    );
    let steps = recorded_steps(&lab);
    assert!(
        !steps.iter().any(|s| s.ends_with(":worker")),
        "worker's steps still recorded: {steps:?}"
    );
    assert!(steps.iter().any(|s| s == "nix:core:proxy"), "{steps:?}");
}

/// Every workspace's Terraform state resources (by data directory), as they are on disk.
fn all_states(lab: &Lab) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(lab.project.join(".nixmox/terraform")).unwrap() {
        let dir = e.unwrap().path();
        let file = dir.join("terraform.tfstate");
        if file.is_file() {
            let st: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            out.insert(
                dir.file_name().unwrap().to_string_lossy().into_owned(),
                st["resources"].clone(),
            );
        }
    }
    out
}

/// The resource instance addresses a workspace's state holds, as `terraform state list` prints
/// them (read from the state file here, independently of nixmox).
fn addresses(lab: &Lab, step_slug: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in state(lab, step_slug)["resources"].as_array().unwrap() {
        if r["mode"] != "managed" {
            continue;
        }
        let m = r["module"]
            .as_str()
            .map(|m| format!("{m}."))
            .unwrap_or_default();
        let base = format!(
            "{m}{}.{}",
            r["type"].as_str().unwrap(),
            r["name"].as_str().unwrap()
        );
        for i in r["instances"].as_array().unwrap() {
            out.push(match &i["index_key"] {
                serde_json::Value::Null => base.clone(),
                serde_json::Value::String(k) => format!("{base}[\"{k}\"]"),
                k => format!("{base}[{k}]"),
            });
        }
    }
    out.sort();
    out
}

/// The list `down` printed: step → the resource addresses under it.
fn listed(stderr: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix("  Terraform resources of ") {
            let step = rest.split(' ').next().unwrap().to_string();
            out.entry(step.clone()).or_default();
            current = Some(step);
        } else if let (Some(step), Some(addr)) = (&current, line.strip_prefix("    ")) {
            out.get_mut(step).unwrap().push(addr.trim().to_string());
        } else {
            current = None;
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

fn destroys(lab: &Lab) -> Vec<String> {
    lab.invocations()
        .into_iter()
        .filter(|l| l == "terraform destroy")
        .collect()
}

/// Issue 18: without a terminal and without `--yes`, `down` lists what it would destroy,
/// destroys nothing, changes no state, and exits 2 naming `--yes`; `--dry-run` lists and keeps
/// everything; `--yes` destroys exactly what was listed. Run from inside the project.
#[test]
fn down_without_a_terminal_refuses_dry_run_lists_and_yes_destroys_exactly_the_list() {
    use nixmox_core::ids::ServiceName;
    use nixmox_core::plan::Phase;
    use nixmox_core::step_id::StepId;

    let lab = Lab::new();
    let out = lab.cmd(&["up"], &[]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let states = all_states(&lab);
    let steps = recorded_steps(&lab);
    let expected: BTreeMap<String, Vec<String>> = [
        (Phase::TfServiceConfig, "worker"),
        (Phase::TfServiceInfra, "app"),
    ]
    .into_iter()
    .map(|(phase, service)| {
        let id = StepId::of_service(phase, &ServiceName::new(service).unwrap()).unwrap();
        let data_dir = id.terraform_data_dir().unwrap();
        (id.to_string(), addresses(&lab, &data_dir))
    })
    .collect();
    assert!(
        expected.values().all(|a| !a.is_empty()),
        "the fixture's workspaces hold resources: {expected:?}"
    );

    lab.clear();
    let out = lab.cmd(&["down"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("this destroys, in project `tfproj`"),
        "{stderr}"
    );
    assert_eq!(listed(&stderr), expected, "{stderr}");
    assert!(
        stderr.contains("not a terminal") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out));
    assert_eq!(destroys(&lab), Vec::<String>::new());
    assert_eq!(all_states(&lab), states);
    assert_eq!(recorded_steps(&lab), steps);

    // A subset too: `y` would confirm it, and without a terminal nothing goes.
    let out = lab.cmd(&["down", "worker"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        listed(&stderr),
        expected
            .iter()
            .filter(|(k, _)| k.ends_with(":worker"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        "{stderr}"
    );
    assert_eq!(all_states(&lab), states);
    assert_eq!(recorded_steps(&lab), steps);

    let out = lab.cmd(&["down", "--dry-run"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(listed(&stderr), expected, "{stderr}");
    assert!(
        stderr.contains("dry run: nothing was destroyed"),
        "{stderr}"
    );
    assert_eq!(destroys(&lab), Vec::<String>::new());
    assert_eq!(all_states(&lab), states);
    assert_eq!(recorded_steps(&lab), steps);

    let out = lab.cmd(&["down", "--yes"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(listed(&stderr), expected, "{stderr}");
    assert_eq!(
        destroys(&lab).len(),
        expected.len(),
        "{:?}",
        lab.invocations()
    );
    for slug in ["service-config--worker", "service-infra--app"] {
        assert_eq!(addresses(&lab, slug), Vec::<String>::new(), "{slug}");
    }
    // Workspaces that were not listed kept their state.
    for (slug, resources) in &states {
        if !["service-config--worker", "service-infra--app"].contains(&slug.as_str()) {
            assert_eq!(all_states(&lab).get(slug), Some(resources), "{slug}");
        }
    }
    assert_eq!(recorded_steps(&lab), Vec::<String>::new());
}

/// Issue 18: on a terminal `down` asks. A wrong answer keeps everything (exit 2); `y` confirms
/// a subset; everything needs the project's name typed, and `y` is not enough for it.
#[test]
fn down_on_a_terminal_keeps_everything_on_a_wrong_answer_and_proceeds_on_the_right_one() {
    let lab = Lab::new();
    let out = lab.cmd(&["up"], &[]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let states = all_states(&lab);
    let steps = recorded_steps(&lab);

    lab.clear();
    let out = lab.on_terminal(&["down", "worker"], "n\n");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{screen}");
    assert!(
        screen.contains("null_resource.hook") && screen.contains("destroy the above? [y/N]"),
        "{screen}"
    );
    assert!(screen.contains("not confirmed"), "{screen}");
    assert_eq!(destroys(&lab), Vec::<String>::new());
    assert_eq!(all_states(&lab), states);
    assert_eq!(recorded_steps(&lab), steps);

    let out = lab.on_terminal(&["down"], "y\n");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{screen}");
    assert!(
        screen.contains("type the project's name (`tfproj`)"),
        "{screen}"
    );
    assert_eq!(destroys(&lab), Vec::<String>::new());
    assert_eq!(all_states(&lab), states);
    assert_eq!(recorded_steps(&lab), steps);

    let out = lab.on_terminal(&["down", "worker"], "y\n");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    assert_eq!(resources(&lab, "service-config--worker"), 0);
    assert!(resources(&lab, "service-infra--app") > 0);

    let out = lab.on_terminal(&["down"], "tfproj\n");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    assert_eq!(resources(&lab, "service-infra--app"), 0);
    assert_eq!(recorded_steps(&lab), Vec::<String>::new());
}
