//! The NixOS side: `nix/flake.nix`, the `nixmox` options module, and one configuration per
//! host under `nix/hosts/`. Option names are listed, with the module declaring each, in
//! docs/generated-options.md.

use std::collections::{BTreeMap, BTreeSet};

use super::{base_name, idp_domain, issuer, safe_name, Copy, Rendered, HEADER};
use crate::config_out::effective_nameservers;
use crate::model::{
    Capability, Check, ClientType, DbMode, Deployer, Project, SecretAccess, Service, Upstream,
};
use crate::nixexpr::{self, set, Nix, Part};
use crate::RenderedFile;

pub const POSTGRES_PORT: u16 = 5432;
pub const AUTHENTIK_HTTP_PORT: u16 = 9000;
pub const AUTHENTIK_HTTPS_PORT: u16 = 9443;
pub const SETUP_UNIT: &str = "nixmox-postgresql-setup";

/// The headers authentik's forward-auth endpoint returns, copied to the upstream (from
/// authentik's Caddy integration guide).
const AUTHENTIK_HEADERS: &str = "X-Authentik-Username X-Authentik-Groups X-Authentik-Entitlements X-Authentik-Email X-Authentik-Name X-Authentik-Uid X-Authentik-Jwt X-Authentik-Meta-Jwks X-Authentik-Meta-Outpost X-Authentik-Meta-Provider X-Authentik-Meta-App X-Authentik-Meta-Version";

pub fn render(p: &Project, out: &mut Rendered) {
    out.files.push(RenderedFile {
        path: "nix/flake.nix".into(),
        contents: flake(p),
    });
    out.files.push(RenderedFile {
        path: "nix/modules/nixmox.nix".into(),
        contents: options_module(),
    });
    for (i, s) in p.services.iter().enumerate() {
        out.files.push(RenderedFile {
            path: format!("nix/hosts/{}.nix", s.host.hostname),
            contents: host(p, i),
        });
        out.files.push(RenderedFile {
            path: format!("nix/deploy/{}.nix", s.host.hostname),
            contents: colmena_deployment(p, s),
        });
        copies_for(s, out);
    }
    // The project's lock of the flake's inputs (`flake.lock` at the project root, committed)
    // travels with the flake when it exists, so every host builds from the same revisions.
    out.copies.push(Copy {
        from: "flake.lock".into(),
        to: "nix/flake.lock".into(),
    });
    // Secrets files (made by the secrets commands) travel with the flake when they exist.
    for s in &p.services {
        out.copies.push(Copy {
            from: format!("secrets/{}.yaml", s.host.hostname),
            to: format!("nix/secrets/{}.yaml", s.host.hostname),
        });
    }
}

/// A NixOS release, `YY.MM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub year: u8,
    pub month: u8,
}

impl Release {
    /// The newest release NixMox is written for: what a nixpkgs reference that names no
    /// release (a revision, a path, `nixos-unstable`) is taken to be.
    pub const NEWEST: Release = Release { year: 26, month: 5 };
    /// The first release whose PostgreSQL module runs the ensure scripts in a separate
    /// `postgresql-setup.service` (nixpkgs PR #403645; 25.11 release notes).
    pub const POSTGRESQL_SETUP_UNIT: Release = Release {
        year: 25,
        month: 11,
    };
}

impl std::fmt::Display for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}.{:02}", self.year, self.month)
    }
}

/// The NixOS release of a nixpkgs flake reference: the last `nixos-YY.MM`, `release-YY.MM`
/// or `nixpkgs-YY.MM…` in it (`github:NixOS/nixpkgs/nixos-25.05`,
/// `git+https://github.com/NixOS/nixpkgs?ref=release-25.05`), else [`Release::NEWEST`].
pub fn release_of(url: &str) -> Release {
    let mut found = None;
    for prefix in ["nixos-", "release-", "nixpkgs-"] {
        for (at, _) in url.match_indices(prefix) {
            let rest = &url.as_bytes()[at + prefix.len()..];
            let digits = |r: std::ops::Range<usize>| {
                rest.get(r.clone())
                    .filter(|d| d.iter().all(u8::is_ascii_digit))
                    .map(|d| d.iter().fold(0u8, |n, b| n * 10 + (b - b'0')))
            };
            let month_ok = |m: u8| m == 5 || m == 11;
            if let (Some(year), Some(b'.'), Some(month)) = (digits(0..2), rest.get(2), digits(3..5))
            {
                let ends = rest.get(5).is_none_or(|b| !b.is_ascii_digit());
                if ends && month_ok(month) {
                    let r = Release { year, month };
                    if found.is_none_or(|(a, _)| at > a) {
                        found = Some((at, r));
                    }
                }
            }
        }
    }
    found.map(|(_, r)| r).unwrap_or(Release::NEWEST)
}

/// The NixOS release of the pinned nixpkgs (`nix.nixpkgs`, or its `nix.inputs` override).
pub fn release(p: &Project) -> Release {
    release_of(&p.nix.nixpkgs)
}

/// The NixOS release of the pinned nixpkgs (`…/nixos-25.05` → `25.05`), for stateVersion.
pub fn state_version(p: &Project) -> String {
    release(p).to_string()
}

