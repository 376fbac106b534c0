//! End-to-end tests of the real `nixmox` binary: exit codes, stdout/stderr separation, and
//! what each command prints. A module per command; runs go through `common::Nixmox`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_dir, repo, Nixmox};

fn example() -> PathBuf {
    repo().join("examples/homelab")
}

mod validate {
    use super::*;

    /// As Docker Compose finds its file: from a directory inside the project (here a service's
    /// own, in a git repository), the nearest parent with `nixmox.yaml` is the project, and
    /// what is written lands in its `.nixmox/`. An explicit `-C` is taken as it is.
    #[test]
    fn a_command_in_a_subdirectory_finds_the_project_above() {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("lab");
        copy_dir(&example(), &project);
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(&project)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@t")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        git(&["add", "-A"]);
        git(&["commit", "-qm", "lab"]);
        let inside = project.join("services/vaultwarden");
        let out = Nixmox::new().cwd(&inside).args(["validate"]).run().code(0);
        assert!(
            out.stderr.contains("project `homelab` is valid"),
            "{}",
            out.stderr
        );
        Nixmox::new().cwd(&inside).args(["render"]).run().code(0);
        assert!(project.join(".nixmox/build/nix/flake.nix").is_file());
        assert!(!inside.join(".nixmox").exists());
        // `-C .` from inside is the same search; another `-C` is not searched from.
        let out = Nixmox::new()
            .cwd(&inside)
            .args(["-C", "../", "validate"])
            .run()
            .code(2);
        assert!(out.stderr.contains("no `nixmox.yaml`"), "{}", out.stderr);
    }

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
        let out = Nixmox::new()
            .project(dir.path())
            .args(["validate"])
            .run()
            .code(0);
        assert!(!out.stderr.contains("warning"), "{}", out.stderr);
        let config = Nixmox::new()
            .project(dir.path())
            .args(["config", "--format", "json", "vaultwarden"])
            .run()
            .code(0);
        assert!(config.stdout.contains("4242"), "{}", config.stdout);
    }

    #[test]
    fn example_prints_only_a_summary() {
        let out = Nixmox::new()
            .project(example())
            .args(["validate"])
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
            let out = Nixmox::new().project(&dir).args(["validate"]).run();
            assert_eq!(out.code, 2, "{}: {}", dir.display(), out.stderr);
            assert_eq!(out.stdout, "", "{}", dir.display());
            assert!(
                out.stderr.contains("error: "),
                "{}: {}",
                dir.display(),
                out.stderr
            );
            assert!(
                out.stderr.contains("--> "),
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
            let out = Nixmox::new().project(&dir).args(["validate"]).run().code(0);
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
        let out = Nixmox::new()
            .project(dir.path())
            .args(["validate", "--locked"])
            .run()
            .code(2);
        assert!(
            out.stderr.contains("nixmox.lock` is out of date"),
            "{}",
            out.stderr
        );
        // `validate` alone does not write the lock; `lock` does; then --locked passes.
        assert!(!dir.path().join("nixmox.lock").exists());
        Nixmox::new()
            .project(dir.path())
            .args(["lock", "--allocations-only"])
            .run()
            .code(0);
        let lock = std::fs::read_to_string(dir.path().join("nixmox.lock")).unwrap();
        assert!(lock.contains("vaultwarden:"), "{lock}");
        Nixmox::new()
            .project(dir.path())
            .args(["validate", "--locked"])
            .run()
            .code(0);
        let again = Nixmox::new()
            .project(dir.path())
            .args(["lock", "--allocations-only"])
            .run()
            .code(0);
        assert!(again.stderr.contains("up to date"));
    }

    #[test]
    fn missing_project_dir_is_a_usage_error() {
        let out = Nixmox::new()
            .args(["-C", "/nonexistent/nixmox", "validate"])
            .run()
            .code(2);
        assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    }

    #[test]
    fn unknown_flag_is_a_usage_error() {
        Nixmox::new()
            .args(["validate", "--frobnicate"])
            .run()
            .code(2);
    }
}

mod config {
    use super::*;

