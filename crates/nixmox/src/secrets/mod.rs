//! Secrets: one SOPS-encrypted YAML file per host (`secrets/<hostname>.yaml`, safe to commit),
//! encrypted with the `sops` binary to the host's age key (derived from its SSH ed25519 host
//! key, the sops-nix convention) and to the project's admin recipients
//! (`secrets.age_recipients`). sops-nix decrypts it on the host at activation.
//!
//! What goes in (see docs/secrets.md):
//! - `db/<role>`: database role passwords, generated here (32 random bytes, base64url) the first
//!   time a host needs one, then kept; the database host and the consuming host get the same
//!   value.
//! - `authentik/secret_key`: the identity provider's secret key, generated the same way for
//!   its host; the renderer builds authentik's environment file from it (a sops-nix template).
//! - `pki/ca_key`: the project CA's private key (PEM), made with its certificate
//!   (`secrets/ca.crt`, public) for the reverse proxy's host (src/pki.rs).
//! - `oidc/<service>/client_secret` and `tf/<output>[/<key>...]`: the sensitive outputs of a
//!   service's Terraform steps, right after the step ran.
//! - anything `nixmox secrets set SERVICE NAME` is given.
//!
//! Nothing is ever held in clear outside this process's memory and the encrypted files: the
//! state database keeps hashes ([`index`]), every value seen is added to the redaction of
//! every process NixMox runs, and plaintext reaches sops on stdin and leaves on stdout.
//!
//! Reading a file back needs an age identity of one of the admin recipients (sops finds it
//! through `SOPS_AGE_KEY_FILE`, or `~/.config/sops/age/keys.txt`). It is needed only to change
//! a file that exists: a run where every recorded hash still matches decrypts nothing.

pub mod age;
pub mod index;
pub mod sops;
pub mod tree;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmox_core::model::{Capability, Deployer};
use nixmox_core::plan::{self, Change, Phase, Plan};
use nixmox_core::record::Record;
use nixmox_core::Project;

use self::index::{sha256_hex, value_hash, FileRecord, Index, IndexError};
use self::sops::{Sops, SopsError};
use self::tree::Flat;
use crate::exec::{self, Cmd, RunOpts};
use crate::state::OutputValue;

/// Where a project keeps its secrets files.
pub const SECRETS_DIR: &str = "secrets";
/// The input part of a `nix:*` step that stands for its host's secrets file.
pub const SECRETS_PART: &str = "secrets";
/// Where the host's public key is read from over SSH.
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key.pub";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Sops(#[from] SopsError),
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The system's random source could not be read.
    #[error("cannot read /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] crate::project_fs::WriteError),
    /// `ssh` could not be run to read a host's key.
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecError),
    /// `ssh` ran and reading the host's key failed: its exit code and last line of stderr.
    #[error("host `{host}`: reading {HOST_KEY_PATH} over SSH failed (exit {code}): {message}")]
    HostKeyUnread {
        host: String,
        code: i32,
        message: String,
    },
    #[error("host `{host}`: {HOST_KEY_PATH} holds no ssh-ed25519 key")]
    NoHostKey { host: String },
    /// The project CA could not be made (`pki`'s message).
    #[error("{0}")]
    Ca(String),
    #[error("host `{host}`: no age key is known for it yet: give its SSH host key as `host.ssh_host_key` in its manifest ({hint})")]
    NoRecipient { host: String, hint: &'static str },
    #[error("host `{host}`: its SSH host key `{key}` gives no age key: {error}")]
    BadHostKey {
        host: String,
        key: String,
        error: age::KeyError,
    },
    #[error("`secrets.age_recipients` in nixmox.yaml is empty: {what} must be encrypted to at least one admin key, or nobody could ever read or change it (add the output of `age-keygen -y KEYFILE`)")]
    NoAdmins { what: String },
    #[error("{0}")]
    Invalid(String),
}

/// The secrets a host needs NixMox to generate, by hostname: `db/<role>` for each database
/// it uses, and on each provider's host what its implementation generates
/// (`providers::Provider::secret_names`: the roles' passwords on the database host, the
/// project CA's key on Caddy's, `authentik/secret_key` on the identity provider's).
pub fn generated_needs(p: &Project) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &p.services {
        for provided in &s.provides {
            let names = provided.provider.secret_names(p);
            if !names.is_empty() {
                out.entry(s.host.hostname.to_string())
                    .or_default()
                    .extend(names);
            }
        }
    }
    if p.provider(Capability::Database).is_none() {
        return out;
    }
    for s in &p.services {
        for db in &s.dbs {
            out.entry(s.host.hostname.to_string())
                .or_default()
                .insert(nixmox_core::providers::db_secret(&db.role));
        }
    }
    out
}