/// The units the setup unit orders after and requires: the ones that have run
/// `ensureDatabases`/`ensureUsers` by the time they are active, in that release. Up to 25.05
/// that is `postgresql.service` (its `postStart`); from 25.11 `postgresql-setup.service`.
pub fn postgresql_ready_units(r: Release) -> &'static [&'static str] {
    if r >= Release::POSTGRESQL_SETUP_UNIT {
        &["postgresql.service", "postgresql-setup.service"]
    } else {
        &["postgresql.service"]
    }
}

/// The build flake's `flake.nix`: its inputs and the outputs that find the hosts.
pub fn flake(p: &Project) -> String {
    let has_idp = p.provider(Capability::Identity).is_some();
    let mut inputs = BTreeMap::new();
    set(&mut inputs, &["nixpkgs", "url"], Nix::str(&p.nix.nixpkgs));
    set(&mut inputs, &["sops-nix", "url"], Nix::str(&p.nix.sops_nix));
    set(
        &mut inputs,
        &["sops-nix", "inputs", "nixpkgs", "follows"],
        Nix::str("nixpkgs"),
    );
    if has_idp {
        set(
            &mut inputs,
            &["authentik-nix", "url"],
            Nix::str(&p.nix.authentik_nix),
        );
    }
    let mut top = BTreeMap::new();
    top.insert(
        "description".to_string(),
        Nix::str(format!(
            "NixMox project {}: NixOS configurations of its hosts",
            p.name
        )),
    );
    top.insert("inputs".to_string(), Nix::Attrs(inputs));
    // The hosts are found in `hosts/` (and their Colmena deployment data in `deploy/`), so
    // adding a service adds files and never edits this one.
    top.insert("outputs".to_string(), Nix::Code(FLAKE_OUTPUTS));
    let deployer = match &p.nix.deployer {
        Deployer::NixosRebuild => "nixos-rebuild switch --flake .#<host> --target-host <user>@<ip>",
        Deployer::Colmena => "colmena apply --on <host>",
        Deployer::Command { .. } => "the project's own deployer command",
    };
    nixexpr::file(
        &format!("{HEADER}\nDeploy with: {deployer}"),
        None,
        &Nix::Attrs(top),
    )
}

/// The flake's outputs: every `hosts/<host>.nix` as `nixosConfigurations.<host>`, and a Colmena
/// hive whose nodes take their `deployment` from `deploy/<host>.nix`.
const FLAKE_OUTPUTS: &str = r#"{ self, nixpkgs, ... }@inputs:
    let
      lib = nixpkgs.lib;
      hosts = map (lib.removeSuffix ".nix") (builtins.attrNames (lib.filterAttrs (name: type: type == "regular" && lib.hasSuffix ".nix" name) (builtins.readDir ./hosts)));
      module = host: ./hosts + "/${host}.nix";
    in
    {
      nixosConfigurations = lib.genAttrs hosts (host: lib.nixosSystem {
        system = "x86_64-linux";
        specialArgs = { inherit inputs; };
        modules = [ (module host) ];
      });
      colmena = {
        meta = {
          nixpkgs = import nixpkgs { system = "x86_64-linux"; };
          specialArgs = { inherit inputs; };
        };
      } // lib.genAttrs hosts (host: {
        deployment = import (./deploy + "/${host}.nix");
        imports = [ (module host) ];
      });
    }"#;

/// `deploy/<host>.nix`: where Colmena reaches the host, and its tags.
fn colmena_deployment(p: &Project, s: &Service) -> String {
    let body = Nix::attrs([
        ("targetHost", Nix::str(s.host.ip.to_string())),
        ("targetUser", Nix::str(p.ssh.user.as_str())),
        (
            "tags",
            Nix::strs([
                if s.is_core() { "core" } else { "service" },
                s.name.as_str(),
            ]),
        ),
    ]);
    nixexpr::file(HEADER, None, &body)
}

fn options_module() -> String {
    format!("# {}\n{FACTS_MODULE}", HEADER.replace('\n', "\n# "))
}

/// `config.nixmox`, typed: each fact a host's configuration sets has an option here, so a
/// misspelt fact is an error, a user module can add to a list (`routes`, `scopes`) and
/// attribute sets (`hosts`, `db`) merge the way NixOS options do. The host files set every
/// fact without a default.
pub const FACTS_MODULE: &str = r#"{ lib, ... }:
let
  inherit (lib) mkOption types;
  str = description: mkOption { type = types.str; inherit description; };
  host = types.submodule {
    options = {
      fqdn = str "The host's fully qualified domain name.";
      ip = str "The host's IPv4 address.";
      hostname = str "The host's short name.";
    };
  };
  db = types.submodule {
    options = {
      host = str "The database server's FQDN.";
      ip = str "The database server's IPv4 address.";
      port = mkOption { type = types.port; description = "The database server's port."; };
      database = str "The database's name.";
      role = str "The role the service connects as.";
      passwordFile = mkOption {
        type = types.path;
        description = "The decrypted file holding the role's password (sops-nix; owner, group and mode from the manifest's `interface.db.sops`).";
      };
    };
  };
  oidc = types.submodule {
    options = {
      issuer = str "The OIDC issuer URL (ends with `/`).";
      discoveryUrl = str "The issuer's `.well-known/openid-configuration` URL.";
      clientId = str "The client id.";
      clientType = mkOption { type = types.enum [ "confidential" "public" ]; description = "The client type."; };
      redirectUris = mkOption { type = types.listOf types.str; default = [ ]; description = "Allowed redirect URIs."; };
      scopes = mkOption { type = types.listOf types.str; default = [ ]; description = "Scopes the client requests."; };
      usernameClaim = str "The claim holding the user name.";
      groupsClaim = str "The claim holding the user's groups.";
      clientSecretFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "The decrypted client secret file of a confidential client (sops-nix; owner, group and mode from `interface.auth.oidc.sops`); null for a public client.";
      };
    };
  };
  route = types.submodule {
    options = {
      domain = str "The route's domain.";
      path = str "The route's path prefix.";
      url = str "The route's public URL.";
      authz = mkOption { type = types.bool; default = false; description = "Whether the route is behind forward-auth."; };
    };
  };