    #[test]
    fn resolved_yaml_and_json_agree() {
        let yaml = Nixmox::new()
            .project(example())
            .args(["config"])
            .run()
            .code(0);
        assert!(
            yaml.stdout.starts_with("version: 1\nproject: homelab\n"),
            "{}",
            yaml.stdout
        );
        assert_eq!(yaml.stderr, "");
        let json = Nixmox::new()
            .project(example())
            .args(["config", "--format", "json"])
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
        let out = Nixmox::new()
            .project(example())
            .args(["config", "--format", "json", "guacamole"])
            .run()
            .code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["services"].as_object().unwrap().len(), 1);
        let out = Nixmox::new()
            .project(example())
            .args(["config", "guacamol"])
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
        let out = Nixmox::new()
            .project(example())
            .args(["plan"])
            .run()
            .code(0);
        assert!(
            out.stdout.starts_with("Plan for project `homelab`"),
            "{}",
            out.stdout
        );
        let out = Nixmox::new()
            .project(example())
            .args(["plan", "--format", "json"])
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
        let out = Nixmox::new()
            .project(example())
            .args(["plan", "--format", "json", "guacamole"])
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
        let out = Nixmox::new()
            .project(example())
            .args(["plan", "--format", "json", "--no-deps", "guacamole"])
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
        Nixmox::new()
            .project(example())
            .args(["plan", "--detailed-exitcode"])
            .run()
            .code(2);
    }
}

mod graph {
    use super::*;

    #[test]
    fn svg_is_well_formed_and_labels_edges() {
        let out = Nixmox::new()
            .project(example())
            .args(["graph", "--format", "svg"])
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
        let dot = Nixmox::new()
            .project(example())
            .args(["graph"])
            .run()
            .code(0)
            .stdout;
        assert!(dot.starts_with("digraph"));
        assert!(
            dot.contains("\"postgresql\" -> \"guacamole\" [label=\"db\"]"),
            "{dot}"
        );
        let mm = Nixmox::new()
            .project(example())
            .args(["graph", "--format", "mermaid"])
            .run()
            .code(0)
            .stdout;
        assert!(mm.starts_with("flowchart TB"));
        let steps = Nixmox::new()
            .project(example())
            .args(["graph", "--steps"])
            .run()
            .code(0)
            .stdout;
        assert!(
            steps.contains("\"tf:infra\" -> \"nix:core:dns\""),
            "{steps}"
        );
    }
}

/// Issue 16: colour through anstream: styles only when asked, and the same text without them.
mod colour {
    use super::*;

    #[test]
    fn styles_are_stripped_unless_colour_is_forced() {
        let dir = repo().join("tests/fixtures/invalid/03-duplicate-yaml-key");
        let plain = Nixmox::new().project(&dir).args(["validate"]).run().code(2);
        assert!(!plain.stderr.contains('\u{1b}'), "{}", plain.stderr);
        // `NO_COLOR` empty counts as unset; `CLICOLOR_FORCE` asks for colour without a terminal.
        let forced = Nixmox::new()
            .project(&dir)
            .env("NO_COLOR", "")
            .env("CLICOLOR_FORCE", "1")
            .args(["validate"])
            .run()
            .code(2);
        assert!(forced.stderr.contains("\u{1b}["), "{}", forced.stderr);
        let mut stripped = String::new();
        let mut rest = forced.stderr.as_str();
        while let Some(i) = rest.find('\u{1b}') {
            stripped.push_str(&rest[..i]);
            let end = rest[i..].find('m').expect("an SGR sequence ends with m");
            rest = &rest[i + end + 1..];
        }
        stripped.push_str(rest);
        assert_eq!(stripped, plain.stderr);
    }
}

