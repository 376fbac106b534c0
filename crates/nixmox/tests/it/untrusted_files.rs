//! Issue 13, "Hostile manifests": a project from someone else, run through the real binary from
//! inside the project directory (relative paths, as a user would). Files: links out of the
//! project, FIFOs, wrong kinds, paths that climb out, only referenced files copied. Parsing and
//! output: secrets never echoed, `config --format yaml` read back by a real YAML parser,
//! `graph` bounded.
//!
//! Links and FIFOs are made at test time in a temporary directory (git keeps neither well).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{copy_dir, repo, Nixmox, Run};

/// A copy of a project in a temporary directory, next to an `outside/` directory that no
/// command may write into.
struct Sandbox {
    _tmp: tempfile::TempDir,
    project: PathBuf,
    outside: PathBuf,
}

impl Sandbox {
    fn of(example: &str) -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("project");
        copy_dir(&repo().join(example), &project);
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "the neighbour's secret\n").unwrap();
        Sandbox {
            _tmp: tmp,
            project,
            outside,
        }
    }

    fn homelab() -> Sandbox {
        Sandbox::of("examples/homelab")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.project.join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn link(&self, rel: &str, target: &Path) {
        let p = self.path(rel);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    fn fifo(&self, rel: &str) {
        let p = self.path(rel);
        let _ = std::fs::remove_file(&p);
        let ok = Command::new("mkfifo").arg(&p).status().unwrap().success();
        assert!(ok, "mkfifo {}", p.display());
    }

    /// Runs `nixmox ARGS` in the project directory; a command that has not finished after
    /// 60 s is killed and the test fails (a FIFO opened for reading blocks forever).
    fn run(&self, args: &[&str]) -> Run {
        Nixmox::new()
            .project(&self.project)
            .args(args)
            .limit(Duration::from_secs(60))
            .run()
    }

    /// Exit 2, and every `needle` on stderr; nothing written (no `.nixmox/`), nothing outside.
    fn refused(&self, args: &[&str], needles: &[&str]) -> Run {
        let before = self.outside_listing();
        let out = self.run(args);
        assert_eq!(
            out.code,
            2,
            "`nixmox {}`\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        for n in needles {
            assert!(out.stderr.contains(n), "missing {n:?} in:\n{}", out.stderr);
        }
        assert!(
            !self.path(".nixmox/build").exists(),
            "a refused command wrote a build"
        );
        assert_eq!(
            self.outside_listing(),
            before,
            "something was written outside the project"
        );
        self.no_temporary_build();
        out
    }

    /// Every file outside the project, with its contents.
    fn outside_listing(&self) -> Vec<(String, Vec<u8>)> {
        files_under(&self.outside)
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(self.outside.join(&f)).unwrap_or_default();
                (f, bytes)
            })
            .collect()
    }

    fn nothing_outside(&self) {
        assert_eq!(
            files_under(&self.outside),
            ["secret.txt"],
            "something was written outside"
        );
    }

    fn no_temporary_build(&self) {
        if let Ok(rd) = std::fs::read_dir(self.path(".nixmox")) {
            for e in rd {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.contains(".new-") && !name.contains(".old-"),
                    "left behind: .nixmox/{name}"
                );
            }
        }
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

mod files {
    use super::*;

    #[test]
    fn a_migration_linked_out_of_the_project_is_refused() {
        let s = Sandbox::homelab();
        s.link(
            "services/guacamole/migrations/001-init.sql",
            Path::new("/etc/passwd"),
        );
        let needles = [
            "services/guacamole/manifest.yaml:15:9",
            "interface.db.migrations[0]",
            "symbolic link that leads outside the project",
        ];
        s.refused(&["validate"], &needles);
        s.refused(&["render"], &needles);
    }

