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
    let out = lab.run(&["down", "worker"], &env);
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
