//! Fuzzes parse + validate + render: the input is split on NUL bytes into `nixmox.yaml`, one
//! or two manifests and, when there is a fourth part, `nixmox.lock`; `load` must never panic
//! and every diagnostic must be well formed. When the input is a valid project, it is rendered
//! and every file must keep its language's grammar (issue 13): each `.nix` file parses (rnix),
//! and `render::verify` finds no live Terraform template, no pg_hba line outside its grammar and
//! no Caddy token holding a placeholder.
//!
//! Run with `cargo fuzz run parse_validate` from the repository root (see docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmox_core::{load, SourceFile, Sources};

/// Line breaks as YAML counts them: `\n`, `\r\n`, and a lone `\r`.
fn line_breaks(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == 0);
    let file = |path: &str, bytes: &[u8]| SourceFile {
        path: path.to_string(),
        bytes: bytes.to_vec(),
    };
    let config = parts.next().map(|b| file("nixmox.yaml", b));
    let mut manifests = Vec::new();
    if let Some(b) = parts.next() {
        manifests.push(file("services/a/manifest.yaml", b));
    }
    if let Some(b) = parts.next() {
        // The second manifest is JSON when it looks like JSON, to reach that parser too.
        let path = if b.trim_ascii_start().starts_with(b"{") {
            "services/b/manifest.json"
        } else {
            "services/b/manifest.yml"
        };
        manifests.push(file(path, b));
    }
    let lock = parts.next().map(|b| file("nixmox.lock", b));
    let sources = Sources {
        config,
        manifests,
        lock,
    };
    // Referenced paths exist unless their name says otherwise, so both branches run.
    let exists = |p: &str| !p.contains("missing");
    let loaded = load(&sources, &exists);

    let files: Vec<&SourceFile> = sources
        .config
        .iter()
        .chain(&sources.manifests)
        .chain(&sources.lock)
        .collect();
    for d in &loaded.diagnostics {
        assert!(!d.message.trim().is_empty(), "empty message: {d:?}");
        if let Some(span) = d.span {
            assert!(
                span.line >= 1 && span.col >= 1,
                "span before the start: {d:?}"
            );
            if let Some(f) = files.iter().find(|f| f.path == d.file) {
                // A span may point just past the last line break (end of input), not further.
                let max_line = line_breaks(&f.bytes) + 1;
                assert!(
                    span.line as usize <= max_line,
                    "line {} past the end of {} ({max_line} lines): {d:?}",
                    span.line,
                    d.file
                );
            }
        }
        let _ = d.render();
    }
    if let Some(project) = &loaded.project {
        assert_eq!(loaded.errors().count(), 0, "a project despite errors");
        let rendered = nixmox_core::render::render(project, &Default::default());
        let problems = nixmox_core::render::verify::rendered(project, &rendered);
        assert!(
            problems.is_empty(),
            "rendered output broke its grammar: {problems:?}"
        );
        for f in rendered.files.iter().filter(|f| f.path.ends_with(".nix")) {
            let parsed = rnix::Root::parse(&f.contents);
            assert!(
                parsed.errors().is_empty(),
                "{} does not parse: {:?}\n{}",
                f.path,
                parsed.errors(),
                f.contents
            );
        }
    }
});
