//! `nixmox render` checked with the real tools: every generated `.nix` file parses with
//! `nix-instantiate --parse`, its data evaluates to exactly what the manifests say (awkward
//! strings included), and a Terraform workspace of user modules passes `terraform init`,
//! `validate` and `apply` offline. Missing tools fail the test with the command that installs
//! them (`scripts/install-tools`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{repo, tool, Nixmox};

fn render(project: &Path, out: &Path) {
    Nixmox::new()
        .project(project)
        .args(["render", "--out"])
        .arg(out)
        .run()
        .code(0);
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            nix_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "nix") {
            out.push(p);
        }
    }
}

fn parse_all(build: &Path) -> usize {
    let nix = tool("nix-instantiate", "nix");
    let mut files = Vec::new();
    nix_files(&build.join("nix"), &mut files);
    for f in &files {
        let out = Command::new(&nix)
            .args(["--store", "dummy://", "--parse"])
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    files.len()
}

/// Evaluates an attribute of a host configuration with stand-ins for the module arguments
/// (the pure data parts need nothing from nixpkgs).
fn eval_host(build: &Path, host: &str, attr: &str) -> serde_json::Value {
    let file = build.join(format!("nix/hosts/{host}.nix"));
    let expr = format!(
        r#"let
  f = import {file};
  m = f {{
    config = m // {{
      sops.secrets = builtins.mapAttrs (n: v: v // {{ path = "/run/secrets/" + n; }}) (m.sops.secrets or {{ }});
      sops.templates = builtins.mapAttrs (n: v: v // {{ path = "/run/secrets/rendered/" + n; }}) (m.sops.templates or {{ }});
      sops.placeholder = builtins.mapAttrs (n: _: "<SOPS:${{builtins.hashString "sha256" n}}:PLACEHOLDER>") (m.sops.secrets or {{ }});
      services = (m.services or {{ }}) // {{ postgresql = ((m.services or {{ }}).postgresql or {{ }}) // {{ package = "postgresql"; }}; }};
    }};
    lib = {{ }};
    pkgs = {{ }};
    modulesPath = "/modules";
    inputs = {{ sops-nix.nixosModules.sops = {{ }}; authentik-nix.nixosModules.default = {{ }}; }};
  }};
in m.{attr}"#,
        file = file.display()
    );
    nix_eval(&expr, &format!("{host}.{attr}"))
}

/// `nix-instantiate --eval --strict --json` of an expression (no store needed).
fn nix_eval(expr: &str, what: &str) -> serde_json::Value {
    let nix = tool("nix-instantiate", "nix");
    let out = Command::new(&nix)
        .args([
            "--store", "dummy://", "--eval", "--strict", "--json", "-E", expr,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "eval of {what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn example_renders_parsable_nix_with_the_right_facts() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    render(&repo().join("examples/homelab"), &build);
    assert!(parse_all(&build) >= 10);

    let db = eval_host(&build, "guacamole", "nixmox.db.guacamole");
    assert_eq!(db["host"], "postgresql.nixmox.lan");
    assert_eq!(db["role"], "guacamole");
    assert_eq!(db["port"], 5432);
    assert_eq!(db["passwordFile"], "/run/secrets/db/guacamole");
    let oidc = eval_host(&build, "guacamole", "nixmox.oidc");
    assert_eq!(oidc["clientId"], "guacamole-oidc");
    assert_eq!(
        oidc["issuer"],
        "https://auth.nixmox.lan/application/o/guacamole/"
    );
    assert!(
        oidc.get("clientSecretFile").is_none(),
        "a public client has no secret"
    );

    let addrs = eval_host(
        &build,
        "guacamole",
        "networking.interfaces.eth0.ipv4.addresses",
    );
    assert_eq!(
        addrs,
        serde_json::json!([{"address": "192.168.99.16", "prefixLength": 24}])
    );
    assert_eq!(
        eval_host(&build, "guacamole", "networking.nameservers"),
        serde_json::json!(["192.168.99.10"])
    );

    let records = eval_host(&build, "dns", "nixmox.dns.records");
    assert_eq!(
        records["guac.nixmox.lan"], "192.168.99.12",
        "proxied domains point at caddy"
    );
    assert_eq!(records["guacamole.nixmox.lan"], "192.168.99.16");

    let ensure = eval_host(&build, "postgresql", "services.postgresql.ensureDatabases");
    assert_eq!(
        ensure,
        serde_json::json!([
            "authentik",
            "guacamole",
            "nextcloud",
            "prowlarr",
            "radarr",
            "sonarr",
            "vaultwarden"
        ])
    );
    let hba = eval_host(&build, "postgresql", "services.postgresql.authentication");
    assert!(
        hba.as_str().unwrap().contains(
            "host  guacamole            guacamole            192.168.99.16/32   scram-sha-256"
        ),
        "{hba}"
    );

    // authentik's environment file is a sops-nix template built from the generated secret key
    // and its database password (sops-nix replaces the placeholders at activation).
    let env = eval_host(&build, "authentik", "services.authentik.environmentFile");
    assert_eq!(env, "/run/secrets/rendered/authentik.env");
    let tpl = eval_host(&build, "authentik", "sops.templates.\"authentik.env\"");
    let content = tpl["content"].as_str().unwrap();
    let ph = |n: &str| {
        format!(
            "<SOPS:{}:PLACEHOLDER>",
            nixmox::secrets::index::sha256_hex(n.as_bytes())
        )
    };
    assert_eq!(
        content,
        format!(
            "AUTHENTIK_SECRET_KEY={}\nAUTHENTIK_POSTGRESQL__PASSWORD={}\n",
            ph("authentik/secret_key"),
            ph("db/authentik")
        ),
        "{content}"
    );
    assert_eq!(
        tpl["restartUnits"],
        serde_json::json!(["authentik.service", "authentik-worker.service"])
    );
    let declared = eval_host(&build, "authentik", "sops.secrets");
    assert!(declared.get("authentik/secret_key").is_some(), "{declared}");
    assert!(declared.get("db/authentik").is_some(), "{declared}");
    assert!(declared.get("authentik/env").is_none(), "{declared}");

    let vhosts = eval_host(&build, "caddy", "services.caddy.virtualHosts");
    let guac = vhosts["guac.nixmox.lan"]["extraConfig"].as_str().unwrap();
    assert!(
        guac.contains("@route0 path /guacamole /guacamole/*") && guac.contains("handle @route0 {"),
        "{guac}"
    );
    assert!(
        guac.contains("header X-Frame-Options `SAMEORIGIN`"),
        "{guac}"
    );
    let sonarr = vhosts["sonarr.nixmox.lan"]["extraConfig"].as_str().unwrap();
    assert!(
        sonarr.contains("forward_auth http://192.168.99.13:9000"),
        "{sonarr}"
    );

    // The flake pins nixpkgs from nixmox.yaml and lists every host for nixos-rebuild and colmena.
    let inputs = nix_eval(
        &format!("(import {}).inputs", build.join("nix/flake.nix").display()),
        "the flake's inputs",
    );
    assert_eq!(inputs["nixpkgs"]["url"], "github:NixOS/nixpkgs/nixos-26.05");
    assert_eq!(
        inputs["authentik-nix"]["url"],
        "github:nix-community/authentik-nix"
    );
}

/// The flake's outputs with a stand-in for the few nixpkgs `lib` functions they use.
fn eval_flake_outputs(build: &Path, attr: &str) -> serde_json::Value {
    let expr = format!(
        r#"let
  suffix = suf: s: let ls = builtins.stringLength s; lf = builtins.stringLength suf; in lf <= ls && builtins.substring (ls - lf) lf s == suf;
  lib = {{
    hasSuffix = suffix;
    removeSuffix = suf: s: if suffix suf s then builtins.substring 0 (builtins.stringLength s - builtins.stringLength suf) s else s;
    filterAttrs = pred: set: builtins.listToAttrs (builtins.concatMap (n: if pred n set.${{n}} then [ {{ name = n; value = set.${{n}}; }} ] else [ ]) (builtins.attrNames set));
    genAttrs = names: f: builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) names);
    nixosSystem = args: {{ inherit (args) system; modules = map toString args.modules; }};
  }};
  out = (import {flake}).outputs {{ self = {{ }}; nixpkgs = {{ inherit lib; }}; }};
in out.{attr}"#,
        flake = build.join("nix/flake.nix").display()
    );
    nix_eval(&expr, &format!("the flake's {attr}"))
}

#[test]
fn the_flake_finds_every_host_for_nixos_rebuild_and_colmena() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    render(&repo().join("examples/homelab"), &build);
    let configs = eval_flake_outputs(&build, "nixosConfigurations");
    let hosts: Vec<&str> = configs
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        hosts,
        [
            "authentik",
            "caddy",
            "dns",
            "guacamole",
            "media",
            "monitoring",
            "nextcloud",
            "postgresql",
            "vaultwarden"
        ]
    );
    assert!(configs["dns"]["modules"][0]
        .as_str()
        .unwrap()
        .ends_with("/hosts/dns.nix"));
    let deployment = eval_flake_outputs(&build, "colmena.guacamole.deployment");
    assert_eq!(
        deployment,
        serde_json::json!({"tags": ["service", "guacamole"], "targetHost": "192.168.99.16", "targetUser": "root"})
    );
}

