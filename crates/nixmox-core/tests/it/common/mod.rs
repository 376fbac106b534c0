//! Test helpers: read a project directory into `Sources` the way the shell does.

pub mod contract;

use std::fs;
use std::path::{Path, PathBuf};

use nixmox_core::{Loaded, SourceFile, Sources};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn read_sources(root: &Path) -> Sources {
    let read = |rel: &str| SourceFile {
        path: rel.to_string(),
        bytes: fs::read(root.join(rel)).unwrap(),
    };
    let mut manifests = Vec::new();
    if let Ok(rd) = fs::read_dir(root.join("services")) {
        let mut dirs: Vec<_> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            let name = d.file_name().unwrap().to_str().unwrap().to_string();
            for m in ["manifest.yaml", "manifest.yml", "manifest.json"] {
                if d.join(m).is_file() {
                    manifests.push(read(&format!("services/{name}/{m}")));
                }
            }
        }
    }
    Sources {
        config: root
            .join("nixmox.yaml")
            .is_file()
            .then(|| read("nixmox.yaml")),
        manifests,
        lock: root
            .join("nixmox.lock")
            .is_file()
            .then(|| read("nixmox.lock")),
    }
}

pub fn load_dir(root: &Path) -> Loaded {
    let sources = read_sources(root);
    let exists = |rel: &str| root.join(rel).exists();
    nixmox_core::load(&sources, &exists)
}

pub fn example() -> nixmox_core::Project {
    let loaded = load_dir(&repo_root().join("examples/homelab"));
    assert!(
        loaded.errors().next().is_none(),
        "{}",
        nixmox_core::diag::render_all(&loaded.diagnostics)
    );
    loaded.project.unwrap()
}
