//! The NixOS side: `nix/flake.nix`, the `nixmox` options module, and one configuration per
//! host under `nix/hosts/`. Option names are listed, with the module declaring each, in
//! docs/generated-options.md.

//!
//! What is particular to a provider implementation (its services, ports, secrets) comes from
//! its module in `crate::providers`; this file renders what every host has.

use std::collections::{BTreeMap, BTreeSet};

use super::{base_name, issuer, safe_name, Copy, Rendered, HEADER};
use crate::config_out::effective_nameservers;
use crate::model::{Capability, Check, ClientType, Deployer, Project, Service, Upstream};
use crate::nixexpr::{self, set, Nix};
use crate::providers::{secret_access, secret_path, HostConfig};
use crate::RenderedFile;

// The provider modules own these; they stay reachable here for the callers that name them.
pub use crate::providers::authentik::{
    AUTHENTIK_ENV_TEMPLATE, AUTHENTIK_HTTPS_PORT, AUTHENTIK_HTTP_PORT, AUTHENTIK_SECRET_KEY,
};
pub use crate::providers::caddy::{caddy_pki_global, caddy_quote, caddy_sites, CADDY_CA_ID};
pub use crate::providers::db_secret;
pub use crate::providers::postgresql::{
    pg_hba, postgresql_ready_units, POSTGRES_PORT, SETUP_PRELUDE, SETUP_UNIT,
};

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
    // Secrets files (made by the secrets commands) travel with the flake when they exist, and
    // so does the project CA's certificate.
    if has_project_ca(p) {
        out.copies.push(Copy {
            from: PROJECT_CA_CERT.into(),
            to: format!("nix/{PROJECT_CA_CERT}"),
        });
    }
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

/// The build flake's `flake.nix`: its inputs and the outputs that find the hosts.
pub fn flake(p: &Project) -> String {
    let mut inputs = BTreeMap::new();
    // An input only an implementation needs is declared when the project runs it.
    for (name, url) in p.nix.inputs() {
        if crate::providers::project_needs_input(p, name) {
            set(&mut inputs, &[name, "url"], Nix::str(url));
        }
    }
    set(
        &mut inputs,
        &["sops-nix", "inputs", "nixpkgs", "follows"],
        Nix::str("nixpkgs"),
    );
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

/// The project CA's private key (PEM), generated by NixMox for the reverse proxy's host; Caddy
/// signs the certificates of its `tls` sites with it (issue 12, item 6).
pub const CA_KEY_SECRET: &str = "pki/ca_key";
/// The project CA's certificate, public, in the project (next to the secrets files); every
/// host trusts it and NixMox's own HTTPS clients (Terraform, checks) do too.
pub const PROJECT_CA_CERT: &str = "secrets/ca.crt";
/// Where the reverse proxy's host finds the certificate (`environment.etc`).
pub const CA_CERT_ETC: &str = "nixmox/ca.crt";

/// Whether the project has a CA: it does when its reverse proxy signs its `tls` sites with it
/// (Caddy) and the project keeps secrets (`secrets.age_recipients`), where its key goes.
/// Without secrets Caddy signs with its own local CA, as `tls internal` does.
pub fn has_project_ca(p: &Project) -> bool {
    p.implementation(Capability::ReverseProxy)
        .is_some_and(|rp| rp.uses_project_ca())
        && !p.secrets.age_recipients.is_empty()
}

pub fn oidc_secret(service: &str) -> String {
    format!("oidc/{service}/client_secret")
}

/// The ports a host serves, for its firewall: SSH, its routes' and TCP checks' ports on
/// itself, and those of the implementations it provides.
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
    for provided in &s.provides {
        let ports = provided.provider.ports();
        tcp.extend(ports.tcp);
        udp.extend(ports.udp);
    }
    (tcp, udp)
}

fn ints(set: &BTreeSet<u16>) -> Nix {
    Nix::List(set.iter().map(|p| Nix::Int(i64::from(*p))).collect())
}