/// The one Nix string printer reads back exactly in real Nix, for thousands of strings built
/// from the pieces that matter to its two forms (`"..."` and `''...''`): quotes, `${`, `''`,
/// backslashes, indentation, blank and space-only lines, tabs and carriage returns. A space-only
/// last line once lost its spaces in the indented form (found by the hostile-strings test).
#[test]
fn the_nix_string_printer_is_exact() {
    use nixmox_core::nixexpr::{Nix, Part};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    const PIECES: &[&str] = &[
        "a", " ", "  ", "\n", "\n ", "\n  ", "\t", "\r", "'", "''", "'''", "$", "${", "$${", "}",
        "\\", "\"", "ü", "x y", "#",
    ];
    let strategy =
        prop::collection::vec(prop::sample::select(PIECES), 0..9).prop_map(|v| v.concat());
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut strings: Vec<String> = (0..3000)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    strings.push("\nhandle {\n respond pwned\n}\n ".into());
    // Plain strings, and each pair of neighbours around an interpolation of `x`.
    let mut exprs: Vec<Nix> = strings.iter().map(|s| Nix::str(s.as_str())).collect();
    let mut want = strings.clone();
    for pair in strings.chunks(2) {
        let (a, b) = (&pair[0], pair.get(1).cloned().unwrap_or_default());
        exprs.push(Nix::Interp(vec![
            Part::Lit(a.clone()),
            Part::Expr(Nix::Code("x")),
            Part::Lit(b.clone()),
        ]));
        want.push(format!("{a}X{b}"));
    }
    let expr = format!("let x = \"X\"; in {}", Nix::List(exprs.clone()).print(0));
    let back = nix_eval(&expr, "the printed strings");
    let back: Vec<String> = serde_json::from_value(back).unwrap();
    assert_eq!(back.len(), want.len());
    for ((want, got), e) in want.iter().zip(&back).zip(&exprs) {
        assert_eq!(got, want, "printed as:\n{}", e.print(0));
    }
}

