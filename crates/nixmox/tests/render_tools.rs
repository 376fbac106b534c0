//! `nixmox render` checked with the real tools: every generated `.nix` file parses with
//! `nix-instantiate --parse`, its data evaluates to exactly what the manifests say (awkward
//! strings included), and a Terraform workspace of user modules passes `terraform init`,
//! `validate` and `apply` offline. Missing tools fail the test with the command that installs
//! them (`scripts/install-tools`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{repo, tool};

fn render(project: &Path, out: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_nixmox"))
        .arg("-C")
        .arg(project)
        .arg("render")
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "render failed");
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
    assert_eq!(inputs["nixpkgs"]["url"], "github:NixOS/nixpkgs/nixos-25.05");
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