in
{
  options.nixmox = {
    project = str "The project's name.";
    domain = str "The project's domain.";
    host = mkOption { type = host; description = "This host."; };
    hosts = mkOption { type = types.attrsOf host; default = { }; description = "This host and the hosts it depends on, by service name."; };
    db = mkOption { type = types.attrsOf db; default = { }; description = "This service's databases, by database name."; };
    oidc = mkOption { type = types.nullOr oidc; default = null; description = "This service's OIDC client, if it has one."; };
    routes = mkOption { type = types.listOf route; default = [ ]; description = "This service's routes on the reverse proxy."; };
    dns.records = mkOption { type = types.attrsOf types.str; default = { }; description = "Every A record the DNS host serves (on the DNS host only)."; };
  };
}
"#;

/// Copies the files a service's manifest references into the build so the flake is
/// self-contained: each module, migration and Terraform module it names, and nothing else of
/// its directory (a module importing a sibling file must list it, or be a directory module).
fn copies_for(s: &Service, out: &mut Rendered) {
    let prefix = format!("{}/", s.dir);
    for m in &s.nixos_modules {
        let to = match m.strip_prefix(&prefix) {
            Some(rel) => format!("nix/services/{}/{rel}", s.name),
            None => format!("nix/external/{m}"),
        };
        out.copies.push(Copy {
            from: m.clone(),
            to,
        });
    }
    for db in &s.dbs {
        for m in &db.migrations {
            out.copies.push(Copy {
                from: m.clone(),
                to: format!("nix/migrations/{}/{}", db.database, safe_name(base_name(m))),
            });
        }
    }
}

/// The expression importing a user module from the copied tree.
fn module_import(s: &Service, m: &str) -> Nix {
    let prefix = format!("{}/", s.dir);
    match m.strip_prefix(&prefix) {
        Some(rel) => Nix::Expr(format!(
            "(../services/{} + {})",
            s.name,
            nixexpr::quote(&format!("/{rel}"))
        )),
        None => Nix::Expr(format!(
            "(../external + {})",
            nixexpr::quote(&format!("/{m}"))
        )),
    }
}

fn secret_path(name: &str) -> Nix {
    Nix::select("config.sops.secrets", &[name, "path"])
}

/// The identity provider's secret key, generated by NixMox for its host.
pub const AUTHENTIK_SECRET_KEY: &str = "authentik/secret_key";
/// The sops-nix template that becomes authentik's environment file.
pub const AUTHENTIK_ENV_TEMPLATE: &str = "authentik.env";

/// `config.sops.placeholder."<name>"`: what sops-nix replaces with the secret in a template.
fn placeholder(name: &str) -> Nix {
    Nix::select("config.sops.placeholder", &[name])
}

pub fn db_secret(role: &str) -> String {
    format!("db/{role}")
}

pub fn oidc_secret(service: &str) -> String {
    format!("oidc/{service}/client_secret")
}

/// The ports a host serves, for its firewall.
fn ports(p: &Project, s: &Service) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let mut tcp = BTreeSet::from([22u16]);
    let mut udp = BTreeSet::new();
    let fqdn = p.fqdn(s);
    let own = |h: &str| h == fqdn || h == s.host.hostname.as_str() || h == s.host.ip.to_string();
    for x in &s.proxies {
        match &x.upstream {
            Upstream::Port(port) => {
                tcp.insert(*port);
            }
            Upstream::HostPort(h, port) if own(h) => {
                tcp.insert(*port);
            }
            _ => {}
        }
    }
    for c in s
        .health
        .startup
        .iter()
        .chain(&s.health.liveness)
        .chain(&s.health.readiness)
    {
        if let Check::Tcp { host, port } = c {
            if own(host) {
                tcp.insert(*port);
            }
        }
    }
    for cap in &s.provides {
        match cap {
            Capability::Database => {
                tcp.insert(POSTGRES_PORT);
            }
            Capability::ReverseProxy => {
                tcp.extend([80, 443]);
            }
            Capability::Dns => {
                tcp.insert(53);
                udp.insert(53);
            }
            Capability::Identity => {
                tcp.extend([AUTHENTIK_HTTP_PORT, AUTHENTIK_HTTPS_PORT]);
            }
        }
    }
    (tcp, udp)
}

fn ints(set: &BTreeSet<u16>) -> Nix {
    Nix::List(set.iter().map(|p| Nix::Int(i64::from(*p))).collect())
}