/// The services whose host needs a generated secret, with that host's name.
pub fn hosts_needing(p: &Project, name: &str) -> Vec<String> {
    generated_needs(p)
        .into_iter()
        .filter(|(_, names)| names.contains(name))
        .map(|(h, _)| h)
        .collect()
}

/// A new random secret: 32 bytes from the system's CSPRNG, base64url without padding (43
/// characters, safe in URLs, environment files and PostgreSQL passwords).
pub fn generate() -> Result<String, SecretsError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretsError::Random)?;
    Ok(age::base64url(&bytes))
}

/// The project-relative path of a host's secrets file.
pub fn file_rel(host: &str) -> String {
    format!("{SECRETS_DIR}/{host}.yaml")
}

/// The SHA-256 of a host's secrets file as it is on disk, if there is one.
pub fn file_hash(root: &Path, host: &str) -> Option<String> {
    std::fs::read(root.join(file_rel(host)))
        .ok()
        .map(|b| sha256_hex(&b))
}

/// Same hash over parts as the planner's: `k \0 v \0` for each part, in key order.
pub fn parts_hash(parts: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, v) in parts {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn is_deploy(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig
    )
}

/// Sets (or removes) the secrets part of a step's input and recomputes its hash. Without the
/// part, the hash is the planner's own.
pub fn with_secrets_part(
    parts: &BTreeMap<String, String>,
    file_hash: Option<&str>,
) -> (BTreeMap<String, String>, String) {
    let mut parts = parts.clone();
    match file_hash {
        Some(h) => {
            parts.insert(SECRETS_PART.to_string(), h.to_string());
        }
        None => {
            parts.remove(SECRETS_PART);
        }
    }
    let hash = parts_hash(&parts);
    (parts, hash)
}

/// Makes each `nix:*` step's input include its host's secrets file, so that a changed file
/// (a rotated password, a new Terraform secret, a `secrets set`) redeploys exactly the hosts
/// whose file changed, and re-derives the step's change against the record.
pub fn augment_plan(root: &Path, project: &Project, plan: &mut Plan, record: Option<&Record>) {
    for step in &mut plan.steps {
        if !is_deploy(step.phase()) || step.change == Change::Delete {
            continue;
        }
        let Some(s) = step.service().and_then(|s| project.service(s)) else {
            continue;
        };
        let Some(h) = file_hash(root, s.host.hostname.as_str()) else {
            continue;
        };
        let (parts, hash) = with_secrets_part(&step.parts, Some(&h));
        step.parts = parts;
        step.hash = hash;
        step.reasons.clear();
        match record.and_then(|r| r.get(&step.id)) {
            None => step.change = Change::Create,
            Some(r) if r.hash == step.hash => step.change = Change::Unchanged,
            Some(r) => {
                step.change = Change::Update;
                step.reasons = plan::explain(&r.parts, &step.parts);
            }
        }
    }
}

/// The host (and service) whose file receives the sensitive outputs of a Terraform step:
/// the step's service; for `tf:auth-core`, the identity provider. `tf:infra` has none.
pub fn output_host(project: &Project, phase: Phase, service: Option<&str>) -> Option<String> {
    match (phase, service) {
        (Phase::TfServiceInfra | Phase::TfServiceConfig, Some(s)) => {
            project.service(s).map(|s| s.host.hostname.to_string())
        }
        (Phase::TfAuthCore, _) => project
            .provider(Capability::Identity)
            .map(|s| s.host.hostname.to_string()),
        _ => None,
    }
}

/// The secrets a Terraform step's sensitive outputs become: an output named `client_secret`
/// (or a `client_secret` inside a sensitive object, as a module's outputs arrive) of a
/// service's step is that service's `oidc/<service>/client_secret`; everything else is
/// `tf/<output>` with `/<key>` for each level of an object. Strings as they are, numbers and
/// booleans as text, lists as JSON; nulls are skipped.
pub fn output_secrets(outputs: &[OutputValue], service: Option<&str>) -> Flat {
    fn walk(path: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    walk(&format!("{path}/{k}"), x, out);
                }
            }
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => out.push((path.to_string(), s.clone())),
            other => out.push((path.to_string(), other.to_string())),
        }
    }
    let mut leaves = Vec::new();
    for o in outputs.iter().filter(|o| o.sensitive) {
        walk(&o.name, &o.value, &mut leaves);
    }
    let mut out = Flat::new();
    let mut oidc: Option<String> = None;
    for (path, value) in leaves {
        let valid = path.split('/').all(|seg| tree::check_name(seg).is_ok());
        if !valid {
            continue;
        }
        let last = path.rsplit('/').next().unwrap_or(&path);
        if service.is_some() && last == "client_secret" {
            // A top-level `client_secret` output wins over one nested in a module's object.
            if oidc.is_none() || path == "client_secret" {
                oidc = Some(value.clone());
            }
            continue;
        }
        out.insert(format!("tf/{path}"), value);
    }
    if let (Some(svc), Some(v)) = (service, oidc) {
        out.insert(nixmox_core::render::nixos::oidc_secret(svc), v);
    }
    out
}

