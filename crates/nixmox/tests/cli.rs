//! End-to-end tests of the real `nixmox` binary: exit codes, stdout/stderr separation, and
//! what each command prints. One test binary, a module per command, one small builder.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn example() -> PathBuf {
    repo().join("examples/homelab")
}

/// Runs the binary and checks what came out.
struct Test {
    args: Vec<String>,
    project: Option<PathBuf>,
    env: Vec<(String, String)>,
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Test {
    fn new() -> Self {
        Test {
            args: Vec::new(),
            project: None,
            env: Vec::new(),
        }
    }
    fn project(mut self, p: impl Into<PathBuf>) -> Self {
        self.project = Some(p.into());
        self
    }
    fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    fn run(self) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixmox"));
        // As a user works: from inside the project directory, no `-C` (issue 11).
        if let Some(p) = &self.project {
            cmd.current_dir(p);
        }
        cmd.args(&self.args).env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("the binary runs");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }
}

impl Output {
    fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code, expected,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Copies a directory tree (for tests that write into a project).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

mod validate {
    use super::*;

    /// Issue 11: pools say where omitted vmids come from; an explicit one outside the pool
    /// (a numbering scheme of the user's own) is accepted without a word.
    #[test]
    fn an_explicit_vmid_outside_the_pool_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&example(), dir.path());
        let manifest = dir.path().join("services/vaultwarden/manifest.yaml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let text = text.replacen("host:\n", "host:\n  vmid: 4242\n", 1);
        assert!(text.contains("vmid: 4242"), "{text}");
        std::fs::write(&manifest, text).unwrap();
        let out = Test::new()
            .project(dir.path())
            .args(&["validate"])
            .run()
            .code(0);
        assert!(!out.stderr.contains("warning"), "{}", out.stderr);
        let config = Test::new()
            .project(dir.path())
            .args(&["config", "--format", "json", "vaultwarden"])
            .run()
            .code(0);
        assert!(config.stdout.contains("4242"), "{}", config.stdout);
    }