/// The host configuration of service `i`.
fn host(p: &Project, i: usize) -> String {
    let s = &p.services[i];
    let mut c: BTreeMap<String, Nix> = BTreeMap::new();
    let mut imports = vec![
        Nix::Code("(modulesPath + \"/virtualisation/proxmox-lxc.nix\")"),
        Nix::path("../modules/nixmox.nix"),
        Nix::Code("inputs.sops-nix.nixosModules.sops"),
    ];
    if s.provides(Capability::Identity) {
        imports.push(Nix::Code("inputs.authentik-nix.nixosModules.default"));
    }
    imports.extend(s.nixos_modules.iter().map(|m| module_import(s, m)));
    c.insert("imports".into(), Nix::List(imports));

    // LXC base.
    set(&mut c, &["proxmoxLXC", "manageNetwork"], Nix::Bool(true));
    set(&mut c, &["proxmoxLXC", "manageHostName"], Nix::Bool(true));
    set(
        &mut c,
        &["proxmoxLXC", "privileged"],
        Nix::Bool(!s.host.unprivileged),
    );
    set(
        &mut c,
        &["networking", "hostName"],
        Nix::str(s.host.hostname.as_str()),
    );
    set(
        &mut c,
        &["networking", "domain"],
        Nix::str(p.domain.as_str()),
    );
    set(&mut c, &["networking", "useDHCP"], Nix::Bool(false));
    set(
        &mut c,
        &["networking", "interfaces", "eth0", "ipv4", "addresses"],
        Nix::list([Nix::attrs([
            ("address", Nix::str(s.host.ip.to_string())),
            ("prefixLength", Nix::Int(i64::from(p.network.cidr.prefix()))),
        ])]),
    );
    set(
        &mut c,
        &["networking", "defaultGateway"],
        Nix::attrs([
            ("address", Nix::str(p.network.gateway.to_string())),
            ("interface", Nix::str("eth0")),
        ]),
    );
    let mut nameservers = effective_nameservers(p);
    if s.provides(Capability::Dns) && p.network.nameservers.is_empty() {
        // The resolver itself answers locally.
        nameservers = vec!["127.0.0.1".into()];
    }
    set(
        &mut c,
        &["networking", "nameservers"],
        Nix::strs(nameservers),
    );
    let (tcp, udp) = ports(p, s);
    set(
        &mut c,
        &["networking", "firewall", "enable"],
        Nix::Bool(true),
    );
    set(
        &mut c,
        &["networking", "firewall", "allowedTCPPorts"],
        ints(&tcp),
    );
    if !udp.is_empty() {
        set(
            &mut c,
            &["networking", "firewall", "allowedUDPPorts"],
            ints(&udp),
        );
    }
    set(&mut c, &["services", "openssh", "enable"], Nix::Bool(true));
    set(
        &mut c,
        &["services", "openssh", "settings", "PasswordAuthentication"],
        Nix::Bool(false),
    );
    set(
        &mut c,
        &[
            "services",
            "openssh",
            "settings",
            "KbdInteractiveAuthentication",
        ],
        Nix::Bool(false),
    );
    set(
        &mut c,
        &["services", "openssh", "settings", "PermitRootLogin"],
        Nix::str(if p.ssh.user.as_str() == "root" {
            "prohibit-password"
        } else {
            "no"
        }),
    );
    let user = p.ssh.user.as_str();
    set(
        &mut c,
        &["users", "users", user, "openssh", "authorizedKeys", "keys"],
        Nix::strs(p.ssh.authorized_keys.iter().cloned()),
    );
    if user != "root" {
        set(
            &mut c,
            &["users", "users", user, "isNormalUser"],
            Nix::Bool(true),
        );
        set(
            &mut c,
            &["users", "users", user, "extraGroups"],
            Nix::strs(["wheel"]),
        );
        set(
            &mut c,
            &["security", "sudo", "wheelNeedsPassword"],
            Nix::Bool(false),
        );
    }
    // Unprivileged containers cannot create the namespaces the Nix sandbox needs.
    set(&mut c, &["nix", "settings", "sandbox"], Nix::Bool(false));
    set(
        &mut c,
        &["nix", "settings", "experimental-features"],
        Nix::strs(["nix-command", "flakes"]),
    );
    set(
        &mut c,
        &["nix", "settings", "trusted-users"],
        Nix::strs(if user == "root" {
            vec!["root"]
        } else {
            vec!["root", user]
        }),
    );
    set(
        &mut c,
        &["system", "stateVersion"],
        Nix::str(state_version(p)),
    );

    let mut secrets: BTreeMap<String, Nix> = BTreeMap::new();
    facts(p, i, &mut c, &mut secrets);
    for cap in &s.provides {
        match cap {
            Capability::Database => postgresql(p, i, &mut c, &mut secrets),
            Capability::ReverseProxy => caddy(p, &mut c),
            Capability::Dns => unbound(p, &mut c),
            Capability::Identity => authentik(p, s, &mut c, &mut secrets),
        }
    }
    if !secrets.is_empty() {
        set(
            &mut c,
            &["sops", "defaultSopsFile"],
            Nix::path(&format!("../secrets/{}.yaml", s.host.hostname)),
        );
        set(
            &mut c,
            &["sops", "age", "sshKeyPaths"],
            Nix::strs(["/etc/ssh/ssh_host_ed25519_key"]),
        );
        set(&mut c, &["sops", "secrets"], Nix::Attrs(secrets));
    }
    let title = match &s.description {
        Some(d) => format!(
            "{HEADER}\nHost {} ({}): {}",
            s.host.hostname,
            s.host.ip,
            d.lines().next().unwrap_or("")
        ),
        None => format!("{HEADER}\nHost {} ({})", s.host.hostname, s.host.ip),
    };
    nixexpr::file(
        &title,
        Some(&["config", "lib", "pkgs", "modulesPath", "inputs"]),
        &Nix::Attrs(c),
    )
}