/// Issue 16: completion scripts and manual pages.
mod completion {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_on_stdout() {
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            for extra in [&[][..], &["--static"][..]] {
                let mut args = vec!["completion", shell];
                args.extend(extra);
                let out = Nixmox::new().args(&args).run().code(0);
                assert!(out.stdout.contains("nixmox"), "{shell} {extra:?}");
                assert!(out.stderr.is_empty(), "{}", out.stderr);
            }
        }
        Nixmox::new().args(["completion", "tcsh"]).run().code(2);
    }

    /// The registration script, loaded by a real bash, asks the binary for candidates: service
    /// names and step ids come from the project named with `-C`.
    #[test]
    fn bash_completes_services_and_steps_from_the_project() {
        let script = Nixmox::new()
            .args(["completion", "bash"])
            .run()
            .code(0)
            .stdout;
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_nixmox")).parent().unwrap();
        let complete = |words: &str| {
            let line = format!(
                "{script}\nCOMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9; _clap_complete_nixmox nixmox \"${{COMP_WORDS[COMP_CWORD]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\""
            );
            let out = Command::new("bash")
                .args(["-c", &line])
                .env(
                    "PATH",
                    format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
                )
                .output()
                .expect("bash runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut got: Vec<String> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            got.sort();
            got
        };
        let ex = example().display().to_string();
        assert_eq!(
            complete(&format!("nixmox -C {ex} up m")),
            ["media", "monitoring"]
        );
        assert_eq!(
            complete(&format!("nixmox -C {ex} logs nix:core:p")),
            ["nix:core:postgresql"]
        );
        assert!(complete("nixmox gr").contains(&"graph".to_string()));
    }

    #[test]
    fn man_pages_for_every_command() {
        let page = Nixmox::new().args(["man"]).run().code(0).stdout;
        assert!(page.contains(".TH nixmox 1"), "{page}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("man");
        let out = Nixmox::new()
            .args(["man", "--out", dir.to_str().unwrap()])
            .run()
            .code(0);
        assert!(out.stdout.is_empty());
        for page in [
            "nixmox.1",
            "nixmox-up.1",
            "nixmox-secrets-set.1",
            "nixmox-completion.1",
        ] {
            let text = std::fs::read_to_string(dir.join(page)).unwrap();
            assert!(text.contains(".SH NAME"), "{page}");
        }
    }
}

mod init {
    use super::*;

    #[test]
    fn scaffold_validates_and_ignores_state() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("My Lab");
        let out = Nixmox::new()
            .args(["init", target.to_str().unwrap()])
            .run()
            .code(0);
        assert!(
            out.stderr.contains("created project `my-lab`"),
            "{}",
            out.stderr
        );
        let gitignore = std::fs::read_to_string(target.join(".gitignore")).unwrap();
        assert!(gitignore.lines().any(|l| l == ".nixmox/"));
        let v = Nixmox::new()
            .project(&target)
            .args(["validate"])
            .run()
            .code(0);
        assert!(v.stderr.contains("5 services (4 core)"), "{}", v.stderr);
        // A second init refuses to overwrite.
        Nixmox::new()
            .args(["init", target.to_str().unwrap()])
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
            let out = Nixmox::new().args(["schema", kind]).run().code(0);
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
        let mut child = Nixmox::new()
            .project(example())
            .args(["config"])
            .command()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

/// Issue 13, hostile manifests: one project per class under `tests/fixtures/hostile/`, run from
/// inside the project as a user would. Each is refused with every problem located
/// (file:line:col and field), exit 2 and nothing on stdout, or renders with every string
/// escaped for its language.
mod hostile {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        repo().join("tests/fixtures/hostile").join(name)
    }

    /// `validate` in the project directory: exit 2, and each `(location, field)` reported.
    fn refused(name: &str, expected: &[(&str, &str)]) -> String {
        let out = Nixmox::new()
            .cwd(fixture(name))
            .args(["validate"])
            .run()
            .code(2);
        assert_eq!(out.stdout, "", "{name}: nothing on stdout");
        for (at, field) in expected {
            let loc = format!("--> {at}\n");
            let i = out
                .stderr
                .find(&loc)
                .unwrap_or_else(|| panic!("{name}: no error at {at}:\n{}", out.stderr));
            // The caret line under the snippet names the field.
            let block: String = out.stderr[i..]
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                block.ends_with(&format!(" {field}")),
                "{name}: the error at {at} should name `{field}`:\n{block}"
            );
        }
        assert!(
            !out.stderr.contains('\u{1b}') && !out.stderr.contains('\r'),
            "{name}: raw control characters on the terminal:\n{}",
            out.stderr
        );
        out.stderr
    }

    #[test]
    fn command_line_values_have_a_grammar() {
        let err = refused(
            "command-lines",
            &[
                ("nixmox.yaml:4:60", "network.bridge"),
                ("nixmox.yaml:5:18", "proxmox.node"),
                ("nixmox.yaml:5:33", "proxmox.storage"),
                ("nixmox.yaml:5:53", "proxmox.template"),
                ("nixmox.yaml:7:9", "ssh.user"),
                ("nixmox.yaml:9:20", "secrets.age_recipients"),
                ("services/app/manifest.yaml:2:15", "host.node"),
                (
                    "services/app/manifest.yaml:6:15",
                    "interface.terraform.targets[0]",
                ),
                (
                    "services/app/manifest.yaml:7:19",
                    "interface.terraform.apply_order[0]",
                ),
            ],
        );
        assert!(err.contains("invalid login name `-oProxyCommand"), "{err}");
        assert!(!Path::new("/tmp/nixmox-pwned").exists());
    }

    #[test]
    fn terraform_meta_arguments_and_inexact_numbers_are_refused() {
        refused(
            "terraform",
            &[
                ("nixmox.yaml:12:18", "terraform.backend.config.retry_max"),
                (
                    "services/app/manifest.yaml:6:7",
                    "interface.terraform.variables.source",
                ),
                (
                    "services/app/manifest.yaml:7:7",
                    "interface.terraform.variables.count",
                ),
                (
                    "services/app/manifest.yaml:8:7",
                    "interface.terraform.variables.depends_on",
                ),
                (
                    "services/app/manifest.yaml:9:12",
                    "interface.terraform.variables.big",
                ),
                (
                    "services/app/manifest.yaml:10:13",
                    "interface.terraform.variables.huge",
                ),
            ],
        );
    }

    #[test]
    fn postgres_reserved_names_and_other_services_roles_are_refused() {
        let err = refused(
            "postgres",
            &[
                ("services/app/manifest.yaml:4:30", "interface.db[0].role"),
                (
                    "services/app/manifest.yaml:5:19",
                    "interface.db[1].database",
                ),
                ("services/app/manifest.yaml:6:31", "interface.db[2].role"),
                ("services/app/manifest.yaml:7:31", "interface.db[3].role"),
                ("services/other/manifest.yaml:3:32", "interface.db.role"),
            ],
        );
        assert!(err.contains("share_role_with"), "{err}");
    }

    #[test]
    fn caddy_placeholders_are_refused() {
        refused(
            "caddy",
            &[
                (
                    "services/app/manifest.yaml:7:18",
                    "interface.proxy[0].headers.X-Token",
                ),
                (
                    "services/app/manifest.yaml:8:17",
                    "interface.proxy[0].headers.X-Home",
                ),
                (
                    "services/app/manifest.yaml:10:13",
                    "interface.proxy[1].path",
                ),
            ],
        );
    }

    #[test]
    fn dns_names_of_other_hosts_and_outside_the_domain_are_refused() {
        let err = refused(
            "dns",
            &[
                (
                    "services/app/manifest.yaml:4:9",
                    "interface.proxy[0].domain",
                ),
                (
                    "services/app/manifest.yaml:5:9",
                    "interface.proxy[1].domain",
                ),
            ],
        );
        assert!(err.contains("is the host name of `web`"), "{err}");
        assert!(err.contains("outside the project's domain"), "{err}");
    }

    #[test]
    fn authorized_keys_are_one_line_each() {
        refused(
            "authorized-keys",
            &[
                ("nixmox.yaml:7:7", "ssh.authorized_keys[0]"),
                ("nixmox.yaml:8:7", "ssh.authorized_keys[1]"),
            ],
        );
    }

    #[test]
    fn nul_characters_are_refused_everywhere() {
        refused(
            "nix-nul",
            &[
                ("services/app/manifest.yaml:2:14", "description"),
                (
                    "services/app/manifest.yaml:5:41",
                    "interface.health.liveness.command[2]",
                ),
            ],
        );
    }

    #[test]
    fn control_characters_never_reach_the_terminal_raw() {
        let err = refused(
            "terminal",
            &[
                ("services/app/manifest.yaml:2:14", "depends_on"),
                ("services/app/manifest.yaml:3:19", "host.hostname"),
            ],
        );
        // The forged line is shown as one escaped line, not as a line of its own.
        assert!(
            err.contains("\\u{1b}[2J\\u{1b}[31mfake\\u{a}error: forged line"),
            "{err}"
        );
        assert!(
            !err.lines().any(|l| l.starts_with("error: forged")),
            "{err}"
        );
    }

    #[test]
    fn valid_hostile_strings_render_escaped_for_each_language() {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("p");
        copy_dir(&fixture("render-escapes"), &project);
        Nixmox::new()
            .cwd(&project)
            .args(["render", "--out", "build"])
            .run()
            .code(0);
        let build = project.join("build");
        // Terraform JSON: every user string and key has `${`/`%{` doubled, none is left live.
        let ws = "terraform/services/app/infra/main.tf.json";
        let text = std::fs::read_to_string(build.join(ws)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let module = &json["module"]["tf_0_0"];
        assert_eq!(module["source"], "../modules/tf_0_0");
        assert_eq!(
            module["settings"]["$${file(\"/etc/shadow\")}"],
            "%%{ if true }x%%{ endif } $${path.cwd}"
        );
        assert_eq!(module["settings"]["plain"], 9007199254740992u64);
        let backend = &json["terraform"]["backend"]["http"];
        assert_eq!(
            backend["address"],
            "https://state.lan/$${path.cwd}/app-infra"
        );
        assert_eq!(
            backend["$${file(\"/etc/shadow\")}"],
            "%%{ for x in [1] }x%%{ endfor }"
        );
        // Caddy: the header value is one literal token; backslashes are not doubled.
        let caddy = std::fs::read_to_string(build.join("nix/hosts/caddy.nix")).unwrap();
        assert!(
            caddy.contains(r#"header X-Path `C:\dir\ "quoted" $HOME \\ end\`"#),
            "{caddy}"
        );
        assert!(
            caddy.contains("@route0 path /a$b'c(d) /a$b'c(d)/*"),
            "{caddy}"
        );
    }
}