#[test]
fn awkward_strings_reach_nix_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    render(&repo().join("tests/fixtures/render-safety"), &build);
    parse_all(&build);
    // The description's carriage return cannot end the header comment and inject code.
    assert_eq!(eval_host(&build, "app", "networking.hostName"), "app");
    let oidc = eval_host(&build, "app", "nixmox.oidc");
    assert_eq!(oidc["usernameClaim"], "user \"${name}\" '' \\ ü");
    assert_eq!(oidc["groupsClaim"], "groups\ttabbed");
    assert_eq!(oidc["clientId"], "app-${client}");
    assert_eq!(
        oidc["redirectUris"],
        serde_json::json!(["https://app.safe.lan/cb?x=${y}&q=''"])
    );
    assert_eq!(
        oidc["scopes"],
        serde_json::json!(["openid", "weird ${scope} ''"])
    );
    let keys = eval_host(&build, "app", "users.users.ops.openssh.authorizedKeys.keys");
    assert_eq!(keys[0], "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0zZ1example0key0material0here \"quoted\" ${x} comment");
    let vhosts = eval_host(&build, "caddy", "services.caddy.virtualHosts");
    let conf = vhosts["app.safe.lan"]["extraConfig"].as_str().unwrap();
    // Caddyfile quoting on top of Nix escaping: the header value arrives as one backtick-quoted
    // token, which Caddy takes literally (no backslash doubled; issue 13).
    assert!(
        conf.contains(r#"header X-Quote `say "hi" \ $x '' ü`"#),
        "{conf}"
    );
    // Terraform JSON: the application name survives with `${` escaped for Terraform.
    let tf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(build.join("terraform/services/app/infra/main.tf.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tf["resource"]["authentik_provider_oauth2"]["app"]["name"],
        "App \"$${x}\" ''"
    );
    assert_eq!(
        tf["resource"]["authentik_provider_oauth2"]["app"]["client_id"],
        "app-$${client}"
    );
}

#[test]
fn user_terraform_modules_init_validate_and_apply_offline() {
    let terraform = tool("terraform", "terraform");
    let rc = repo().join(".tools/terraformrc");
    assert!(rc.exists(), "the Terraform CLI config with the offline provider mirror is missing: run `scripts/install-tools terraform`");
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    render(&repo().join("tests/fixtures/tf-project"), &build);
    let dir = build.join("terraform/services/app/infra");
    let run = |args: &[&str]| {
        let out = Command::new(&terraform)
            .args(args)
            .current_dir(&dir)
            .env("TF_CLI_CONFIG_FILE", &rc)
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "terraform {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["init", "-input=false", "-no-color"]);
    run(&["validate", "-no-color"]);
    run(&["apply", "-auto-approve", "-input=false", "-no-color"]);
    let outputs: serde_json::Value = serde_json::from_str(&run(&["output", "-json"])).unwrap();
    // The variable went through Terraform's own template parser and came out unchanged.
    assert_eq!(
        outputs["bucket_0_0"]["value"]["greeting"],
        "hello \"world\" ${var.nope} %{ if x } \\ ''\nsecond line ü"
    );
    assert_eq!(outputs["bucket_0_0"]["sensitive"], true);
}

/// Issue 13: hostile strings, one field at a time, through load and render. Either the project
/// is refused with located errors, or every rendered file parses in its own language with the
/// real tools (`nix-instantiate --parse`, `caddy adapt`, `unbound-checkconf`; Terraform JSON and
/// pg_hba by `render::verify`), no string left its context (the hosts' attribute structure is
/// that of a harmless project; no live Terraform template; no Caddy placeholder), and the
/// values arrive exactly as written.
mod hostile_strings {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;

    use nixmox_core::render::{self, verify, Outputs};
    use nixmox_core::{load, SourceFile, Sources};
    use proptest::prelude::*;
    use serde_json::Value;

    use super::common::{check, tool};

    /// Where the hostile string goes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Slot {
        Description,
        Header,
        Path,
        AuthName,
        ClientId,
        Scope,
        UsernameClaim,
        Redirect,
        TfKey,
        TfValue,
        BackendKey,
        BackendValue,
        KeyComment,
        Nixpkgs,
    }

    const SLOTS: [Slot; 14] = [
        Slot::Description,
        Slot::Header,
        Slot::Path,
        Slot::AuthName,
        Slot::ClientId,
        Slot::Scope,
        Slot::UsernameClaim,
        Slot::Redirect,
        Slot::TfKey,
        Slot::TfValue,
        Slot::BackendKey,
        Slot::BackendValue,
        Slot::KeyComment,
        Slot::Nixpkgs,
    ];

    /// Pieces that mean something in one of the generated languages or on a terminal.
    const PIECES: &[&str] = &[
        "${",
        "%{",
        "}",
        "{",
        "$${",
        "''",
        "'''",
        "\"",
        "\\",
        "\\\"",
        "`",
        "'",
        "\n",
        "\r",
        "\t",
        "\u{0}",
        "\u{1b}[2J",
        "{env.PROXMOX_API_TOKEN}",
        "{$HOME}",
        "{file./etc/hostname}",
        "#",
        ";",
        " ",
        "//",
        "/*",
        "*/",
        "all",
        "@",
        "+",
        ",",
        "ü",
        "\u{2028}",
        "\u{feff}",
        "x",
        "readFile /etc/shadow",
        "\"; networking.hostName = \"pwned\"; x = \"",
        "} import ./x {",
        "\nhandle {\n respond pwned\n}\n",
    ];

    fn hostile() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(PIECES), 1..6).prop_map(|v| v.concat())
    }

    fn q(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q";

    fn sources(slot: Slot, s: &str) -> Sources {
        let v = |this: Slot, benign: &str| -> String {
            if this == slot {
                q(s)
            } else {
                q(benign)
            }
        };
        let key_line = if slot == Slot::KeyComment {
            q(&format!("{KEY} {s}"))
        } else {
            q(&format!("{KEY} me@laptop"))
        };
        let redirect = if slot == Slot::Redirect {
            q(&format!("https://app.prop.lan/cb?x={s}"))
        } else {
            q("https://app.prop.lan/cb")
        };
        let config = format!(
            "project: prop\ndomain: prop.lan\nnetwork: {{ cidr: 10.66.0.0/24, gateway: 10.66.0.1 }}\n\
             nix: {{ nixpkgs: {} }}\nssh: {{ user: ops, authorized_keys: [{key_line}] }}\n\
             terraform: {{ backend: {{ type: http, config: {{ address: {}, {}: \"{{workspace}}\" }} }} }}\n",
            v(Slot::Nixpkgs, "github:NixOS/nixpkgs/nixos-25.05"),
            v(Slot::BackendValue, "https://state.lan/{workspace}"),
            v(Slot::BackendKey, "lock_address"),
        );
        let app = format!(
            "name: app\ndescription: {}\ninterface:\n\
             \x20 db: {{ database: app, role: app }}\n\
             \x20 proxy: {{ domain: app.prop.lan, path: {}, upstream: 8080, headers: {{ X-A: {} }} }}\n\
             \x20 auth: {{ name: {}, oidc: {{ client_id: {}, redirect_uris: [{redirect}], scopes: [openid, {}], username_claim: {} }} }}\n\
             \x20 terraform: {{ modules: [tf], variables: {{ settings: {{ {}: {} }} }} }}\n",
            v(Slot::Description, "An app"),
            v(Slot::Path, "/app"),
            v(Slot::Header, "SAMEORIGIN"),
            v(Slot::AuthName, "App"),
            v(Slot::ClientId, "app"),
            v(Slot::Scope, "email"),
            v(Slot::UsernameClaim, "preferred_username"),
            v(Slot::TfKey, "k"),
            v(Slot::TfValue, "v"),
        );
        let file = |path: &str, text: String| SourceFile {
            path: path.into(),
            bytes: text.into_bytes(),
        };
        Sources {
            config: Some(file("nixmox.yaml", config)),
            manifests: vec![
                file("services/dns/manifest.yaml", "name: dns\nprovides: { dns: { type: unbound } }\n".into()),
                file("services/caddy/manifest.yaml", "name: caddy\nprovides: { reverse_proxy: { type: caddy } }\n".into()),
                file("services/pg/manifest.yaml", "name: pg\nprovides: { database: { type: postgresql } }\n".into()),
                file("services/idp/manifest.yaml", "name: idp\nprovides: { identity: { type: authentik } }\ninterface:\n  proxy: { domain: auth.prop.lan, upstream: 9000 }\n".into()),
                file("services/app/manifest.yaml", app),
            ],
            lock: None,
        }
    }

    /// Everything the checks read from the hosts, in one evaluation.
    fn facts(build: &Path) -> Value {
        let hosts = ["app", "caddy", "dns", "idp", "pg"];
        let mut attrs = String::new();
        for h in hosts {
            attrs.push_str(&format!(
                "  {h} = host {};\n",
                build.join(format!("nix/hosts/{h}.nix")).display()
            ));
        }
        let expr = format!(
            r#"let
  keys = depth: v: if depth == 0 || !(builtins.isAttrs v) then null else builtins.mapAttrs (n: x: keys (depth - 1) x) v;
  host = file: let
    f = import file;
    m = f {{
      config = m // {{
        sops.secrets = builtins.mapAttrs (n: v: v // {{ path = "/run/secrets/" + n; }}) (m.sops.secrets or {{ }});
        sops.templates = builtins.mapAttrs (n: v: v // {{ path = "/run/secrets/rendered/" + n; }}) (m.sops.templates or {{ }});
        sops.placeholder = builtins.mapAttrs (n: _: "<SOPS:" + n + ">") (m.sops.secrets or {{ }});
        services = (m.services or {{ }}) // {{ postgresql = ((m.services or {{ }}).postgresql or {{ }}) // {{ package = "postgresql"; }}; }};
      }};
      lib = {{ }}; pkgs = {{ }}; modulesPath = "/modules";
      inputs = {{ sops-nix.nixosModules.sops = {{ }}; authentik-nix.nixosModules.default = {{ }}; }};
    }};
  in {{
    keys = keys 6 (removeAttrs m [ "imports" ]);
    caddy = (m.services.caddy or {{ }}).virtualHosts or {{ }};
    unbound = (m.services.unbound or {{ }}).settings or {{ }};
    hba = (m.services.postgresql or {{ }}).authentication or "";
    oidc = (m.nixmox or {{ }}).oidc or {{ }};
    keysOfUser = m.users.users.ops.openssh.authorizedKeys.keys;
  }};
in {{
{attrs}}}"#
        );
        let out = check(
            Command::new(tool("nix-instantiate", "nix")).args([
                "--store", "dummy://", "--eval", "--strict", "--json", "-E", &expr,
            ]),
            "evaluating the hosts",
        );
        serde_json::from_str(&out).unwrap()
    }

    fn write_all(dir: &Path, files: &[nixmox_core::RenderedFile]) {
        for f in files {
            let p = dir.join(&f.path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, &f.contents).unwrap();
        }
    }

    fn unescape_tf(s: &str) -> String {
        s.replace("$${", "${").replace("%%{", "%{")
    }

    /// Renders, runs every check; returns the facts for comparison with the baseline.
    fn render_and_check(slot: Slot, s: &str, dir: &Path) -> Option<Value> {
        let loaded = load(&sources(slot, s), &|_| true);
        let Some(project) = loaded.project else {
            for d in loaded.errors() {
                assert!(
                    d.span.is_some(),
                    "an unlocated error for {slot:?} {s:?}: {d:?}"
                );
                assert!(
                    !d.render().contains('\u{1b}'),
                    "a raw ESC in a diagnostic: {}",
                    d.render()
                );
            }
            return None;
        };
        let rendered = render::render(&project, &Outputs::new());
        let build = dir.join("build");
        let _ = std::fs::remove_dir_all(&build);
        write_all(&build, &rendered.files);

        // Nix: every file parses.
        let nix: Vec<String> = rendered
            .files
            .iter()
            .filter(|f| f.path.ends_with(".nix"))
            .map(|f| build.join(&f.path).display().to_string())
            .collect();
        let mut parse = Command::new(tool("nix-instantiate", "nix"));
        parse.args(["--store", "dummy://", "--parse"]).args(&nix);
        check(
            &mut parse,
            &format!("parsing the Nix files for {slot:?} {s:?}"),
        );

        // Terraform JSON: JSON, no live template but NixMox's own references.
        let mut tf: BTreeMap<String, Value> = BTreeMap::new();
        for f in rendered
            .files
            .iter()
            .filter(|f| f.path.ends_with(".tf.json"))
        {
            let problems = verify::terraform_json(&f.contents);
            assert!(
                problems.is_empty(),
                "{} for {slot:?} {s:?}: {problems:?}",
                f.path
            );
            tf.insert(f.path.clone(), serde_json::from_str(&f.contents).unwrap());
        }

        let facts = facts(&build);

        // pg_hba: every line in its grammar.
        let hba = facts["pg"]["hba"].as_str().unwrap();
        let problems = verify::pg_hba(hba);
        assert!(
            problems.is_empty(),
            "pg_hba for {slot:?} {s:?}: {problems:?}\n{hba}"
        );

        // Caddy: each site's tokens are NixMox's, and `caddy adapt` reads the whole file.
        let mut caddyfile = String::new();
        for (site, v) in facts["caddy"]["caddy"].as_object().unwrap() {
            let conf = v["extraConfig"].as_str().unwrap();
            let problems = verify::caddyfile(conf);
            assert!(
                problems.is_empty(),
                "{site} for {slot:?} {s:?}: {problems:?}\n{conf}"
            );
            caddyfile.push_str(&format!("{site} {{\n{conf}\n}}\n"));
        }
        let cf = dir.join("Caddyfile");
        std::fs::write(&cf, &caddyfile).unwrap();
        let adapted = check(
            Command::new(tool("caddy", "caddy"))
                .args(["adapt", "--adapter", "caddyfile", "--config"])
                .arg(&cf),
            &format!("caddy adapt for {slot:?} {s:?}:\n{caddyfile}"),
        );
        let adapted: Value = serde_json::from_str(&adapted).unwrap();
        let header = find_header(&adapted, "X-A").expect("the X-A header is served");
        if slot == Slot::Header {
            assert_eq!(header, s, "the header value arrives exactly as written");
        }

        // Unbound: its settings as a configuration file pass unbound-checkconf.
        let conf = unbound_conf(&facts["dns"]["unbound"], dir);
        let uc = dir.join("unbound.conf");
        std::fs::write(&uc, &conf).unwrap();
        check(
            Command::new(tool("unbound-checkconf", "unbound")).arg(&uc),
            &format!("unbound-checkconf for {slot:?} {s:?}:\n{conf}"),
        );

        // The values arrive exactly.
        let oidc = &facts["app"]["oidc"];
        let app_tf = &tf["terraform/services/app/infra/main.tf.json"];
        let provider = &app_tf["resource"]["authentik_provider_oauth2"]["app"];
        let module = &app_tf["module"];
        match slot {
            Slot::ClientId => {
                assert_eq!(oidc["clientId"], s);
                assert_eq!(unescape_tf(provider["client_id"].as_str().unwrap()), s);
            }
            Slot::Scope => assert_eq!(oidc["scopes"][1], s),
            Slot::UsernameClaim => assert_eq!(oidc["usernameClaim"], s),
            Slot::AuthName => assert_eq!(unescape_tf(provider["name"].as_str().unwrap()), s),
            Slot::KeyComment => {
                assert_eq!(facts["app"]["keysOfUser"][0], format!("{KEY} {s}"))
            }
            Slot::TfKey | Slot::TfValue => {
                let settings = module
                    .as_object()
                    .and_then(|m| m.values().next())
                    .map(|m| &m["settings"])
                    .unwrap();
                let (k, v) = settings.as_object().unwrap().iter().next().unwrap();
                let want = if slot == Slot::TfKey {
                    unescape_tf(k)
                } else {
                    unescape_tf(v.as_str().unwrap())
                };
                assert_eq!(want, s);
            }
            _ => {}
        }
        Some(facts)
    }

    fn find_header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
        match v {
            Value::Object(m) => {
                if let Some(set) = m.get("set").and_then(|s| s.get(name)) {
                    return set[0].as_str();
                }
                m.values().find_map(|x| find_header(x, name))
            }
            Value::Array(a) => a.iter().find_map(|x| find_header(x, name)),
            _ => None,
        }
    }

    /// The NixOS unbound module's rendering of `settings`: `name: value` lines under each
    /// section, lists repeated; plus what a test machine needs (no chroot, no user switch).
    fn unbound_conf(settings: &Value, dir: &Path) -> String {
        let mut out = format!(
            "server:\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  directory: \"{}\"\n",
            dir.display()
        );
        let line = |out: &mut String, k: &str, v: &Value| match v {
            Value::Array(items) => {
                for i in items {
                    out.push_str(&format!("  {k}: {}\n", scalar(i)));
                }
            }
            other => out.push_str(&format!("  {k}: {}\n", scalar(other))),
        };
        for (k, v) in settings["server"].as_object().unwrap() {
            line(&mut out, k, v);
        }
        for zone in settings["forward-zone"].as_array().unwrap() {
            out.push_str("forward-zone:\n");
            for (k, v) in zone.as_object().unwrap() {
                line(&mut out, k, v);
            }
        }
        out
    }

    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => {
                if *b {
                    "yes".into()
                } else {
                    "no".into()
                }
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn hostile_strings_stay_in_their_context_in_every_language() {
        let tmp = tempfile::tempdir().unwrap();
        // The structure of a harmless project's hosts: a string that broke out of its
        // context would add, remove or rename attributes.
        let baseline = render_and_check(Slot::Description, "An app", tmp.path())
            .expect("the harmless project loads");
        let keys = |f: &Value| -> Vec<Value> {
            ["app", "caddy", "dns", "idp", "pg"]
                .iter()
                .map(|h| f[*h]["keys"].clone())
                .collect()
        };
        let want = keys(&baseline);
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(48);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(
                &(prop::sample::select(&SLOTS[..]), hostile()),
                |(slot, s)| {
                    if let Some(f) = render_and_check(slot, &s, tmp.path()) {
                        prop_assert_eq!(
                            keys(&f),
                            want.clone(),
                            "{:?} {:?} changed the hosts' structure",
                            slot,
                            s
                        );
                    }
                    Ok(())
                },
            )
            .unwrap();
        // And each slot at least once with the nastiest string that can be valid there.
        for slot in SLOTS {
            render_and_check(slot, "a ${x} %{y} '' \\ \" $HOME ' ü", tmp.path());
        }
    }
}