/// `sops.secrets.<name>` for a secret a service reads: its owner, group and mode as the
/// manifest says (root and 0400 by default). sops-nix gives an owner without a group the
/// owner's primary group.
fn secret_access(a: &SecretAccess) -> Nix {
    let mut m = BTreeMap::from([("mode".to_string(), Nix::str(&a.mode))]);
    if let Some(owner) = &a.owner {
        m.insert("owner".into(), Nix::str(owner.as_str()));
    }
    if let Some(group) = &a.group {
        m.insert("group".into(), Nix::str(group.as_str()));
    }
    Nix::Attrs(m)
}

/// `config.nixmox`: what this host's own modules need to know, and nothing more, so that adding
/// a service changes only the hosts that use it.
fn facts(
    p: &Project,
    i: usize,
    c: &mut BTreeMap<String, Nix>,
    secrets: &mut BTreeMap<String, Nix>,
) {
    let s = &p.services[i];
    let mut f: BTreeMap<String, Nix> = BTreeMap::new();
    f.insert("project".into(), Nix::str(p.name.as_str()));
    f.insert("domain".into(), Nix::str(p.domain.as_str()));
    let host_fact = |t: &Service| {
        Nix::attrs([
            ("fqdn", Nix::str(p.fqdn(t))),
            ("ip", Nix::str(t.host.ip.to_string())),
            ("hostname", Nix::str(t.host.hostname.as_str())),
        ])
    };
    f.insert("host".into(), host_fact(s));
    let mut hosts = BTreeMap::new();
    hosts.insert(s.name.to_string(), host_fact(s));
    for e in p.deps_of(i) {
        let t = &p.services[e.to];
        hosts.insert(t.name.to_string(), host_fact(t));
    }
    f.insert("hosts".into(), Nix::Attrs(hosts));
    if let Some(pg) = p.provider(Capability::Database) {
        let mut dbs = BTreeMap::new();
        for db in &s.dbs {
            let name = db_secret(&db.role);
            dbs.insert(
                db.database.clone(),
                Nix::attrs([
                    ("host", Nix::str(p.fqdn(pg))),
                    ("ip", Nix::str(pg.host.ip.to_string())),
                    ("port", Nix::Int(i64::from(POSTGRES_PORT))),
                    ("database", Nix::str(&db.database)),
                    ("role", Nix::str(&db.role)),
                    ("passwordFile", secret_path(&name)),
                ]),
            );
            secrets
                .entry(name)
                .or_insert_with(|| secret_access(&db.access));
        }
        if !dbs.is_empty() {
            f.insert("db".into(), Nix::Attrs(dbs));
        }
    }
    if let (Some(auth), Some(iss)) = (&s.auth, issuer(p, s)) {
        if let Some(o) = &auth.oidc {
            let mut m = BTreeMap::from([
                ("issuer".to_string(), Nix::str(&iss)),
                (
                    "discoveryUrl".to_string(),
                    Nix::str(format!("{iss}.well-known/openid-configuration")),
                ),
                ("clientId".to_string(), Nix::str(&o.client_id)),
                ("clientType".to_string(), Nix::str(o.client_type.as_str())),
                (
                    "redirectUris".to_string(),
                    Nix::strs(o.redirect_uris.iter().cloned()),
                ),
                ("scopes".to_string(), Nix::strs(o.scopes.iter().cloned())),
                ("usernameClaim".to_string(), Nix::str(&o.username_claim)),
                ("groupsClaim".to_string(), Nix::str(&o.groups_claim)),
            ]);
            if o.client_type == ClientType::Confidential {
                let name = oidc_secret(s.name.as_str());
                m.insert("clientSecretFile".into(), secret_path(&name));
                secrets.insert(name, secret_access(&o.access));
            }
            f.insert("oidc".into(), Nix::Attrs(m));
        }
    }
    if !s.proxies.is_empty() {
        f.insert(
            "routes".into(),
            Nix::List(
                s.proxies
                    .iter()
                    .map(|x| {
                        let scheme = if x.tls { "https" } else { "http" };
                        Nix::attrs([
                            ("domain", Nix::str(x.domain.as_str())),
                            ("path", Nix::str(&x.path)),
                            (
                                "url",
                                Nix::str(format!("{scheme}://{}{}", x.domain, x.path)),
                            ),
                            ("authz", Nix::Bool(x.authz)),
                        ])
                    })
                    .collect(),
            ),
        );
    }
    if s.provides(Capability::Dns) {
        let mut records = BTreeMap::new();
        for (name, ip) in dns_records(p) {
            records.insert(name, Nix::str(ip));
        }
        set(&mut f, &["dns", "records"], Nix::Attrs(records));
    }
    c.insert("nixmox".into(), Nix::Attrs(f));
}

