//! Reads the project's `flake.lock` (written by `nix flake lock`, committed at the project
//! root): which revision each of the rendered flake's inputs is locked to.
//!
//! The planner takes the result as an argument, so a changed lock changes the input of every
//! `nix:*` step that builds from the input, with a reason naming the old and new revisions.

use std::collections::BTreeMap;

use serde_json::Value;

/// The project's flake lock file, at the project root.
pub const FLAKE_LOCK: &str = "flake.lock";

/// One locked input of the flake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockedInput {
    /// What identifies the locked contents: the revision when the input has one (git,
    /// GitHub), else the NAR hash (a `path:` input).
    pub id: String,
    /// A short form for people: 12 characters of the revision, or the NAR hash's start.
    pub short: String,
}

/// The flake's direct inputs, by name, as the lock file pins them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlakeLock {
    pub inputs: BTreeMap<String, LockedInput>,
}

/// Parses a `flake.lock` (format versions 5 to 7). Returns a message for anything that is
/// not one.
pub fn parse(bytes: &[u8]) -> Result<FlakeLock, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("`{FLAKE_LOCK}` is not JSON: {e}"))?;
    let version = v["version"].as_u64().unwrap_or(0);
    if !(5..=7).contains(&version) {
        return Err(format!(
            "`{FLAKE_LOCK}` has version {version}, not one of 5 to 7 this NixMox reads"
        ));
    }
    let nodes = v["nodes"]
        .as_object()
        .ok_or_else(|| format!("`{FLAKE_LOCK}` has no `nodes`"))?;
    let root_name = v["root"].as_str().unwrap_or("root");
    let root = nodes
        .get(root_name)
        .ok_or_else(|| format!("`{FLAKE_LOCK}` has no root node `{root_name}`"))?;
    let mut inputs = BTreeMap::new();
    for (name, target) in root["inputs"].as_object().into_iter().flatten() {
        // A direct input names its node; a list is a `follows` path to another input's input.
        let Some(node_name) = target.as_str() else {
            continue;
        };
        let Some(node) = nodes.get(node_name) else {
            return Err(format!(
                "`{FLAKE_LOCK}`: input `{name}` names the missing node `{node_name}`"
            ));
        };
        let locked = &node["locked"];
        let id = locked["rev"]
            .as_str()
            .or_else(|| locked["narHash"].as_str())
            .ok_or_else(|| format!("`{FLAKE_LOCK}`: input `{name}` is not locked"))?;
        let short = match locked["rev"].as_str() {
            Some(rev) => rev.chars().take(12).collect(),
            None => id
                .trim_start_matches("sha256-")
                .chars()
                .take(12)
                .collect::<String>(),
        };
        inputs.insert(
            name.clone(),
            LockedInput {
                id: id.to_string(),
                short,
            },
        );
    }
    Ok(FlakeLock { inputs })
}

impl FlakeLock {
    /// `nixpkgs: 1a2b3c4d5e6f → 9f8e7d6c5b4a` lines for the inputs whose lock changed.
    pub fn changes(&self, new: &FlakeLock) -> Vec<String> {
        let mut out = Vec::new();
        for (name, n) in &new.inputs {
            match self.inputs.get(name) {
                Some(o) if o.id == n.id => {}
                Some(o) => out.push(format!("{name}: {} → {}", o.short, n.short)),
                None => out.push(format!("{name}: (new) → {}", n.short)),
            }
        }
        for name in self.inputs.keys() {
            if !new.inputs.contains_key(name) {
                out.push(format!("{name}: removed"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"{
      "nodes": {
        "nixpkgs": {
          "locked": { "lastModified": 1, "narHash": "sha256-AAAABBBBCCCCDDDD=", "owner": "NixOS",
                      "repo": "nixpkgs", "rev": "0123456789abcdef0123456789abcdef01234567", "type": "github" },
          "original": { "owner": "NixOS", "ref": "nixos-26.05", "repo": "nixpkgs", "type": "github" }
        },
        "sops-nix": {
          "inputs": { "nixpkgs": ["nixpkgs"] },
          "locked": { "narHash": "sha256-ZZZZYYYYXXXXWWWW=", "path": "/stubs/sops-nix", "type": "path" },
          "original": { "path": "/stubs/sops-nix", "type": "path" }
        },
        "root": { "inputs": { "nixpkgs": "nixpkgs", "sops-nix": "sops-nix" } }
      },
      "root": "root",
      "version": 7
    }"#;

    #[test]
    fn flake_lock_reads_revisions_and_nar_hashes() {
        let lock = parse(LOCK.as_bytes()).unwrap();
        assert_eq!(
            lock.inputs["nixpkgs"].id,
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(lock.inputs["nixpkgs"].short, "0123456789ab");
        assert_eq!(lock.inputs["sops-nix"].id, "sha256-ZZZZYYYYXXXXWWWW=");
        assert_eq!(lock.inputs["sops-nix"].short, "ZZZZYYYYXXXX");
    }

    #[test]
    fn flake_lock_changes_name_old_and_new() {
        let old = parse(LOCK.as_bytes()).unwrap();
        let newer = LOCK.replace(
            "0123456789abcdef0123456789abcdef01234567",
            "fedcba9876543210fedcba9876543210fedcba98",
        );
        let new = parse(newer.as_bytes()).unwrap();
        assert_eq!(
            old.changes(&new),
            vec!["nixpkgs: 0123456789ab → fedcba987654".to_string()]
        );
        assert!(old.changes(&old).is_empty());
    }

    #[test]
    fn flake_lock_rejects_what_is_not_one() {
        assert!(parse(b"{").unwrap_err().contains("not JSON"));
        assert!(parse(br#"{"version": 3, "nodes": {}}"#)
            .unwrap_err()
            .contains("version 3"));
    }
}