    #[test]
    fn example_prints_only_a_summary() {
        let out = Test::new()
            .project(example())
            .args(&["validate"])
            .run()
            .code(0);
        assert_eq!(out.stdout, "", "validate writes nothing to stdout");
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr
                .starts_with("ok: project `homelab` is valid: 9 services (4 core)"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn every_invalid_fixture_exits_2_with_located_errors_on_stderr() {
        let mut dirs: Vec<_> = std::fs::read_dir(repo().join("tests/fixtures/invalid"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let out = Test::new().project(&dir).args(&["validate"]).run();
            assert_eq!(out.code, 2, "{}: {}", dir.display(), out.stderr);
            assert_eq!(out.stdout, "", "{}", dir.display());
            assert!(
                out.stderr.contains("error: "),
                "{}: {}",
                dir.display(),
                out.stderr
            );
            assert!(
                out.stderr.contains("  --> "),
                "{}: every error names its file: {}",
                dir.display(),
                out.stderr
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        }
    }

    #[test]
    fn warnings_print_and_exit_0() {
        let mut dirs: Vec<_> = std::fs::read_dir(repo().join("tests/fixtures/warnings"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let out = Test::new().project(&dir).args(&["validate"]).run().code(0);
            assert!(
                out.stderr.contains("warning: "),
                "{}: {}",
                dir.display(),
                out.stderr
            );
            assert!(out.stderr.contains("ok: project"), "{}", out.stderr);
        }
    }

    #[test]
    fn locked_refuses_a_lock_that_must_change() {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&example(), dir.path());
        let out = Test::new()
            .project(dir.path())
            .args(&["validate", "--locked"])
            .run()
            .code(2);
        assert!(
            out.stderr.contains("nixmox.lock` is out of date"),
            "{}",
            out.stderr
        );
        // `validate` alone does not write the lock; `lock` does; then --locked passes.
        assert!(!dir.path().join("nixmox.lock").exists());
        Test::new()
            .project(dir.path())
            .args(&["lock", "--allocations-only"])
            .run()
            .code(0);
        let lock = std::fs::read_to_string(dir.path().join("nixmox.lock")).unwrap();
        assert!(lock.contains("vaultwarden:"), "{lock}");
        Test::new()
            .project(dir.path())
            .args(&["validate", "--locked"])
            .run()
            .code(0);
        let again = Test::new()
            .project(dir.path())
            .args(&["lock", "--allocations-only"])
            .run()
            .code(0);
        assert!(again.stderr.contains("up to date"));
    }

    #[test]
    fn missing_project_dir_is_a_usage_error() {
        let out = Test::new()
            .args(&["-C", "/nonexistent/nixmox", "validate"])
            .run()
            .code(2);
        assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    }

    #[test]
    fn unknown_flag_is_a_usage_error() {
        Test::new()
            .args(&["validate", "--frobnicate"])
            .run()
            .code(2);
    }
}

mod config {
    use super::*;

    #[test]
    fn resolved_yaml_and_json_agree() {
        let yaml = Test::new()
            .project(example())
            .args(&["config"])
            .run()
            .code(0);
        assert!(
            yaml.stdout.starts_with("version: 1\nproject: homelab\n"),
            "{}",
            yaml.stdout
        );
        assert_eq!(yaml.stderr, "");
        let json = Test::new()
            .project(example())
            .args(&["config", "--format", "json"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(
            v["services"]["guacamole"]["depends_on"]["postgresql"][0],
            "db"
        );
        assert_eq!(
            v["services"]["guacamole"]["depends_on"]["authentik"][0],
            "auth"
        );
        assert_eq!(
            v["services"]["vaultwarden"]["host"]["ip_source"],
            "allocated"
        );
    }

    #[test]
    fn selected_services_only_and_unknown_names_suggest() {
        let out = Test::new()
            .project(example())
            .args(&["config", "--format", "json", "guacamole"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["services"].as_object().unwrap().len(), 1);
        let out = Test::new()
            .project(example())
            .args(&["config", "guacamol"])
            .run()
            .code(2);
        assert!(
            out.stderr.contains("did you mean `guacamole`?"),
            "{}",
            out.stderr
        );
    }
}

mod plan {
    use super::*;

    #[test]
    fn text_and_json() {
        let out = Test::new().project(example()).args(&["plan"]).run().code(0);
        assert!(
            out.stdout.starts_with("Plan for project `homelab`"),
            "{}",
            out.stdout
        );
        let out = Test::new()
            .project(example())
            .args(&["plan", "--format", "json"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["steps"][0]["id"], "tf:infra");
        assert_eq!(v["steps"][0]["service"], serde_json::Value::Null);
        assert!(v["critical_path"].as_array().unwrap().len() > 3);
    }

    #[test]
    fn selection_adds_dependencies_unless_no_deps() {
        let out = Test::new()
            .project(example())
            .args(&["plan", "--format", "json", "guacamole"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let sel: Vec<&str> = v["selection"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(
            sel,
            ["authentik", "caddy", "dns", "guacamole", "postgresql"]
        );
        let out = Test::new()
            .project(example())
            .args(&["plan", "--format", "json", "--no-deps", "guacamole"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["service"].is_null() || s["service"] == "guacamole"));
    }

    #[test]
    fn detailed_exitcode_is_2_when_something_changes() {
        // Nothing is recorded yet, so everything is to be created.
        Test::new()
            .project(example())
            .args(&["plan", "--detailed-exitcode"])
            .run()
            .code(2);
    }
}

mod graph {
    use super::*;

    #[test]
    fn svg_is_well_formed_and_labels_edges() {
        let out = Test::new()
            .project(example())
            .args(&["graph", "--format", "svg"])
            .run()
            .code(0);
        let svg = out.stdout;
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Well-formed: every opened element is closed, in order.
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg.as_str();
        while let Some(i) = rest.find('<') {
            rest = &rest[i + 1..];
            let end = rest.find('>').expect("tag closes");
            let tag = &rest[..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        for label in [">db<", ">proxy<", ">auth<", ">dns<", ">depends_on<"] {
            assert!(svg.contains(label), "missing edge label {label}");
        }
        assert!(svg.contains("class=\"node core\""));
    }

    #[test]
    fn dot_and_mermaid_and_steps() {
        let dot = Test::new()
            .project(example())
            .args(&["graph"])
            .run()
            .code(0)
            .stdout;
        assert!(dot.starts_with("digraph"));
        assert!(
            dot.contains("\"postgresql\" -> \"guacamole\" [label=\"db\"]"),
            "{dot}"
        );
        let mm = Test::new()
            .project(example())
            .args(&["graph", "--format", "mermaid"])
            .run()
            .code(0)
            .stdout;
        assert!(mm.starts_with("flowchart TB"));
        let steps = Test::new()
            .project(example())
            .args(&["graph", "--steps"])
            .run()
            .code(0)
            .stdout;
        assert!(
            steps.contains("\"tf:infra\" -> \"nix:core:dns\""),
            "{steps}"
        );
    }
}

mod init {
    use super::*;

    #[test]
    fn scaffold_validates_and_ignores_state() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("My Lab");
        let out = Test::new()
            .args(&["init", target.to_str().unwrap()])
            .run()
            .code(0);
        assert!(
            out.stderr.contains("created project `my-lab`"),
            "{}",
            out.stderr
        );
        let gitignore = std::fs::read_to_string(target.join(".gitignore")).unwrap();
        assert!(gitignore.lines().any(|l| l == ".nixmox/"));
        let v = Test::new()
            .project(&target)
            .args(&["validate"])
            .run()
            .code(0);
        assert!(v.stderr.contains("5 services (4 core)"), "{}", v.stderr);
        // A second init refuses to overwrite.
        Test::new()
            .args(&["init", target.to_str().unwrap()])
            .run()
            .code(2);
    }
}

mod schema {
    use super::*;

    #[test]
    fn checked_in_schemas_are_current() {
        for (kind, file) in [
            ("project", "nixmox.schema.json"),
            ("manifest", "manifest.schema.json"),
        ] {
            let out = Test::new().args(&["schema", kind]).run().code(0);
            let checked_in = std::fs::read_to_string(repo().join("schema").join(file)).unwrap();
            assert_eq!(
                out.stdout, checked_in,
                "schema/{file} is stale: run `nixmox schema --out schema`"
            );
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
        }
    }
}

mod layout {
    use super::*;

    #[test]
    fn broken_pipe_is_quiet() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nixmox"))
            .arg("-C")
            .arg(example())
            .args(["config"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}