/// Every A record the DNS host serves: each host's FQDN, and each proxied domain pointing at
/// the reverse proxy.
pub fn dns_records(p: &Project) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in &p.services {
        out.insert(p.fqdn(s), s.host.ip.to_string());
    }
    if let Some(rp) = p.provider(Capability::ReverseProxy) {
        for s in &p.services {
            for x in &s.proxies {
                out.insert(x.domain.to_string(), rp.host.ip.to_string());
            }
        }
    }
    out
}

fn postgresql(
    p: &Project,
    me: usize,
    c: &mut BTreeMap<String, Nix>,
    secrets: &mut BTreeMap<String, Nix>,
) {
    let mut databases = BTreeSet::new();
    let mut users: BTreeMap<String, bool> = BTreeMap::new();
    let hba = pg_hba(p, me);
    let mut setup: Vec<Part> = vec![Part::Lit(SETUP_PRELUDE.to_string())];
    for s in &p.services {
        for db in &s.dbs {
            if db.mode == DbMode::Terraform {
                // Created by the service's own Terraform (the postgresql provider).
                continue;
            }
            databases.insert(db.database.clone());
            let owns = db.role == db.database;
            let entry = users.entry(db.role.clone()).or_insert(false);
            *entry |= owns;
            let secret = db_secret(&db.role);
            secrets.insert(
                secret.clone(),
                Nix::attrs([
                    ("owner", Nix::str("postgres")),
                    ("mode", Nix::str("0400")),
                    ("restartUnits", Nix::strs([format!("{SETUP_UNIT}.service")])),
                ]),
            );
            if !owns {
                // ensureDBOwnership needs role name = database name; otherwise hand the
                // database over explicitly.
                setup.push(Part::Lit(format!(
                    "nixmox_owner '{}' '{}'\n",
                    db.database, db.role
                )));
            }
            setup.push(Part::Lit(format!("nixmox_password '{}' \"", db.role)));
            setup.push(Part::Expr(secret_path(&secret)));
            setup.push(Part::Lit("\"\n".into()));
            for m in &db.migrations {
                let name = safe_name(base_name(m));
                setup.push(Part::Lit(format!(
                    "nixmox_migrate '{}' '{}' \"",
                    db.database, name
                )));
                setup.push(Part::Expr(Nix::Expr(format!(
                    "../migrations/{}/{}",
                    db.database, name
                ))));
                setup.push(Part::Lit(format!("\" '{}'\n", db.role)));
            }
        }
    }
    set(c, &["services", "postgresql", "enable"], Nix::Bool(true));
    set(
        c,
        &["services", "postgresql", "enableTCPIP"],
        Nix::Bool(true),
    );
    set(
        c,
        &["services", "postgresql", "settings", "port"],
        Nix::Int(i64::from(POSTGRES_PORT)),
    );
    set(
        c,
        &["services", "postgresql", "settings", "password_encryption"],
        Nix::str("scram-sha-256"),
    );
    set(
        c,
        &["services", "postgresql", "ensureDatabases"],
        Nix::strs(databases.iter().cloned()),
    );
    set(
        c,
        &["services", "postgresql", "ensureUsers"],
        Nix::List(
            users
                .iter()
                .map(|(name, owns)| {
                    let mut u = BTreeMap::from([("name".to_string(), Nix::str(name))]);
                    if *owns {
                        u.insert("ensureDBOwnership".into(), Nix::Bool(true));
                    }
                    set(&mut u, &["ensureClauses", "login"], Nix::Bool(true));
                    Nix::Attrs(u)
                })
                .collect(),
        ),
    );
    set(
        c,
        &["services", "postgresql", "authentication"],
        Nix::Str(hba),
    );
    let mut unit = BTreeMap::new();
    unit.insert(
        "description".to_string(),
        Nix::str("NixMox: database ownership, role passwords and migrations"),
    );
    // Up to 25.05 ensureUsers runs in postgresql.service's postStart; from 25.11 in
    // postgresql-setup.service, which older releases do not have: name only what the pinned
    // release has.
    let ready = postgresql_ready_units(release(p));
    unit.insert("after".to_string(), Nix::strs(ready.iter().copied()));
    unit.insert("requires".to_string(), Nix::strs(ready.iter().copied()));
    unit.insert("wantedBy".to_string(), Nix::strs(["multi-user.target"]));
    unit.insert(
        "path".to_string(),
        Nix::list([Nix::Code("config.services.postgresql.package")]),
    );
    set(&mut unit, &["serviceConfig", "Type"], Nix::str("oneshot"));
    set(
        &mut unit,
        &["serviceConfig", "RemainAfterExit"],
        Nix::Bool(true),
    );
    set(&mut unit, &["serviceConfig", "User"], Nix::str("postgres"));
    unit.insert("script".to_string(), Nix::Interp(setup));
    set(c, &["systemd", "services", SETUP_UNIT], Nix::Attrs(unit));
}

