//! Secret names and the nested YAML of a secrets file.
//!
//! sops-nix reads a secret named `db/guacamole` from the key path `["db"]["guacamole"]` of a
//! YAML file (its `key` option defaults to the name, and `/` descends one mapping level), so a
//! flat map of names is stored as nested mappings: `{db: {guacamole: VALUE}}`.

use std::collections::BTreeMap;

use nixmox_core::syntax::{self, Format, Kind, Node};

/// Flat names (`db/guacamole`) to values: the plaintext of one secrets file.
pub type Flat = BTreeMap<String, String>;

/// Checks a secret name: `/`-separated segments of letters, digits, `_`, `-` and `.`, none
/// empty, none `sops` at the top (sops keeps its metadata there).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a secret name cannot be empty".into());
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Err(format!(
                "`{name}`: empty segment (names look like `smtp/password`)"
            ));
        }
        if !seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!(
                "`{name}`: use letters, digits, `_`, `-` and `.` between the `/`s"
            ));
        }
    }
    if name == "sops" || name.starts_with("sops/") {
        return Err(format!("`{name}`: `sops` is where sops keeps its metadata"));
    }
    Ok(())
}

/// The plaintext YAML for sops to encrypt: nested mappings, every key and value double-quoted
/// (JSON string syntax is valid YAML and reads back exactly).
pub fn to_yaml(flat: &Flat) -> Result<String, String> {
    #[derive(Default)]
    struct Tree {
        value: Option<String>,
        children: BTreeMap<String, Tree>,
    }
    let mut root = Tree::default();
    for (name, value) in flat {
        check_name(name)?;
        let mut node = &mut root;
        for seg in name.split('/') {
            if node.value.is_some() {
                return Err(format!("`{name}`: a parent of it is a value, not a group"));
            }
            node = node.children.entry(seg.to_string()).or_default();
        }
        if !node.children.is_empty() {
            return Err(format!("`{name}` is both a value and a group of values"));
        }
        node.value = Some(value.clone());
    }
    fn emit(t: &Tree, depth: usize, out: &mut String) {
        for (k, child) in &t.children {
            out.push_str(&"  ".repeat(depth));
            out.push_str(&serde_json::Value::String(k.clone()).to_string());
            out.push(':');
            match &child.value {
                Some(v) => {
                    out.push(' ');
                    out.push_str(&serde_json::Value::String(v.clone()).to_string());
                    out.push('\n');
                }
                None => {
                    out.push('\n');
                    emit(child, depth + 1, out);
                }
            }
        }
    }
    let mut out = String::new();
    emit(&root, 0, &mut out);
    if out.is_empty() {
        out.push_str("{}\n");
    }
    Ok(out)
}

/// The flat names and values of decrypted JSON (`sops decrypt --output-type json`). Strings
/// as they are; numbers and booleans as their text; lists as JSON text; nulls skipped.
pub fn from_json(v: &serde_json::Value) -> Flat {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Flat) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(&name, x, out);
                }
            }
            serde_json::Value::Null => {}
            serde_json::Value::String(s) if !prefix.is_empty() => {
                out.insert(prefix.to_string(), s.clone());
            }
            other if !prefix.is_empty() => {
                out.insert(prefix.to_string(), other.to_string());
            }
            _ => {}
        }
    }
    let mut out = Flat::new();
    if let serde_json::Value::Object(m) = v {
        for (k, x) in m {
            if k != "sops" {
                walk(k, x, &mut out);
            }
        }
    }
    out
}

/// What can be read from an encrypted file without decrypting it: the names it holds (sops
/// leaves keys in clear) and the age recipients it is encrypted to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    pub names: Vec<String>,
    pub recipients: Vec<String>,
}

/// Reads the envelope of a sops-encrypted YAML file; `None` if it is not one.
pub fn envelope(text: &str) -> Option<Envelope> {
    let root = syntax::parse(text, Format::Yaml).ok()??;
    let Kind::Map(entries) = &root.kind else {
        return None;
    };
    let meta = root.get("sops")?;
    let mut recipients: Vec<String> = match meta.get("age").map(|a| &a.kind) {
        Some(Kind::Seq(items)) => items
            .iter()
            .filter_map(|i| i.get("recipient").and_then(Node::as_str))
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    recipients.sort();
    recipients.dedup();
    fn names(prefix: &str, n: &Node, out: &mut Vec<String>) {
        match &n.kind {
            Kind::Map(entries) => {
                for e in entries {
                    names(&format!("{prefix}/{}", e.key), &e.value, out);
                }
            }
            Kind::Null => {}
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| e.key != "sops") {
        names(&e.key, &e.value, &mut out);
    }
    out.sort();
    Some(Envelope {
        names: out,
        recipients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_nest() {
        let flat = Flat::from([
            ("db/guacamole".to_string(), "p\"w\n".to_string()),
            ("db/app".to_string(), "x".to_string()),
            ("true".to_string(), "1".to_string()),
        ]);
        let y = to_yaml(&flat).unwrap();
        assert_eq!(
            y,
            "\"db\":\n  \"app\": \"x\"\n  \"guacamole\": \"p\\\"w\\n\"\n\"true\": \"1\"\n"
        );
        let back = syntax::parse(&y, Format::Yaml).unwrap().unwrap();
        let json = serde_json::json!({
            "db": {
                "app": back.get("db").unwrap().get("app").unwrap().as_str().unwrap(),
                "guacamole": back.get("db").unwrap().get("guacamole").unwrap().as_str().unwrap(),
            },
            "true": back.get("true").unwrap().as_str().unwrap(),
        });
        assert_eq!(from_json(&json), flat);
    }

    #[test]
    fn conflicts_and_bad_names_are_refused() {
        let flat = Flat::from([
            ("db".to_string(), "x".to_string()),
            ("db/app".to_string(), "y".to_string()),
        ]);
        assert!(to_yaml(&flat).is_err());
        for bad in ["", "a//b", "/a", "a/", "a b", "sops", "sops/x", "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("oidc/app/client_secret").unwrap();
        check_name("tf/bucket_0_0/token").unwrap();
    }

    #[test]
    fn envelope_lists_names_and_recipients() {
        let text = "db:\n    app: ENC[AES256_GCM,data:x,type:str]\nsops:\n    age:\n        - recipient: age1b\n          enc: |\n            x\n        - recipient: age1a\n          enc: |\n            y\n    version: 3.11.0\n";
        assert_eq!(
            envelope(text).unwrap(),
            Envelope {
                names: vec!["db/app".into()],
                recipients: vec!["age1a".into(), "age1b".into()]
            }
        );
        assert_eq!(envelope("a: b\n"), None);
    }
}