/// The host configuration of service `i`: what every host has, its facts, then the part of
/// each implementation it provides, then its secrets.
fn host(p: &Project, i: usize) -> String {
    let s = &p.services[i];
    let mut h = HostConfig::default();
    let mut imports = vec![
        Nix::Code("(modulesPath + \"/virtualisation/proxmox-lxc.nix\")"),
        Nix::path("../modules/nixmox.nix"),
        Nix::Code("inputs.sops-nix.nixosModules.sops"),
    ];
    for provided in &s.provides {
        imports.extend(provided.provider.imports());
    }
    imports.extend(s.nixos_modules.iter().map(|m| module_import(s, m)));
    h.options.insert("imports".into(), Nix::List(imports));
    network(p, s, &mut h.options);
    access(p, &mut h.options);
    if has_project_ca(p) {
        // Every host trusts the CA that signs the reverse proxy's certificates, so services
        // calling each other through it (OIDC discovery and token calls) verify them.
        set(
            &mut h.options,
            &["security", "pki", "certificateFiles"],
            Nix::list([Nix::path(&format!("../{PROJECT_CA_CERT}"))]),
        );
    }
    facts(p, i, &mut h);
    for provided in &s.provides {
        provided.provider.host_config(p, i, &mut h);
    }
    let HostConfig {
        options: mut c,
        secrets,
    } = h;
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

/// The container and its network: LXC settings, address, gateway, nameservers, firewall.
fn network(p: &Project, s: &Service, c: &mut BTreeMap<String, Nix>) {
    set(c, &["proxmoxLXC", "manageNetwork"], Nix::Bool(true));
    set(c, &["proxmoxLXC", "manageHostName"], Nix::Bool(true));
    set(
        c,
        &["proxmoxLXC", "privileged"],
        Nix::Bool(!s.host.unprivileged),
    );
    set(
        c,
        &["networking", "hostName"],
        Nix::str(s.host.hostname.as_str()),
    );
    set(c, &["networking", "domain"], Nix::str(p.domain.as_str()));
    set(c, &["networking", "useDHCP"], Nix::Bool(false));
    set(
        c,
        &["networking", "interfaces", "eth0", "ipv4", "addresses"],
        Nix::list([Nix::attrs([
            ("address", Nix::str(s.host.ip.to_string())),
            ("prefixLength", Nix::Int(i64::from(p.network.cidr.prefix()))),
        ])]),
    );
    set(
        c,
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
    set(c, &["networking", "nameservers"], Nix::strs(nameservers));
    let (tcp, udp) = ports(p, s);
    set(c, &["networking", "firewall", "enable"], Nix::Bool(true));
    set(
        c,
        &["networking", "firewall", "allowedTCPPorts"],
        ints(&tcp),
    );
    if !udp.is_empty() {
        set(
            c,
            &["networking", "firewall", "allowedUDPPorts"],
            ints(&udp),
        );
    }
}

/// How NixMox reaches and builds on the host: SSH, the deploying user, Nix settings,
/// stateVersion.
fn access(p: &Project, c: &mut BTreeMap<String, Nix>) {
    let ssh = |k: &'static str| ["services", "openssh", "settings", k];
    set(c, &["services", "openssh", "enable"], Nix::Bool(true));
    set(c, &ssh("PasswordAuthentication"), Nix::Bool(false));
    set(c, &ssh("KbdInteractiveAuthentication"), Nix::Bool(false));
    set(
        c,
        &ssh("PermitRootLogin"),
        Nix::str(if p.ssh.user.as_str() == "root" {
            "prohibit-password"
        } else {
            "no"
        }),
    );
    let user = p.ssh.user.as_str();
    set(
        c,
        &["users", "users", user, "openssh", "authorizedKeys", "keys"],
        Nix::strs(p.ssh.authorized_keys.iter().cloned()),
    );
    if user != "root" {
        set(
            c,
            &["users", "users", user, "isNormalUser"],
            Nix::Bool(true),
        );
        set(
            c,
            &["users", "users", user, "extraGroups"],
            Nix::strs(["wheel"]),
        );
        set(
            c,
            &["security", "sudo", "wheelNeedsPassword"],
            Nix::Bool(false),
        );
    }
    // Unprivileged containers cannot create the namespaces the Nix sandbox needs.
    set(c, &["nix", "settings", "sandbox"], Nix::Bool(false));
    set(
        c,
        &["nix", "settings", "experimental-features"],
        Nix::strs(["nix-command", "flakes"]),
    );
    set(
        c,
        &["nix", "settings", "trusted-users"],
        Nix::strs(if user == "root" {
            vec!["root"]
        } else {
            vec!["root", user]
        }),
    );
    set(c, &["system", "stateVersion"], Nix::str(state_version(p)));
}

/// `config.nixmox`: what this host's own modules need to know, and nothing more, so that adding
/// a service changes only the hosts that use it.
fn facts(p: &Project, i: usize, h: &mut HostConfig) {
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
    if let Some(dbs) = db_facts(p, s, &mut h.secrets) {
        f.insert("db".into(), dbs);
    }
    if let Some(oidc) = oidc_fact(p, s, &mut h.secrets) {
        f.insert("oidc".into(), oidc);
    }
    if !s.proxies.is_empty() {
        let routes = s.proxies.iter().map(|x| {
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
        });
        f.insert("routes".into(), Nix::List(routes.collect()));
    }
    if s.provides(Capability::Dns) {
        let mut records = BTreeMap::new();
        for (name, ip) in dns_records(p) {
            records.insert(name, Nix::str(ip));
        }
        set(&mut f, &["dns", "records"], Nix::Attrs(records));
    }
    h.options.insert("nixmox".into(), Nix::Attrs(f));
}

/// `nixmox.db`: where each of the service's databases is and the file holding its password
/// (declared as a secret the service reads).
fn db_facts(p: &Project, s: &Service, secrets: &mut BTreeMap<String, Nix>) -> Option<Nix> {
    let pg = p.provider(Capability::Database)?;
    let port = p
        .implementation(Capability::Database)
        .and_then(|d| d.service_port())?;
    let mut dbs = BTreeMap::new();
    for db in &s.dbs {
        let name = db_secret(&db.role);
        dbs.insert(
            db.database.clone(),
            Nix::attrs([
                ("host", Nix::str(p.fqdn(pg))),
                ("ip", Nix::str(pg.host.ip.to_string())),
                ("port", Nix::Int(i64::from(port))),
                ("database", Nix::str(&db.database)),
                ("role", Nix::str(&db.role)),
                ("passwordFile", secret_path(&name)),
            ]),
        );
        secrets
            .entry(name)
            .or_insert_with(|| secret_access(&db.access));
    }
    (!dbs.is_empty()).then_some(Nix::Attrs(dbs))
}

/// `nixmox.oidc`: the service's OIDC client (and, for a confidential one, its secret's file).
fn oidc_fact(p: &Project, s: &Service, secrets: &mut BTreeMap<String, Nix>) -> Option<Nix> {
    let o = s.auth.as_ref()?.oidc.as_ref()?;
    let iss = issuer(p, s)?;
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
    Some(Nix::Attrs(m))
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