/// The vault of one `up`: sops calls of the preparation logged to `.nixmox/logs/secrets.log`,
/// files written also into the build tree, and host keys read over SSH when NixMox deploys
/// over SSH itself (not with a custom deployer command).
pub fn for_run(
    root: &Path,
    project: &Project,
    paths: &crate::root::Paths,
) -> Result<Vault, SecretsError> {
    let mut vault = Vault::open(root, project, &paths.state_db, Some(&paths.build))?;
    if !matches!(project.nix.deployer, Deployer::Command { .. }) {
        let _ = std::fs::create_dir_all(&paths.ssh);
        vault = vault.with_ssh(SshAccess {
            options: nixmox_core::deploy::ssh_options(
                &paths.ssh.to_string_lossy(),
                &paths.known_hosts.to_string_lossy(),
                project.ssh.host_key_checking.as_str(),
            ),
            user: project.ssh.user.clone(),
        });
    }
    vault.log = Some(paths.logs.join("secrets.log"));
    Ok(vault)
}

/// How to read a host's SSH key after it booted.
#[derive(Clone, Debug)]
pub struct SshAccess {
    pub options: Vec<String>,
    pub user: nixmox_core::ids::SshUser,
}

/// One change to a secrets file.
#[derive(Clone, Debug)]
pub enum Edit {
    Set {
        name: String,
        value: String,
        source: String,
    },
    Remove {
        name: String,
    },
}

#[derive(Clone, Debug)]
struct HostInfo {
    service: String,
    ip: core::net::Ipv4Addr,
    manifest_key: Option<String>,
}

/// The secrets files of one project, for one process: the index, the plaintext this process
/// has seen (memory only), and how to run sops.
pub struct Vault {
    root: PathBuf,
    /// `.nixmox/build`: a file written here is also copied to `nix/secrets/` in it, so a deploy
    /// later in the same run ships it.
    build: Option<PathBuf>,
    pub sops: Sops,
    index: Index,
    admins: Vec<String>,
    hosts: BTreeMap<String, HostInfo>,
    needs: BTreeMap<String, BTreeSet<String>>,
    ssh: Option<SshAccess>,
    cache: BTreeMap<String, Flat>,
    fresh: BTreeMap<String, String>,
    known: BTreeSet<String>,
    /// Where sops's command lines and stderr are logged.
    pub log: Option<PathBuf>,
    /// The project's domain, named in its CA's certificate.
    domain: String,
    /// The host whose file holds the project CA's key (the reverse proxy's), if it has one.
    ca_host: Option<String>,
}

impl Vault {
    /// Opens the index in the state database at `state_db` (opened by the `Store` before).
    pub fn open(
        root: &Path,
        project: &Project,
        state_db: &Path,
        build: Option<&Path>,
    ) -> Result<Vault, SecretsError> {
        let hosts = project
            .services
            .iter()
            .map(|s| {
                (
                    s.host.hostname.to_string(),
                    HostInfo {
                        service: s.name.to_string(),
                        ip: s.host.ip,
                        manifest_key: s.host.ssh_host_key.clone(),
                    },
                )
            })
            .collect();
        let mut admins = project.secrets.age_recipients.clone();
        admins.sort();
        admins.dedup();
        Ok(Vault {
            root: root.to_path_buf(),
            build: build.map(Path::to_path_buf),
            sops: Sops::default(),
            index: Index::open(state_db)?,
            admins,
            hosts,
            needs: generated_needs(project),
            ssh: None,
            cache: BTreeMap::new(),
            fresh: BTreeMap::new(),
            known: BTreeSet::new(),
            log: None,
            domain: project.domain.to_string(),
            ca_host: project
                .provider(Capability::ReverseProxy)
                .filter(|_| nixmox_core::render::nixos::has_project_ca(project))
                .map(|s| s.host.hostname.to_string()),
        })
    }

    /// Lets the vault read host keys over SSH (built-in deployers only).
    pub fn with_ssh(mut self, ssh: SshAccess) -> Self {
        self.ssh = Some(ssh);
        self
    }

    pub fn has_admins(&self) -> bool {
        !self.admins.is_empty()
    }

    /// Every secret value this process has seen, for redaction.
    pub fn known_values(&self) -> Vec<String> {
        self.known.iter().cloned().collect()
    }

