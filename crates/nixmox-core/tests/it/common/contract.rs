//! The Terraform contract check (issue 12): every resource, data source and provider block the
//! renderers emit, read against the providers' schemas at the pinned versions, as
//! `scripts/extract-tf-contracts` transcribed them from the providers' Go sources into
//! `tests/contracts/terraform/*.json`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};

const CONTRACTS: &[(&str, &str)] = &[
    (
        "proxmox",
        include_str!("../../contracts/terraform/proxmox.json"),
    ),
    (
        "authentik",
        include_str!("../../contracts/terraform/authentik.json"),
    ),
    (
        "postgresql",
        include_str!("../../contracts/terraform/postgresql.json"),
    ),
];

/// Terraform's own arguments, accepted on every resource and data source.
const META: &[&str] = &["count", "depends_on", "for_each", "lifecycle", "provider"];

/// The contracts by provider name (`proxmox`, `authentik`, `postgresql`).
pub fn contracts() -> BTreeMap<String, Value> {
    CONTRACTS
        .iter()
        .map(|(n, text)| ((*n).to_string(), serde_json::from_str(text).unwrap()))
        .collect()
}

/// Every breach of the contracts in one rendered `*.tf.json` (`path` names it in messages).
pub fn check_file(path: &str, text: &str) -> Vec<String> {
    check_file_with(&contracts(), path, text)
}

/// [`check_file`] against the given contracts (a test plants a stricter one).
pub fn check_file_with(contracts: &BTreeMap<String, Value>, path: &str, text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![format!("{path}: not JSON: {e}")],
    };
    if let Some(req) = doc["terraform"]["required_providers"].as_object() {
        for (name, spec) in req {
            let Some(c) = contracts.get(name) else {
                errors.push(format!("{path}: provider `{name}` has no contract"));
                continue;
            };
            if spec["source"] != c["source"] {
                errors.push(format!(
                    "{path}: provider `{name}` source {} is not {}",
                    spec["source"], c["source"]
                ));
            }
            let constraint = spec["version"].as_str().unwrap_or_default();
            let tag = c["tag"].as_str().unwrap_or_default();
            if !pessimistic_allows(constraint, tag.trim_start_matches('v')) {
                errors.push(format!(
                    "{path}: provider `{name}` constraint `{constraint}` does not allow the contract's {tag}"
                ));
            }
        }
    }
    if let Some(providers) = doc["provider"].as_object() {
        for (name, body) in providers {
            match contracts.get(name) {
                Some(c) => check_body(
                    &format!("{path}: provider.{name}"),
                    body,
                    &c["provider_config"]["arguments"],
                    &[],
                    &mut errors,
                ),
                None => errors.push(format!("{path}: provider `{name}` has no contract")),
            }
        }
    }
    for (kind, key) in [("resource", "resources"), ("data", "data_sources")] {
        let Some(types) = doc[kind].as_object() else {
            continue;
        };
        for (rtype, instances) in types {
            let schema = contracts
                .values()
                .find_map(|c| c[key].get(rtype.as_str()).map(|r| r["arguments"].clone()));
            let Some(schema) = schema else {
                errors.push(format!("{path}: {kind} type `{rtype}` has no contract"));
                continue;
            };
            for (name, body) in instances.as_object().into_iter().flatten() {
                check_body(
                    &format!("{path}: {kind}.{rtype}.{name}"),
                    body,
                    &schema,
                    META,
                    &mut errors,
                );
            }
        }
    }
    errors
}

/// Whether `~> X.Y.Z` (or `~> X.Y`) admits `version`.
fn pessimistic_allows(constraint: &str, version: &str) -> bool {
    let Some(base) = constraint.strip_prefix("~> ") else {
        return false;
    };
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    let (b, v) = (parse(base), parse(version));
    let mut upper = b[..b.len() - 1].to_vec();
    *upper.last_mut().unwrap() += 1;
    v >= b && v[..upper.len()] < upper[..]
}

fn is_expression(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.starts_with("${") && s.ends_with('}') && !s.starts_with("$${"))
}

fn check_body(at: &str, body: &Value, schema: &Value, meta: &[&str], errors: &mut Vec<String>) {
    let Some(body) = body.as_object() else {
        errors.push(format!("{at}: a block must be an object, found {body}"));
        return;
    };
    let schema = schema.as_object().cloned().unwrap_or_default();
    for (k, v) in body {
        if meta.contains(&k.as_str()) {
            continue;
        }
        let Some(arg) = schema.get(k) else {
            errors.push(format!("{at}: unknown argument `{k}`"));
            continue;
        };
        if arg["optional"] != true && arg["required"] != true {
            errors.push(format!("{at}: `{k}` is read-only (computed)"));
        }
        if arg["deprecated"] == true {
            errors.push(format!("{at}: `{k}` is deprecated"));
        }
        check_value(&format!("{at}.{k}"), v, arg, errors);
    }
    for (k, arg) in &schema {
        // A required argument with an environment default (`AUTHENTIK_TOKEN`) comes from the
        // environment the runner gives Terraform.
        if arg["required"] == true && arg.get("env").is_none() && !body.contains_key(k) {
            errors.push(format!("{at}: missing required argument `{k}`"));
        }
    }
}

fn check_items(at: &str, n: usize, arg: &Value, errors: &mut Vec<String>) {
    if let Some(min) = arg["min_items"].as_u64() {
        if (n as u64) < min {
            errors.push(format!("{at}: {n} item(s), at least {min} required"));
        }
    }
    if let Some(max) = arg["max_items"].as_u64() {
        if (n as u64) > max {
            errors.push(format!("{at}: {n} item(s), at most {max} allowed"));
        }
    }
}

fn check_value(at: &str, v: &Value, arg: &Value, errors: &mut Vec<String>) {
    if is_expression(v) {
        return;
    }
    let ty = arg["type"].as_str().unwrap_or_default();
    if let Some(block) = arg.get("block") {
        let items: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![v],
            other => {
                errors.push(format!(
                    "{at}: a nested block must be an object or a list of objects, found {other}"
                ));
                return;
            }
        };
        check_items(at, items.len(), arg, errors);
        for (i, item) in items.iter().enumerate() {
            check_body(&format!("{at}[{i}]"), item, block, &[], errors);
        }
        return;
    }
    match (ty, v) {
        ("string", Value::String(_)) | ("number", Value::Number(_)) | ("bool", Value::Bool(_)) => {}
        ("list" | "set", Value::Array(a)) => {
            check_items(at, a.len(), arg, errors);
            let elem = json_elem(arg);
            for (i, x) in a.iter().enumerate() {
                check_value(&format!("{at}[{i}]"), x, &elem, errors);
            }
        }
        ("map", Value::Object(m)) => {
            let elem = json_elem(arg);
            for (k, x) in m {
                check_value(&format!("{at}.{k}"), x, &elem, errors);
            }
        }
        (ty, other) => errors.push(format!("{at}: expected {ty}, found {other}")),
    }
}

fn json_elem(arg: &Value) -> Value {
    let mut m = Map::new();
    m.insert(
        "type".into(),
        arg.get("elem").cloned().unwrap_or(Value::from("string")),
    );
    Value::Object(m)
}

/// Checks every rendered `*.tf.json` of a render and returns the breaches.
pub fn check_rendered(files: &[nixmox_core::RenderedFile]) -> Vec<String> {
    files
        .iter()
        .filter(|f| f.path.ends_with(".tf.json"))
        .flat_map(|f| check_file(&f.path, &f.contents))
        .collect()
}