    #[test]
    fn a_service_directory_or_manifest_linked_out_is_refused() {
        let s = Sandbox::homelab();
        std::fs::create_dir_all(s.outside.join("evil")).unwrap();
        // (The test's own files outside are compared before and after each command.)
        std::fs::write(s.outside.join("evil/manifest.yaml"), "name: evil\n").unwrap();
        s.link("services/evil", &s.outside.join("evil"));
        s.refused(
            &["validate"],
            &["services/evil", "leads outside the project directory"],
        );
        std::fs::remove_file(s.path("services/evil")).unwrap();

        std::fs::write(s.outside.join("manifest.yaml"), "name: media\n").unwrap();
        s.link(
            "services/media/manifest.yaml",
            &s.outside.join("manifest.yaml"),
        );
        s.refused(
            &["validate"],
            &["services/media/manifest.yaml", "leads outside the project"],
        );

        // The project file itself, too.
        let s = Sandbox::homelab();
        std::fs::rename(s.path("nixmox.yaml"), s.outside.join("nixmox.yaml")).unwrap();
        s.link("nixmox.yaml", &s.outside.join("nixmox.yaml"));
        let out = s.run(&["validate"]);
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert!(
            out.stderr.contains("nixmox.yaml` leads outside"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn links_inside_the_project_are_followed() {
        let s = Sandbox::homelab();
        let sql =
            std::fs::read_to_string(s.path("services/guacamole/migrations/001-init.sql")).unwrap();
        s.write("shared/001-init.sql", &sql);
        s.link(
            "services/guacamole/migrations/001-init.sql",
            Path::new("../../../shared/001-init.sql"),
        );
        let out = s.run(&["render"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let copied =
            std::fs::read_to_string(s.path(".nixmox/build/nix/migrations/guacamole/001-init.sql"))
                .unwrap();
        assert_eq!(copied, sql);
        s.nothing_outside();
    }

    #[test]
    fn a_terraform_module_with_a_link_out_inside_it_is_refused() {
        let s = Sandbox::of("tests/fixtures/tf-project");
        s.link(
            "services/app/terraform/bucket/stolen.tf",
            &s.outside.join("secret.txt"),
        );
        s.refused(
            &["render"],
            &[
                "services/app/manifest.yaml:8:15",
                "interface.terraform.modules[0]",
                "`services/app/terraform/bucket/stolen.tf` is a symbolic link",
            ],
        );
    }

    #[test]
    fn a_fifo_never_blocks_and_leaves_no_temporary_build() {
        let s = Sandbox::homelab();
        s.fifo("services/guacamole/migrations/002-oidc-admins.sql");
        let needles = [
            "services/guacamole/manifest.yaml:16:9",
            "`services/guacamole/migrations/002-oidc-admins.sql` is a FIFO (named pipe)",
        ];
        s.refused(&["validate"], &needles);
        s.refused(&["render"], &needles);

        // Inside a referenced Terraform module.
        let s = Sandbox::of("tests/fixtures/tf-project");
        s.fifo("services/app/terraform/bucket/pipe.tf");
        s.refused(
            &["render"],
            &["`services/app/terraform/bucket/pipe.tf` is a FIFO"],
        );

        // A link loop inside a Terraform module (copying it would never end).
        let s = Sandbox::of("tests/fixtures/tf-project");
        s.link("services/app/terraform/bucket/loop", Path::new("."));
        s.refused(
            &["render"],
            &["`services/app/terraform/bucket/loop` is a symbolic link to a directory that contains it"],
        );

        // The manifest itself.
        let s = Sandbox::homelab();
        s.fifo("services/media/manifest.yaml");
        s.refused(
            &["validate"],
            &["services/media/manifest.yaml` is a FIFO (named pipe), not a regular file"],
        );

        // An unreferenced FIFO in a service directory is not the build's business.
        let s = Sandbox::homelab();
        s.fifo("services/guacamole/pipe");
        let out = s.run(&["render"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        s.no_temporary_build();
    }

    #[test]
    fn only_referenced_files_are_copied_into_the_build() {
        let s = Sandbox::homelab();
        s.write("services/guacamole/.env", "PASSWORD=hunter2\n");
        s.write("services/guacamole/notes/todo.txt", "private\n");
        s.write(
            "services/guacamole/migrations/999-unlisted.sql",
            "DROP TABLE x;\n",
        );
        let out = s.run(&["render"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let build = s.path(".nixmox/build");
        let files = files_under(&build);
        let guac: Vec<&String> = files.iter().filter(|f| f.contains("guacamole")).collect();
        for f in &guac {
            assert!(
                !f.contains(".env") && !f.contains("todo") && !f.contains("999"),
                "unreferenced file copied: {f}"
            );
        }
        assert!(files.contains(&"nix/services/guacamole/configuration.nix".to_string()));
        assert!(files.contains(&"nix/migrations/guacamole/001-init.sql".to_string()));
    }

    #[test]
    fn a_path_of_the_wrong_kind_is_a_located_error() {
        let s = Sandbox::homelab();
        let manifest = std::fs::read_to_string(s.path("services/guacamole/manifest.yaml"))
            .unwrap()
            .replace("./migrations/002-oidc-admins.sql", "./migrations")
            .replace(
                "modules: [./configuration.nix]",
                "modules: [\"\", ., ./configuration.nix]",
            );
        s.write("services/guacamole/manifest.yaml", &manifest);
        s.refused(
            &["validate"],
            &[
                "services/guacamole/manifest.yaml:7:20",
                "nixos.modules[0]",
                "`services/guacamole` names the service's directory",
                "services/guacamole/manifest.yaml:7:24",
                "nixos.modules[1]",
                "services/guacamole/manifest.yaml:16:9",
                "`services/guacamole/migrations` is a directory; a migration is a file",
            ],
        );

        let s = Sandbox::of("tests/fixtures/tf-project");
        let manifest = std::fs::read_to_string(s.path("services/app/manifest.yaml"))
            .unwrap()
            .replace("./terraform/bucket", "./terraform/bucket/main.tf");
        s.write("services/app/manifest.yaml", &manifest);
        s.refused(
            &["render"],
            &[
                "services/app/manifest.yaml:8:15",
                "is a file; a Terraform module is a directory",
            ],
        );
    }

    #[test]
    fn project_paths_may_not_climb_out_but_may_be_absolute() {
        let s = Sandbox::homelab();
        let config = std::fs::read_to_string(s.path("nixmox.yaml")).unwrap();
        let state = |path: &str| config.replace("path: .nixmox/state.db", &format!("path: {path}"));
        s.write("nixmox.yaml", &state("../outside/state.db"));
        s.refused(
            &["validate"],
            &[
                "nixmox.yaml:47:9",
                "state.path",
                "`../outside/state.db` climbs out of the project",
            ],
        );
        s.refused(&["render"], &["state.path"]);
        // Two levels up, and through a name first: still out.
        s.write("nixmox.yaml", &state("../../outside/state.db"));
        s.refused(&["validate"], &["state.path", "climbs out of the project"]);
        s.write("nixmox.yaml", &state("a/../../../outside/state.db"));
        s.refused(&["validate"], &["state.path", "climbs out of the project"]);

        // A local flake input is a project path too.
        let s = Sandbox::homelab();
        let config = std::fs::read_to_string(s.path("nixmox.yaml"))
            .unwrap()
            .replace(
                "nixpkgs: github:NixOS/nixpkgs/nixos-26.05",
                "inputs: { nixpkgs: \"path:../../home/someone/nixpkgs\" }",
            );
        assert!(config.contains("inputs: {"));
        s.write("nixmox.yaml", &config);
        s.refused(
            &["validate"],
            &["nix.inputs.nixpkgs", "climbs out of the project"],
        );

        let s = Sandbox::homelab();
        let config = std::fs::read_to_string(s.path("nixmox.yaml"))
            .unwrap()
            .replace(
                "token: { env: PROXMOX_API_TOKEN }",
                "token: { file: ../outside/secret.txt }",
            );
        s.write("nixmox.yaml", &config);
        s.refused(
            &["validate"],
            &["proxmox.token.file", "climbs out of the project"],
        );

        // Nor through a link inside the project.
        let s = Sandbox::homelab();
        s.link("state", &s.outside);
        s.write("nixmox.yaml", &state("state/state.db"));
        s.refused(&["render"], &["`state` is a symbolic link", "state.path"]);

        // An absolute path is the operator's explicit choice.
        let s = Sandbox::homelab();
        s.write(
            "nixmox.yaml",
            &state(&s.outside.join("state.db").display().to_string()),
        );
        let out = s.run(&["validate"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }

    #[test]
    fn a_build_directory_linked_out_of_the_project_is_refused() {
        let s = Sandbox::homelab();
        s.link(".nixmox", &s.outside);
        s.refused(
            &["render"],
            &["`.nixmox` is a symbolic link that leads outside the project"],
        );
    }
}

mod parsing {
    use super::*;

    #[test]
    fn a_token_written_in_the_project_file_is_never_printed() {
        let s = Sandbox::homelab();
        let token = "root@pam!nixmox=3f1a2b9c-8d7e-4f60-a1b2-c3d4e5f60718";
        let config = std::fs::read_to_string(s.path("nixmox.yaml"))
            .unwrap()
            .replace(
                "token: { env: PROXMOX_API_TOKEN }",
                &format!("token: {token}"),
            );
        s.write("nixmox.yaml", &config);
        let out = s.refused(
            &["validate"],
            &["nixmox.yaml:24:10", "proxmox.token", "<redacted>"],
        );
        assert!(!out.stderr.contains("3f1a2b9c"), "{}", out.stderr);
        // Whatever else is wrong on its line, and whatever its type.
        let config = config.replace(&format!("token: {token}"), "token: 271828182845");
        s.write("nixmox.yaml", &config);
        let out = s.refused(&["validate"], &["proxmox.token"]);
        assert!(!out.stderr.contains("271828182845"), "{}", out.stderr);
    }

    #[test]
    fn an_alias_bomb_in_an_ignored_key_is_stopped() {
        let s = Sandbox::homelab();
        let mut bomb = String::from("x-a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..12 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            bomb.push_str(&format!("x-a{i}: &a{i} [{refs}]\n"));
        }
        let config = std::fs::read_to_string(s.path("nixmox.yaml")).unwrap();
        s.write("nixmox.yaml", &format!("{config}\n{bomb}"));
        s.refused(&["validate"], &["nixmox.yaml:", "too many aliases"]);
    }

    /// Strings that YAML readers take for something else when printed bare.
    const ADVERSARIAL: &[&str] = &[
        ".inf",
        "-.inf",
        ".NaN",
        "2001-01-01",
        "2001-12-14t21:59:43.10-05:00",
        "1_000",
        "0o17",
        "0x1F",
        "0b101",
        "1:20",
        "=",
        "~",
        "null",
        "Null",
        "yes",
        "no",
        "on",
        "off",
        "y",
        "N",
        "True",
        "<<",
        "a\u{85}b",
        "a\u{2028}b",
        "a\u{2029}b",
        "tab\there",
        "bell\u{7}",
        "del\u{7f}",
        "c1\u{9b}x",
        "bom\u{feff}",
        " lead",
        "trail ",
        "a: b",
        "a #b",
        "#c",
        "-",
        "- x",
        "? x",
        "!tag",
        "&anchor",
        "*alias",
        "%percent",
        "@at",
        "`tick",
        "|",
        ">",
        "'q",
        "\"dq",
        "{a}",
        "[a]",
        "a,b",
        "back\\slash",
        "line\nbreak",
        "cr\rhere",
        // (A NUL is refused at load, issue 13: it cannot reach `config`.)
        "\u{1b}[31mred",
        "üñí",
        "1e3",
        "+1",
        "010",
        "0.",
        ".5",
        "12:30:00",
        "-1",
        "--",
        "---",
        "--- x",
        ".Inf",
        "-.5",
        "10s",
        "1m30s",
        "10.0.0.1/24",
        "1.2",
        "1.2.3",
        "Sonarr, Radarr",
        "f(x)",
        "-fsS",
        "--quiet",
        ".nixmox/state.db",
        "0",
        "-0",
        "12e",
        "1_0s",
        "2001-01-01 10:00:00",
    ];

    #[test]
    fn config_as_yaml_reads_back_identically_in_pyyaml() {
        let s = Sandbox::of("tests/fixtures/tf-project");
        // Every adversarial string as a Terraform variable value (printed verbatim by
        // `config`) and as a variable name.
        let mut vars = String::new();
        for (i, a) in ADVERSARIAL.iter().enumerate() {
            let q = serde_json::to_string(a).unwrap();
            vars.push_str(&format!("      v{i}: {q}\n"));
        }
        let manifest = std::fs::read_to_string(s.path("services/worker/manifest.yaml"))
            .unwrap()
            .replace(
                "    variables: { target: app.tf.lan }\n",
                &format!("    variables:\n      target: app.tf.lan\n{vars}"),
            );
        s.write("services/worker/manifest.yaml", &manifest);
        let yaml = s.run(&["config", "--format", "yaml"]);
        assert_eq!(yaml.code, 0, "{}", yaml.stderr);
        let json = s.run(&["config", "--format", "json"]);
        assert_eq!(json.code, 0, "{}", json.stderr);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("out.yaml"), &yaml.stdout).unwrap();
        // PyYAML (YAML 1.1, the strictest common reader about bare words and line breaks):
        // the printed YAML must load to exactly the JSON document.
        let script = "import json, sys, yaml\n\
             y = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\n\
             j = json.load(sys.stdin)\n\
             j.pop('version', None); y.pop('version', None)\n\
             sys.exit(0 if y == j else 'differs:\\n' + json.dumps(y, ensure_ascii=True)[:4000])\n";
        let python = python_with_yaml();
        let mut child = Command::new(python)
            .args(["-c", script])
            .arg(dir.path().join("out.yaml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(json.stdout.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "PyYAML read the YAML differently:\n{}\nYAML:\n{}",
            String::from_utf8_lossy(&out.stderr),
            yaml.stdout
        );
        for a in ADVERSARIAL {
            let q = serde_json::to_string(a).unwrap();
            assert!(json.stdout.contains(&q), "{a:?} missing from config");
        }
    }

    /// python3 with PyYAML: `scripts/install-tools pyyaml` (Debian's python3-yaml).
    fn python_with_yaml() -> PathBuf {
        for p in ["/usr/bin/python3", "python3"] {
            let ok = Command::new(p)
                .args(["-c", "import yaml"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return PathBuf::from(p);
            }
        }
        panic!("python3 with PyYAML is required: run `scripts/install-tools pyyaml`");
    }

    #[test]
    fn graph_of_a_huge_project_is_refused_with_a_message() {
        let s = Sandbox::of("tests/fixtures/tf-project");
        std::fs::remove_dir_all(s.path("services")).unwrap();
        let n = 160;
        for i in 0..n {
            let deps: Vec<String> = (0..i).map(|j| format!("s{j}")).collect();
            s.write(
                &format!("services/s{i}/manifest.yaml"),
                &format!(
                    "name: s{i}\nhost: {{ ip: 10.77.{}.{}, vmid: {} }}\ndepends_on: [{}]\n",
                    i / 200,
                    10 + i % 200,
                    1000 + i,
                    deps.join(", ")
                ),
            );
        }
        let config = std::fs::read_to_string(s.path("nixmox.yaml"))
            .unwrap()
            .replace(
                "network: { cidr: 10.77.0.0/24, gateway: 10.77.0.1 }",
                "network: { cidr: 10.77.0.0/16, gateway: 10.77.0.1 }\npools: { vmid: 1000-1999, ip: 10.77.9.1-10.77.9.99 }",
            );
        s.write("nixmox.yaml", &config);
        for format in ["svg", "dot", "mermaid"] {
            let out = s.run(&["graph", "--format", format]);
            assert_eq!(out.code, 2, "{format}: {}", out.stderr);
            assert!(out.stdout.is_empty(), "{format}: printed a graph anyway");
            assert!(
                out.stderr.contains("too large to draw"),
                "{format}: {}",
                out.stderr
            );
        }
    }
}