    fn remember(&mut self, value: &str) {
        if !value.is_empty() {
            self.known.insert(value.to_string());
        }
    }

    fn redact(&self) -> Vec<String> {
        self.known_values()
    }

    pub fn path_of(&self, host: &str) -> PathBuf {
        self.root.join(file_rel(host))
    }

    fn service_of(&self, host: &str) -> String {
        self.hosts
            .get(host)
            .map(|h| h.service.clone())
            .unwrap_or_else(|| host.to_string())
    }

    /// The host's SSH key: from its manifest, else as recorded from the host.
    pub fn host_key(&self, host: &str) -> Result<Option<String>, SecretsError> {
        if let Some(k) = self.hosts.get(host).and_then(|h| h.manifest_key.clone()) {
            return Ok(Some(k));
        }
        Ok(self.index.host_key(host)?)
    }

    /// Reads the host's SSH ed25519 public key over SSH and records it (hosts whose manifest
    /// gives `host.ssh_host_key` are not asked). Returns the key.
    pub fn fetch_host_key(&mut self, host: &str) -> Result<Option<String>, SecretsError> {
        let Some(info) = self.hosts.get(host).cloned() else {
            return Ok(None);
        };
        if info.manifest_key.is_some() {
            return self.host_key(host);
        }
        let Some(ssh) = self.ssh.clone() else {
            return self.host_key(host);
        };
        let argv = nixmox_core::deploy::ssh_argv(
            &ssh.options,
            &ssh.user,
            info.ip,
            &["cat".to_string(), HOST_KEY_PATH.to_string()],
        );
        let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        let opts = RunOpts {
            timeout: Some(Duration::from_secs(30)),
            log: self.log.clone(),
            redact: self.redact(),
            ..RunOpts::default()
        };
        let fin = exec::run(&cmd, &opts)?;
        if !fin.success() {
            return Err(SecretsError::HostKeyUnread {
                host: host.to_string(),
                code: fin.code.unwrap_or(-1),
                message: fin
                    .stderr
                    .lines()
                    .last()
                    .unwrap_or("no message")
                    .to_string(),
            });
        }
        let key = fin
            .stdout
            .lines()
            .find(|l| l.starts_with("ssh-ed25519 "))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .ok_or_else(|| SecretsError::NoHostKey {
                host: host.to_string(),
            })?;
        age::ssh_to_age(&key).map_err(|error| SecretsError::BadHostKey {
            host: host.to_string(),
            key: key.clone(),
            error,
        })?;
        if self.index.host_key(host)?.as_deref() != Some(key.as_str()) {
            self.index.set_host_key(host, &key)?;
        }
        Ok(Some(key))
    }

    /// The age recipients a host's file is encrypted to (sorted), if its key is known.
    pub fn recipients(&self, host: &str) -> Result<Option<Vec<String>>, SecretsError> {
        let Some(key) = self.host_key(host)? else {
            return Ok(None);
        };
        let r = age::ssh_to_age(&key).map_err(|error| SecretsError::BadHostKey {
            host: host.to_string(),
            key: key.clone(),
            error,
        })?;
        let mut all = self.admins.clone();
        all.push(r);
        all.sort();
        all.dedup();
        Ok(Some(all))
    }

    /// Decrypts a host's file (once per process).
    fn plaintext(&mut self, host: &str) -> Result<Flat, SecretsError> {
        if let Some(p) = self.cache.get(host) {
            return Ok(p.clone());
        }
        let path = self.path_of(host);
        let flat = self
            .sops
            .decrypt(&path, self.log.as_deref(), &self.redact())?;
        for v in flat.values() {
            self.remember(v);
        }
        self.cache.insert(host.to_string(), flat.clone());
        Ok(flat)
    }