/// The database host's `pg_hba.conf` lines (`services.postgresql.authentication`): each
/// consumer's database and role, from its own address only (`me` is the database host).
pub fn pg_hba(p: &Project, me: usize) -> String {
    let mut hba = String::new();
    for (j, s) in p.services.iter().enumerate() {
        for db in &s.dbs {
            let source = if j == me {
                "127.0.0.1/32".to_string()
            } else {
                format!("{}/32", s.host.ip)
            };
            hba.push_str(&format!(
                "host  {:<20} {:<20} {:<18} scram-sha-256\n",
                pg_hba_name(&db.database),
                pg_hba_name(&db.role),
                source
            ));
        }
    }
    hba
}

/// A pg_hba field: names with characters beyond `[a-z0-9_]` are double-quoted.
fn pg_hba_name(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        s.to_string()
    } else {
        format!("\"{s}\"")
    }
}

/// The setup unit's shell functions. Values reach SQL only through psql variables quoted with
/// `%I`/`%L`; the password travels in the environment, never on a command line.
pub const SETUP_PRELUDE: &str = r#"set -euo pipefail
q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
nixmox_owner() {
  q -d postgres -v db="$1" -v role="$2" <<'SQL'
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'role') \gexec
SQL
}
nixmox_password() {
  NIXMOX_PASSWORD="$(cat "$2")" q -d postgres -v role="$1" <<'SQL'
\getenv pw NIXMOX_PASSWORD
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'role', :'pw') \gexec
SQL
}
nixmox_migrate() {
  q -d "$1" <<'SQL'
CREATE TABLE IF NOT EXISTS nixmox_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
SQL
  local done
  done="$(q -d "$1" -tA -v name="$2" <<'SQL'
SELECT count(*) FROM nixmox_migrations WHERE name = :'name';
SQL
)"
  if [ "$done" = "0" ]; then
    { printf '%s\n' "SELECT format('SET ROLE %I', :'nixmox_role') \gexec"; cat "$3"; printf '\nRESET ROLE;\nINSERT INTO nixmox_migrations (name) VALUES (%s);\n' "'$2'"; } | q -d "$1" -v nixmox_role="$4" --single-transaction
    echo "nixmox: applied migration $2 to $1"
  fi
}
"#;

/// A Caddyfile token taken literally: Caddy reads a backtick-quoted token without escapes, so
/// quotes and backslashes arrive as written (in a `"`-quoted token `\\` stays two backslashes).
/// Values are checked by `manifest::check_header_value` (no backtick, no `{}` placeholders); a
/// backtick that got here anyway falls back to a `"`-quoted token.
pub fn caddy_quote(s: &str) -> String {
    if s.contains('`') {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        format!("`{s}`")
    }
}

fn caddy(p: &Project, c: &mut BTreeMap<String, Nix>) {
    let hosts: BTreeMap<String, Nix> = caddy_sites(p)
        .into_iter()
        .map(|(site, conf)| (site, Nix::attrs([("extraConfig", Nix::Str(conf))])))
        .collect();
    set(c, &["services", "caddy", "enable"], Nix::Bool(true));
    set(c, &["services", "caddy", "virtualHosts"], Nix::Attrs(hosts));
}

/// The reverse proxy's sites: site address → Caddyfile text of its routes.
pub fn caddy_sites(p: &Project) -> BTreeMap<String, String> {
    // Group routes by site (domain and scheme).
    let mut sites: BTreeMap<String, Vec<(&Service, &crate::model::Proxy)>> = BTreeMap::new();
    for s in &p.services {
        for x in &s.proxies {
            let site = if x.tls {
                x.domain.to_string()
            } else {
                format!("http://{}", x.domain)
            };
            sites.entry(site).or_default().push((s, x));
        }
    }
    let outpost = p
        .provider(Capability::Identity)
        .map(|idp| format!("http://{}:{AUTHENTIK_HTTP_PORT}", idp.host.ip));
    let mut hosts = BTreeMap::new();
    for (site, mut routes) in sites {
        // Most specific path first; `/` last as the fallback.
        routes.sort_by(|a, b| {
            b.1.path
                .len()
                .cmp(&a.1.path.len())
                .then(a.1.path.cmp(&b.1.path))
        });
        let mut conf = String::new();
        if routes.iter().any(|(_, x)| x.tls) {
            conf.push_str("tls internal\n");
        }
        let any_authz = routes.iter().any(|(_, x)| x.authz);
        if let (true, Some(outpost)) = (any_authz, &outpost) {
            conf.push_str(&format!(
                "handle /outpost.goauthentik.io/* {{\n  reverse_proxy {outpost}\n}}\n"
            ));
        }
        for (n, (s, x)) in routes.into_iter().enumerate() {
            let upstream = match &x.upstream {
                Upstream::Port(port) => format!("{}:{port}", s.host.ip),
                Upstream::HostPort(h, port) => format!("{h}:{port}"),
            };
            let matcher = if x.path == "/" {
                String::new()
            } else {
                let base = x.path.trim_end_matches('/');
                conf.push_str(&format!("@route{n} path {base} {base}/*\n"));
                format!(" @route{n}")
            };
            conf.push_str(&format!("handle{matcher} {{\n"));
            for (name, value) in &x.headers {
                conf.push_str(&format!("  header {name} {}\n", caddy_quote(value)));
            }
            if let (true, Some(outpost)) = (x.authz, &outpost) {
                conf.push_str(&format!("  forward_auth {outpost} {{\n    uri /outpost.goauthentik.io/auth/caddy\n    copy_headers {AUTHENTIK_HEADERS}\n    trusted_proxies private_ranges\n  }}\n"));
            }
            conf.push_str(&format!("  reverse_proxy {upstream}\n}}\n"));
        }
        hosts.insert(site, conf);
    }
    hosts
}