/// Issue 12, item 12: `config.nixmox` is typed. Every fact a rendered host sets is declared in
/// the facts module (evaluated with a stand-in `lib` that records declarations: the real
/// module system runs in `scripts/check-nixos-eval`, which needs fetched sources), and none is
/// `anything`.
#[test]
fn every_fact_a_host_sets_is_a_typed_option() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    render(&repo().join("examples/homelab"), &build);
    let expr = format!(
        r#"let
  t = name: {{ inherit name; }};
  types = {{
    str = t "str"; path = t "path"; port = t "port"; bool = t "bool"; anything = t "anything";
    enum = _: t "enum"; listOf = e: {{ name = "listOf"; elem = e; }}; attrsOf = e: {{ name = "attrsOf"; elem = e; }};
    nullOr = e: e; submodule = m: {{ name = "submodule"; inherit (m) options; }};
  }};
  lib = {{ inherit types; mkOption = o: o // {{ _option = true; }}; }};
  decl = (import {module} {{ inherit lib; }}).options.nixmox;
  # The declaration at a fact's path: through submodules, attrsOf and listOf.
  find = d: path: if path == [ ] then d
    else if d ? _option then find d.type path
    else if d.name or "" == "submodule" then (if d.options ? ${{builtins.head path}} then find d.options.${{builtins.head path}} (builtins.tail path) else null)
    else if d.name or "" == "attrsOf" || d.name or "" == "listOf" then find d.elem (builtins.tail path)
    else if builtins.isAttrs d && d ? ${{builtins.head path}} then find d.${{builtins.head path}} (builtins.tail path)
    else null;
  leaves = prefix: v: if builtins.isAttrs v then builtins.concatLists (map (n: leaves (prefix ++ [ n ]) v.${{n}}) (builtins.attrNames v))
    else if builtins.isList v then builtins.concatLists (map (x: leaves (prefix ++ [ "0" ]) x) v)
    else [ prefix ];
  host = file: let m = import file {{ config = {{ sops.secrets = builtins.mapAttrs (n: _: {{ path = "/run/secrets/" + n; }}) (m.sops.secrets or {{ }}); services.postgresql.package = "pg"; }}; lib = {{ }}; pkgs = {{ }}; modulesPath = "/m"; inputs = {{ sops-nix.nixosModules.sops = {{ }}; authentik-nix.nixosModules.default = {{ }}; }}; }}; in m.nixmox;
  check = file: map (p: let d = find decl p; in {{ path = builtins.concatStringsSep "." p; type = if d == null then "undeclared" else (d.type or d).name or "option"; }}) (leaves [ ] (host file));
in builtins.concatLists (map (h: check ({hosts} + "/${{h}}")) (builtins.attrNames (builtins.readDir {hosts})))"#,
        module = build.join("nix/modules/nixmox.nix").display(),
        hosts = build.join("nix/hosts").display(),
    );
    let facts = nix_eval(&expr, "the facts against their declarations");
    let facts = facts.as_array().unwrap();
    assert!(facts.len() > 100, "{facts:?}");
    for f in facts {
        let ty = f["type"].as_str().unwrap();
        assert!(
            ty != "undeclared" && ty != "anything",
            "fact `{}` is {ty}",
            f["path"]
        );
    }
}

/// Issue 12, item 10: the example's service modules name no secret path of their own; they read
/// the files NixMox declares through `config.nixmox`.
#[test]
fn example_modules_read_only_declared_secrets() {
    let services = repo().join("examples/homelab/services");
    for e in std::fs::read_dir(&services).unwrap() {
        let module = e.unwrap().path().join("configuration.nix");
        let text = std::fs::read_to_string(&module).unwrap();
        assert!(
            !text.contains("/run/secrets"),
            "{} names a path under /run/secrets that NixMox does not declare",
            module.display()
        );
    }
    let read = |s: &str| std::fs::read_to_string(services.join(s)).unwrap();
    assert!(read("nextcloud/configuration.nix").contains("dbpassFile = db.passwordFile;"));
    assert!(read("monitoring/configuration.nix").contains("$__file{${oidc.clientSecretFile}}"));
    let guac = read("guacamole/configuration.nix");
    assert!(guac.contains("guacamole-auth-jdbc-postgresql-${version}.jar"));
    assert!(guac.contains("guacamole-auth-sso-openid-${version}.jar"));
    assert!(guac.contains("postgresql-jdbc.jar"));
}

/// Issue "Shape": a project whose reverse proxy is `nginx` (the second implementation of
/// `reverse_proxy`) renders nginx virtual hosts instead of Caddy sites: every file parses, and
/// the proxy host's configuration evaluates to the routes the manifests name.
#[test]
fn a_project_with_the_nginx_reverse_proxy_renders_its_virtual_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let write = |rel: &str, text: &str| {
        let path = project.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "nixmox.yaml",
        "project: p\ndomain: p.lan\nnetwork: { cidr: 10.0.0.0/24, gateway: 10.0.0.1 }\n",
    );
    write(
        "services/edge/manifest.yaml",
        "name: edge\nhost: { ip: 10.0.0.5 }\nprovides: { reverse_proxy: { type: nginx } }\n",
    );
    write(
        "services/web/manifest.yaml",
        "name: web\nhost: { ip: 10.0.0.20 }\ninterface:\n  proxy:\n    - { domain: web.p.lan, upstream: 8080, tls: false, headers: { X-Frame-Options: 'DENY \"x\"' } }\n    - { domain: web.p.lan, path: /api, upstream: 9090, tls: false }\n",
    );
    let build = tmp.path().join("build");
    render(&project, &build);
    assert!(parse_all(&build) >= 4);

    let nginx = eval_host(&build, "edge", "services.nginx");
    assert_eq!(nginx["enable"], true);
    assert_eq!(nginx["recommendedProxySettings"], true);
    let locations = &nginx["virtualHosts"]["web.p.lan"]["locations"];
    assert_eq!(locations["/"]["proxyPass"], "http://10.0.0.20:8080");
    assert_eq!(
        locations["/"]["extraConfig"],
        "add_header X-Frame-Options \"DENY \\\"x\\\"\" always;\n"
    );
    assert_eq!(locations["= /api"]["proxyPass"], "http://10.0.0.20:9090");
    assert_eq!(locations["/api/"]["proxyPass"], "http://10.0.0.20:9090");
    // No Caddy, and only HTTP opened.
    let services = eval_host(&build, "edge", "services");
    assert!(services.get("caddy").is_none(), "{services}");
    let tcp = eval_host(&build, "edge", "networking.firewall.allowedTCPPorts");
    assert_eq!(tcp, serde_json::json!([22, 80]));
}