    /// Brings the index of a host's file up to date with the file on disk: nothing to do when
    /// the file's bytes are what NixMox last wrote or read; otherwise the file is decrypted
    /// (it was edited, checked out, or never seen), or forgotten if it is gone.
    fn refresh(&mut self, host: &str) -> Result<Option<FileRecord>, SecretsError> {
        let rec = self.index.file(host)?;
        let bytes = match std::fs::read(self.path_of(host)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if rec.is_some() {
                    self.index.forget_file(host)?;
                }
                self.cache.remove(host);
                return Ok(None);
            }
            Err(source) => {
                return Err(SecretsError::Read {
                    path: self.path_of(host),
                    source,
                })
            }
        };
        let sha = sha256_hex(&bytes);
        if let Some(r) = &rec {
            if r.file_sha256 == sha {
                return Ok(rec);
            }
        }
        // Changed behind NixMox's back (or never seen): read it.
        self.cache.remove(host);
        let flat = self.plaintext(host)?;
        let env = tree::envelope(&String::from_utf8_lossy(&bytes)).unwrap_or_default();
        let old = rec.map(|r| r.values).unwrap_or_default();
        let values = flat
            .iter()
            .map(|(name, value)| {
                let hash = value_hash(name, value);
                let source = match old.get(name) {
                    Some((h, s)) if *h == hash => s.clone(),
                    _ => "file".to_string(),
                };
                (name.clone(), (hash, source))
            })
            .collect();
        let fresh = FileRecord {
            file_sha256: sha,
            recipients: env.recipients,
            values,
        };
        self.index.set_file(host, &fresh)?;
        Ok(Some(fresh))
    }

    /// Applies edits to a host's file; re-encrypts it when a value differs from what is
    /// recorded or its recipients changed, and never otherwise (sops's output differs on every
    /// run, so an unchanged file is left byte for byte). Returns whether it was written.
    pub fn apply(&mut self, host: &str, edits: &[Edit]) -> Result<bool, SecretsError> {
        let rec = self.refresh(host)?;
        let exists = rec.is_some();
        let values = rec.as_ref().map(|r| r.values.clone()).unwrap_or_default();
        for e in edits {
            if let Edit::Set { value, .. } = e {
                self.remember(value);
            }
        }
        let differs = edits.iter().any(|e| match e {
            Edit::Set { name, value, .. } => {
                values.get(name).map(|(h, _)| h.as_str()) != Some(value_hash(name, value).as_str())
            }
            Edit::Remove { name } => values.contains_key(name),
        });
        if !differs && !exists {
            return Ok(false);
        }
        let Some(recipients) = self.recipients(host)? else {
            if differs {
                return Err(SecretsError::NoRecipient {
                    host: host.to_string(),
                    hint: if self.ssh.is_some() {
                        "or let NixMox read it over SSH once the host is up"
                    } else {
                        "NixMox has no SSH access to read it with a custom deployer"
                    },
                });
            }
            return Ok(false);
        };
        let same_recipients = rec.as_ref().is_some_and(|r| r.recipients == recipients);
        if !differs && same_recipients {
            return Ok(false);
        }
        if self.admins.is_empty() {
            return Err(SecretsError::NoAdmins {
                what: file_rel(host),
            });
        }
        let (plain, sources) = self.edited(host, exists, &values, edits)?;
        let encrypted = self.write_encrypted(host, &plain, &recipients)?;
        let record = FileRecord {
            file_sha256: sha256_hex(&encrypted),
            recipients,
            values: plain
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        (
                            value_hash(n, v),
                            sources.get(n).cloned().unwrap_or_else(|| "file".into()),
                        ),
                    )
                })
                .collect(),
        };
        self.index.set_file(host, &record)?;
        self.cache.insert(host.to_string(), plain);
        Ok(true)
    }

    /// The host's secrets after `edits`, with where each came from (`values` is what the
    /// index recorded of the file; `exists`: there is a file to decrypt first).
    fn edited(
        &mut self,
        host: &str,
        exists: bool,
        values: &BTreeMap<String, (String, String)>,
        edits: &[Edit],
    ) -> Result<(Flat, BTreeMap<String, String>), SecretsError> {
        let mut plain = if exists {
            self.plaintext(host)?
        } else {
            Flat::new()
        };
        let mut sources: BTreeMap<String, String> = values
            .iter()
            .map(|(n, (_, s))| (n.clone(), s.clone()))
            .collect();
        for e in edits {
            match e {
                Edit::Set {
                    name,
                    value,
                    source,
                } => {
                    tree::check_name(name).map_err(SecretsError::Invalid)?;
                    plain.insert(name.clone(), value.clone());
                    sources.insert(name.clone(), source.clone());
                }
                Edit::Remove { name } => {
                    plain.remove(name);
                    sources.remove(name);
                }
            }
        }
        Ok((plain, sources))
    }

    /// Encrypts the host's secrets to `recipients` and writes the file, and its copy in the
    /// build tree when there is one; the encrypted bytes.
    fn write_encrypted(
        &mut self,
        host: &str,
        plain: &Flat,
        recipients: &[String],
    ) -> Result<Vec<u8>, SecretsError> {
        let name = format!("{host}.yaml");
        let encrypted = self.sops.encrypt(
            plain,
            recipients,
            &name,
            self.log.as_deref(),
            &self.redact(),
        )?;
        let path = self.path_of(host);
        crate::project_fs::write_file(&path, &encrypted)?;
        if let Some(build) = &self.build {
            let copy = build.join("nix").join(SECRETS_DIR).join(&name);
            if build.join("nix").is_dir() {
                crate::project_fs::write_file(&copy, &encrypted)?;
            }
        }
        Ok(encrypted)
    }

    /// The current value of a generated secret (`db/<role>`), for a process that needs it in its
    /// environment; it is remembered for redaction.
    pub fn generated(&mut self, name: &str) -> Result<String, SecretsError> {
        let v = self.generated_value(name)?;
        self.remember(&v);
        Ok(v)
    }

    /// The current value of a generated secret: the one this process made or read, else read
    /// from a host file that holds the recorded value, else (nobody has it) a new one.
    fn generated_value(&mut self, name: &str) -> Result<String, SecretsError> {
        let target = self.index.generated(name)?;
        if let Some(v) = self.fresh.get(name) {
            if target.as_deref().is_none_or(|t| t == value_hash(name, v)) {
                return Ok(v.clone());
            }
        }
        let holders: Vec<String> = self
            .needs
            .iter()
            .filter(|(_, n)| n.contains(name))
            .map(|(h, _)| h.clone())
            .collect();
        let mut first_unreadable: Option<SecretsError> = None;
        for h in &holders {
            let Some(rec) = self.refresh(h)? else {
                continue;
            };
            let Some((hash, _)) = rec.values.get(name) else {
                continue;
            };
            if target.as_ref().is_some_and(|t| t != hash) {
                continue;
            }
            match self.plaintext(h) {
                Ok(flat) => {
                    if let Some(v) = flat.get(name) {
                        let v = v.clone();
                        if target.is_none() {
                            self.index.set_generated(name, &value_hash(name, &v))?;
                        }
                        self.fresh.insert(name.to_string(), v.clone());
                        return Ok(v);
                    }
                }
                Err(e) => {
                    first_unreadable.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_unreadable {
            // It exists but cannot be read here: never replace it silently.
            return Err(e);
        }
        let v = self.new_value(name)?;
        self.remember(&v);
        self.index.set_generated(name, &value_hash(name, &v))?;
        self.fresh.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// A new value for a generated secret. For the project CA's key that is a new CA: its
    /// certificate is written to the project (and the build) at once, so it always matches
    /// the newest key.
    fn new_value(&mut self, name: &str) -> Result<String, SecretsError> {
        if name != nixmox_core::render::nixos::CA_KEY_SECRET {
            return generate();
        }
        let ca = crate::pki::generate(&self.domain).map_err(SecretsError::Ca)?;
        self.remember(&ca.key_pem);
        self.write_ca_cert(&ca.cert_pem)?;
        Ok(ca.key_pem)
    }

    fn write_ca_cert(&self, pem: &str) -> Result<(), SecretsError> {
        let rel = nixmox_core::render::nixos::PROJECT_CA_CERT;
        let mut targets = vec![self.root.join(rel)];
        if let Some(build) = &self.build {
            if build.join("nix").is_dir() {
                targets.push(build.join("nix").join(rel));
            }
        }
        for t in targets {
            crate::project_fs::write_file(&t, pem.as_bytes())?;
        }
        Ok(())
    }

    /// Makes sure the project CA exists before any host that trusts it is deployed: its key in
    /// the proxy host's file (read over SSH for the host's key when allowed) and its
    /// certificate in the project. A certificate lost while its key is kept is made again from
    /// the key.
    pub fn ensure_ca(&mut self) -> Result<(), SecretsError> {
        let Some(host) = self.ca_host.clone() else {
            return Ok(());
        };
        if crate::pki::ca_cert_path(&self.root).is_file()
            && self
                .index
                .generated(nixmox_core::render::nixos::CA_KEY_SECRET)?
                .is_some()
        {
            return Ok(());
        }
        if self.host_key(&host)?.is_none() && self.ssh.is_some() {
            self.fetch_host_key(&host)?;
        }
        if self.admins.is_empty() {
            return Err(SecretsError::NoAdmins {
                what: "the project CA's key".into(),
            });
        }
        self.ensure_host(&host)?;
        if !crate::pki::ca_cert_path(&self.root).is_file() {
            let key = self.generated(nixmox_core::render::nixos::CA_KEY_SECRET)?;
            let pem =
                crate::pki::certificate_for_key(&key, &self.domain).map_err(SecretsError::Ca)?;
            self.write_ca_cert(&pem)?;
        }
        Ok(())
    }

    /// Makes a host's file hold every generated secret it needs, at its current value, and
    /// encrypted to its current recipients. Returns whether the file was written.
    pub fn ensure_host(&mut self, host: &str) -> Result<bool, SecretsError> {
        let names: Vec<String> = self
            .needs
            .get(host)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        let rec = self.refresh(host)?;
        let mut edits = Vec::new();
        for name in names {
            let have = rec
                .as_ref()
                .and_then(|r| r.values.get(&name))
                .map(|(h, _)| h.clone());
            let target = self.index.generated(&name)?;
            match (&have, &target) {
                (Some(h), Some(t)) if h == t => continue,
                (Some(h), None) => {
                    // Present before it was recorded as generated: adopt it.
                    self.index.set_generated(&name, h)?;
                    continue;
                }
                _ => {}
            }
            let value = self.generated_value(&name)?;
            edits.push(Edit::Set {
                name,
                value,
                source: "generated".into(),
            });
        }
        self.apply(host, &edits)
    }

    /// Before a run: every host whose key is known gets its generated secrets (and files whose
    /// recipients changed are re-encrypted). Hosts whose key is not known yet are done right
    /// before their deploy. Returns the hosts whose file was written.
    pub fn prepare(&mut self) -> Result<Vec<String>, SecretsError> {
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        let mut written = Vec::new();
        for host in hosts {
            let needs = self.needs.get(&host).is_some_and(|n| !n.is_empty());
            let exists = self.path_of(&host).exists();
            if !needs && !exists {
                continue;
            }
            if self.host_key(&host)?.is_none() {
                continue;
            }
            if needs && self.admins.is_empty() {
                return Err(SecretsError::NoAdmins {
                    what: format!(
                        "the generated secrets of host `{host}` ({})",
                        self.needs[&host]
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            if self.ensure_host(&host)? {
                written.push(host);
            }
        }
        // The project CA when its host's key is known (else before the first deploy).
        if let Some(host) = self.ca_host.clone() {
            if self.host_key(&host)?.is_some() {
                self.ensure_ca()?;
            }
        }
        Ok(written)
    }

    /// Before a host's deploy: its key (read over SSH when allowed and not in its manifest),
    /// then its generated secrets. Returns the SHA-256 of its file afterwards, if it has one.
    pub fn before_deploy(&mut self, host: &str) -> Result<Option<String>, SecretsError> {
        // Every host trusts the project CA: its certificate must exist before any deploy.
        self.ensure_ca()?;
        let needs = self.needs.get(host).is_some_and(|n| !n.is_empty());
        let exists = self.path_of(host).exists();
        if needs || exists {
            if self.ssh.is_some() {
                self.fetch_host_key(host)?;
            }
            if needs && self.admins.is_empty() {
                return Err(SecretsError::NoAdmins {
                    what: format!("the generated secrets of host `{host}`"),
                });
            }
            self.ensure_host(host)?;
        }
        Ok(file_hash(&self.root, host))
    }

    /// After a Terraform step: its sensitive outputs into its host's file; secrets this step
    /// wrote before and no longer outputs are removed. Returns the names written, or `None`
    /// when the project has no admin recipients (then nothing is stored).
    pub fn absorb_outputs(
        &mut self,
        step_id: &str,
        host: &str,
        service: Option<&str>,
        outputs: &[OutputValue],
    ) -> Result<Option<Vec<String>>, SecretsError> {
        let flat = output_secrets(outputs, service);
        for v in flat.values() {
            self.remember(v);
        }
        if self.admins.is_empty() {
            return Ok(None);
        }
        let source = format!("terraform:{step_id}");
        let rec = self.refresh(host)?;
        let mut edits: Vec<Edit> = flat
            .iter()
            .map(|(name, value)| Edit::Set {
                name: name.clone(),
                value: value.clone(),
                source: source.clone(),
            })
            .collect();
        if let Some(r) = &rec {
            for (name, (_, s)) in &r.values {
                if *s == source && !flat.contains_key(name) {
                    edits.push(Edit::Remove { name: name.clone() });
                }
            }
        }
        if edits.is_empty() {
            return Ok(Some(Vec::new()));
        }
        if self.recipients(host)?.is_none() && self.ssh.is_some() {
            self.fetch_host_key(host)?;
        }
        self.apply(host, &edits)?;
        Ok(Some(flat.keys().cloned().collect()))
    }

    /// A person's secret (`nixmox secrets set`).
    pub fn set_user(&mut self, host: &str, name: &str, value: &str) -> Result<bool, SecretsError> {
        tree::check_name(name).map_err(SecretsError::Invalid)?;
        self.apply(
            host,
            &[Edit::Set {
                name: name.to_string(),
                value: value.to_string(),
                source: "user".into(),
            }],
        )
    }

    /// A new value for a generated secret, written to every host that needs it and whose key
    /// is known (the others get it before their deploy). Returns the hosts written.
    pub fn rotate(&mut self, name: &str) -> Result<Vec<String>, SecretsError> {
        let v = self.new_value(name)?;
        self.remember(&v);
        self.index.set_generated(name, &value_hash(name, &v))?;
        self.fresh.insert(name.to_string(), v);
        let mut written = Vec::new();
        let hosts: Vec<String> = self
            .needs
            .iter()
            .filter(|(_, n)| n.contains(name))
            .map(|(h, _)| h.clone())
            .collect();
        for h in hosts {
            if self.host_key(&h)?.is_none() {
                continue;
            }
            if self.ensure_host(&h)? {
                written.push(h);
            }
        }
        Ok(written)
    }

    /// What is recorded of a host's file (after bringing it up to date): name → source.
    pub fn list(&mut self, host: &str) -> Result<BTreeMap<String, String>, SecretsError> {
        Ok(self
            .refresh(host)?
            .map(|r| r.values.into_iter().map(|(n, (_, s))| (n, s)).collect())
            .unwrap_or_default())
    }

    /// The service a host belongs to (for messages).
    pub fn service_name(&self, host: &str) -> String {
        self.service_of(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(name: &str, value: serde_json::Value, sensitive: bool) -> OutputValue {
        OutputValue {
            name: name.into(),
            value,
            sensitive,
        }
    }

    #[test]
    fn sensitive_outputs_become_secret_names() {
        let outputs = [
            out("greeting", serde_json::json!("hi"), false),
            out(
                "bucket_0_0",
                serde_json::json!({"token": "t0k3n", "n": 3, "gone": null, "client_secret": "nested"}),
                true,
            ),
            out("client_secret", serde_json::json!("top"), true),
            out("bad name", serde_json::json!("x"), true),
        ];
        let flat = output_secrets(&outputs, Some("app"));
        assert_eq!(
            flat,
            Flat::from([
                ("oidc/app/client_secret".to_string(), "top".to_string()),
                ("tf/bucket_0_0/n".to_string(), "3".to_string()),
                ("tf/bucket_0_0/token".to_string(), "t0k3n".to_string()),
            ])
        );
        // Without a service (tf:auth-core), a client_secret stays a plain Terraform secret.
        let flat = output_secrets(&outputs[2..3], None);
        assert_eq!(
            flat,
            Flat::from([("tf/client_secret".to_string(), "top".to_string())])
        );
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn parts_hash_is_the_planners() {
        let tmp = tempfile::tempdir().unwrap();
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/seed");
        let loaded = crate::project_fs::read_project(&root).unwrap();
        let exists = crate::project_fs::exists_in(&root);
        let project = nixmox_core::load(&loaded.sources, &exists).project.unwrap();
        let p = plan::plan(&project, &Default::default(), &Default::default());
        for s in &p.steps {
            assert_eq!(parts_hash(&s.parts), s.hash, "{}", s.id);
        }
        // The secrets part changes a deploy step's hash and explains itself.
        let mut p2 = p.clone();
        std::fs::create_dir_all(tmp.path().join("secrets")).unwrap();
        let host = project.services[0].host.hostname.to_string();
        std::fs::write(tmp.path().join(format!("secrets/{host}.yaml")), "x").unwrap();
        let record = Record {
            steps: p
                .steps
                .iter()
                .map(|s| {
                    (
                        s.id.to_string(),
                        nixmox_core::record::StepRecord {
                            hash: s.hash.clone(),
                            parts: s.parts.clone(),
                            duration_ms: None,
                        },
                    )
                })
                .collect(),
            ..Record::default()
        };
        augment_plan(tmp.path(), &project, &mut p2, Some(&record));
        let changed: Vec<&str> = p2
            .steps
            .iter()
            .filter(|s| s.change == Change::Update)
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(changed[0].starts_with("nix:"), "{changed:?}");
        let step = p2
            .steps
            .iter()
            .find(|s| s.change == Change::Update)
            .unwrap();
        assert_eq!(step.reasons, vec!["added: secrets".to_string()]);
        // Recorded with the part: the planner's own verdict ("removed: secrets") is replaced.
        let record2 = Record {
            steps: p2
                .steps
                .iter()
                .map(|s| {
                    (
                        s.id.to_string(),
                        nixmox_core::record::StepRecord {
                            hash: s.hash.clone(),
                            parts: s.parts.clone(),
                            duration_ms: None,
                        },
                    )
                })
                .collect(),
            ..Record::default()
        };
        let mut p3 = plan::plan(
            &project,
            &Default::default(),
            &plan::PlanInput {
                record: Some(&record2),
                files: None,
                flake_lock: None,
            },
        );
        augment_plan(tmp.path(), &project, &mut p3, Some(&record2));
        assert!(p3
            .steps
            .iter()
            .all(|s| s.change == Change::Unchanged && s.reasons.is_empty()));
    }
}