fn unbound(p: &Project, c: &mut BTreeMap<String, Nix>) {
    let zone = p.domain.as_str();
    let mut local_data: Vec<Nix> = Vec::new();
    for (name, ip) in dns_records(p) {
        local_data.push(Nix::str(format!("\"{name}. IN A {ip}\"")));
    }
    // Forwarders: the configured nameservers other than this resolver, else the gateway.
    let me = p.provider(Capability::Dns).map(|d| d.host.ip);
    let mut forwarders: Vec<String> = p
        .network
        .nameservers
        .iter()
        .filter(|n| Some(**n) != me)
        .map(|n| n.to_string())
        .collect();
    if forwarders.is_empty() {
        forwarders.push(p.network.gateway.to_string());
    }
    set(c, &["services", "unbound", "enable"], Nix::Bool(true));
    set(
        c,
        &["services", "unbound", "resolveLocalQueries"],
        Nix::Bool(true),
    );
    set(
        c,
        &["services", "unbound", "settings", "server", "interface"],
        Nix::strs(["0.0.0.0"]),
    );
    set(
        c,
        &[
            "services",
            "unbound",
            "settings",
            "server",
            "access-control",
        ],
        Nix::strs([
            "127.0.0.0/8 allow".to_string(),
            format!("{} allow", p.network.cidr),
        ]),
    );
    set(
        c,
        &["services", "unbound", "settings", "server", "local-zone"],
        Nix::strs([format!("\"{zone}.\" static")]),
    );
    set(
        c,
        &["services", "unbound", "settings", "server", "local-data"],
        Nix::List(local_data),
    );
    set(
        c,
        &["services", "unbound", "settings", "forward-zone"],
        Nix::list([Nix::attrs([
            ("name", Nix::str(".")),
            ("forward-addr", Nix::strs(forwarders)),
        ])]),
    );
}

fn authentik(
    p: &Project,
    s: &Service,
    c: &mut BTreeMap<String, Nix>,
    secrets: &mut BTreeMap<String, Nix>,
) {
    // authentik reads its secrets from an environment file; sops-nix renders it from a
    // template whose placeholders it replaces with the decrypted values at activation, so the
    // file is built from NixMox's own secrets and nothing has to be set by hand.
    let units = ["authentik.service", "authentik-worker.service"];
    secrets.insert(
        AUTHENTIK_SECRET_KEY.to_string(),
        Nix::attrs([
            ("mode", Nix::str("0400")),
            ("restartUnits", Nix::strs(units)),
        ]),
    );
    let mut content = vec![
        Part::Lit("AUTHENTIK_SECRET_KEY=".into()),
        Part::Expr(placeholder(AUTHENTIK_SECRET_KEY)),
        Part::Lit("\n".into()),
    ];
    if let (Some(_), Some(db)) = (p.provider(Capability::Database), s.dbs.first()) {
        content.extend([
            Part::Lit("AUTHENTIK_POSTGRESQL__PASSWORD=".into()),
            Part::Expr(placeholder(&db_secret(&db.role))),
            Part::Lit("\n".into()),
        ]);
    }
    set(
        c,
        &["sops", "templates", AUTHENTIK_ENV_TEMPLATE],
        Nix::attrs([
            ("content", Nix::Interp(content)),
            ("mode", Nix::str("0400")),
            ("restartUnits", Nix::strs(units)),
        ]),
    );
    set(c, &["services", "authentik", "enable"], Nix::Bool(true));
    set(
        c,
        &["services", "authentik", "environmentFile"],
        Nix::select("config.sops.templates", &[AUTHENTIK_ENV_TEMPLATE, "path"]),
    );
    set(
        c,
        &["services", "authentik", "createDatabase"],
        Nix::Bool(false),
    );
    set(
        c,
        &[
            "services",
            "authentik",
            "settings",
            "disable_startup_analytics",
        ],
        Nix::Bool(true),
    );
    set(
        c,
        &["services", "authentik", "settings", "avatars"],
        Nix::str("initials"),
    );
    if let (Some(pg), Some(db)) = (p.provider(Capability::Database), s.dbs.first()) {
        set(
            c,
            &["services", "authentik", "settings", "postgresql", "host"],
            Nix::str(p.fqdn(pg)),
        );
        set(
            c,
            &["services", "authentik", "settings", "postgresql", "port"],
            Nix::Int(i64::from(POSTGRES_PORT)),
        );
        set(
            c,
            &["services", "authentik", "settings", "postgresql", "name"],
            Nix::str(&db.database),
        );
        set(
            c,
            &["services", "authentik", "settings", "postgresql", "user"],
            Nix::str(&db.role),
        );
    }
    if let Some(d) = idp_domain(p) {
        set(
            c,
            &[
                "services",
                "authentik",
                "settings",
                "authentik",
                "external_host",
            ],
            Nix::str(format!("https://{d}")),
        );
    }
}
