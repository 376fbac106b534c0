//! JSON Schema (2020-12) of `nixmox.yaml` and of service manifests, for editors
//! (yaml-language-server) and CI. Checked in under `schema/`; a test keeps those files current.
//!
//! The schemas describe exactly what the decoders in [`crate::config`] and [`crate::manifest`]
//! accept, and the tests below tie every object's fields to the decoders' field lists. What
//! they share with the decoders:
//! - keys starting with `x-` are extensions and ignored, so every object allows them;
//! - an explicit `null` means the field is absent, so every optional field accepts `null`;
//! - a plain number is accepted where free text is (`node: 1` is the string `"1"`), and an
//!   integer written as a string (`cores: "2"`) where an integer is;
//! - a single string is accepted where a list of strings is.
//!
//! Checks a schema cannot express (host bits of a CIDR, uniqueness across services, paths that
//! must exist, ranges of integers written as strings) are left to `nixmox validate`.
//!
//! Only keywords that draft-07 tools read the same way are used (no `unevaluated*`,
//! `dependent*` or `prefixItems`), so yaml-language-server understands the schemas fully.

use serde_json::{json, Map, Value};

use crate::config::{
    CORES, DEFAULT_AUTHENTIK_NIX, DEFAULT_HEALTH, DEFAULT_NIXPKGS, DEFAULT_RESOURCES,
    DEFAULT_SOPS_NIX, DEFAULT_TEMPLATE, DEFAULT_VMID_POOL, DISK_GB, MEMORY_MIB, SWAP_MIB,
};
use crate::decode::format_duration_ms;
use crate::ids::VmId;
use crate::manifest::CHECK_FIELDS;
use crate::model::Capability;

const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";
const BASE: &str = "https://nixmox.dev/schema/";

pub const PROJECT_FILE: &str = "nixmox.schema.json";
pub const MANIFEST_FILE: &str = "manifest.schema.json";

/// A POSIX portable user or group name (`ids::UnixName`).
const UNIX_NAME: &str = "^[a-z_][a-z0-9_-]{0,31}$";
/// A name: `[a-z][a-z0-9-]*`, not ending in `-`, at most 63 characters.
const NAME: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";
/// One DNS label (RFC 1123), lowercase.
const LABEL: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Dot-separated RFC 1123 labels, lowercase, no trailing dot; the last label is not all digits.
const DOMAIN: &str = "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)*([0-9]*[a-z]([a-z0-9-]*[a-z0-9])?|[0-9]+-([a-z0-9-]*[a-z0-9])?)$";
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
/// A host name, FQDN or IPv4 address, as accepted before a `:port`.
const HOST: &str = "[a-z0-9]([a-z0-9.-]*[a-z0-9])?";
/// A port number other than 0 (the decoder also checks it is at most 65535).
const PORT: &str = "0*[1-9][0-9]{0,4}";
/// An http(s) URL: host, optional port, optional path; no whitespace or credentials.
const URL: &str = "^https?://[^\\s/?#@:]+(:[0-9]{1,5})?([/?#]\\S*)?$";
const DURATION: &str = "^([0-9]+(ms|s|m|h|d))+$|^[0-9]+$";
const ZERO_DURATION: &str = "^(0+(ms|s|m|h|d))+$|^0+$";
/// An integer written as a string (`cores: "2"`), which the decoder accepts.
const INT_STRING: &str = "^\\s*[+-]?[0-9]+\\s*$";
/// Not empty and not only whitespace.
const NON_BLANK: &str = "\\S";
/// A PostgreSQL name that needs no quoting.
/// Lowercase SQL names, without PostgreSQL's reserved ones (pg_hba keywords, the superuser,
/// template databases, the `pg_` prefix of predefined roles).
const SQL_NAME: &str = "^(?!(all|sameuser|samerole|samegroup|replication|postgres|template0|template1|public|current_user|current_role|session_user|none)$)(?!pg_)[a-z_][a-z0-9_-]{0,62}$";
const NODE: &str = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$";
const SSH_KEY: &str = "^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh\\.com|sk-ecdsa-sha2-nistp256@openssh\\.com) [A-Za-z0-9+/]{20,}=*( [^\\u0000-\\u001f\\u007f]*)?$";
const TF_ADDRESS: &str =
    "^[A-Za-z_][A-Za-z0-9_-]*(\\[[^\\]]*\\])?(\\.[A-Za-z_][A-Za-z0-9_-]*(\\[[^\\]]*\\])?)+$";

/// The schema of `nixmox.yaml`.
pub fn project() -> Value {
    allow_schema_key(project_inner())
}

/// The JSON Schema (2020-12) of a service manifest.
pub fn manifest() -> Value {
    allow_schema_key(manifest_inner())
}

/// NixMox ignores a top-level `$schema` key, so JSON users can point editors at the schema.
fn allow_schema_key(mut v: Value) -> Value {
    if let Some(pp) = v
        .get_mut("patternProperties")
        .and_then(Value::as_object_mut)
    {
        pp.insert("^\\$schema$".into(), json!({"type": "string"}));
    }
    v
}

// One declarative table of every field of `nixmox.yaml`, in the file's order: long, but
// splitting it would scatter one schema over functions that each build a fragment.
fn project_inner() -> Value {
    let network = Obj::new("The network every container is attached to.")
        .req(
            "cidr",
            pattern(
                "The IPv4 network in CIDR notation, host bits clear, like `192.168.99.0/24`. Every `host.ip` and `pools.ip` must lie inside it. Required.",
                &format!("^{OCTET}(\\.{OCTET}){{3}}/(3[0-2]|[12]?[0-9])$"),
            ),
        )
        .req(
            "gateway",
            reference(
                "The default gateway: an address inside `cidr` that is not its network or broadcast address. Never allocated to a service. Required.",
                "ipv4",
            ),
        )
        .opt("vlan", int("VLAN tag of the containers' interface. Default: none (untagged).", 1, 4094))
        .opt("bridge", dflt(json!({"description": "The Proxmox bridge the containers' interface is attached to: a Linux interface name (a letter, then letters, digits, `_`, `.` or `-`, at most 15 characters).", "type": ["string", "number"], "pattern": "^[A-Za-z][A-Za-z0-9_.-]{0,14}$"}), json!("vmbr0")))
        .opt(
            "nameservers",
            dflt(
                json!({
                    "description": "DNS servers the hosts use, as a list of IPv4 addresses. Empty means: the address of the service that provides `dns`.",
                    "type": "array",
                    "items": {"$ref": "#/$defs/ipv4"},
                }),
                json!([]),
            ),
        )
        .build();

    let pools = Obj::new(
        "Where services that leave out `host.vmid` or `host.ip` get theirs: the lowest free value, recorded in `nixmox.lock` and kept stable.",
    )
    .opt(
        "vmid",
        dflt(
            pattern(
                "VM ids to allocate from, written `first-last` (inclusive), inside 100-999999999; explicit `host.vmid` values must lie inside it too.",
                "^\\s*[0-9]+\\s*-\\s*[0-9]+\\s*$",
            ),
            json!(format!("{}-{}", DEFAULT_VMID_POOL.start, DEFAULT_VMID_POOL.end)),
        ),
    )
    .opt(
        "ip",
        pattern(
            "Addresses to allocate from, written `first-last` (inclusive), inside the network and excluding its network and broadcast addresses; the gateway is skipped. Default: host addresses .100 to .199 of the network (the network address plus 100 to plus 199) when the network is large enough (a /24 or larger), else every host address.",
            &format!("^\\s*{OCTET}(\\.{OCTET}){{3}}\\s*-\\s*{OCTET}(\\.{OCTET}){{3}}\\s*$"),
        ),
    )
    .build();

    let token = {
        let mut t = dflt(
            Obj::new(
                "Where the Proxmox API token is read from: exactly one of `env` or `file`. Never the token itself (a plain string is refused). The token is `user@realm!tokenid=secret`.",
            )
            .opt("env", text("The name of an environment variable holding the token."))
            .opt("file", text("The path of a file holding the token: relative to the project directory (and inside it), or absolute."))
            .build(),
            json!({"env": "PROXMOX_API_TOKEN"}),
        );
        t["oneOf"] = json!([
            {"required": ["env"], "properties": {"env": {"type": ["string", "number"]}, "file": {"type": "null"}}},
            {"required": ["file"], "properties": {"file": {"type": ["string", "number"]}, "env": {"type": "null"}}},
        ]);
        t
    };
    let tls = Obj::new("How the Proxmox API's TLS certificate is checked.")
        .opt("ca_file", text("A PEM file with the CA that signed the Proxmox certificate. Default: none."))
        .opt(
            "fingerprint",
            pattern(
                "The SHA-256 fingerprint of the Proxmox certificate: 64 hex digits, optionally separated by `:`. Default: none.",
                "^:*([0-9A-Fa-f]:*){64}$",
            ),
        )
        .opt("insecure", boolean("Skip certificate verification (test labs only).", false))
        .build();
    let snapshots = Obj::new("Container snapshots around changes: before a step changes a container's system, NixMox snapshots it through the Proxmox API; a failed health gate rolls back to the snapshot. Off with `infra.backend: none`.")
        .opt(
            "mode",
            enumeration(
                "`required`: a snapshot that cannot be taken (a storage without snapshots, a lock that stays) fails the step; `best-effort`: it is a warning and the step goes on; `off`: no snapshots, a failed gate rolls back the NixOS generation.",
                &["required", "best-effort", "off"],
                Some("best-effort"),
            ),
        )
        .opt("keep", dflt(int("The newest NixMox snapshots kept per container after a successful run; older ones NixMox made are deleted, others never touched.", 1, 100), json!(3)))
        .build();
    let proxmox = Obj::new("The Proxmox VE node the containers run on.")
        .opt("endpoint", reference("The Proxmox VE API URL, like `https://pve.nixmox.lan:8006`. Default: none.", "url"))
        .opt("node", dflt(pattern("The Proxmox node containers are created on when the project lists no `nodes` and the API is not asked (a manifest's `host.node` overrides it): one DNS label.", NODE), json!("pve")))
        .opt("nodes", {
            let entry = Obj::new("A node NixMox may place containers on.")
                .req("name", pattern("The node's name: one DNS label.", NODE))
                .opt("storage", pattern("The storage of this node's root volumes. Default: `proxmox.storage`.", "^[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]$"))
                .opt("template", pattern("The LXC template this node creates containers from. Default: `proxmox.template`.", "^[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]:[A-Za-z0-9._+/][A-Za-z0-9._+/-]*$"))
                .opt("memory", int("Memory NixMox may place on the node, in MiB. Default: not limited (the node counts as `weight` × 65536 MiB when ranking nodes).", 16, 1 << 40))
                .opt("cores", int("The node's cores: no container placed there gets more. Default: not limited (`weight` × 16 when ranking).", 1, 8192))
                .opt("weight", int("The node's relative size when `memory` is not given. Default: 1.", 1, 1000))
                .build();
            json!({
                "description": "The nodes NixMox may place containers on: each a node name or a mapping with its storage, template and size. Default: the online nodes the Proxmox API reports (`up`, `rebalance`), else `node` alone.",
                "type": "array",
                "minItems": 1,
                "items": {"anyOf": [pattern("A node name.", NODE), entry]},
            })
        })
        .opt("storage", dflt(pattern("The storage the containers' root disks are created on: a Proxmox storage id.", "^[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]$"), json!("local-lvm")))
        .opt("template", dflt(pattern("The NixOS LXC template containers are created from: a volume id `storage:path`.", "^[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]:[A-Za-z0-9._+/][A-Za-z0-9._+/-]*$"), json!(DEFAULT_TEMPLATE)))
        .opt("token", token)
        .opt("tls", tls)
        .opt("snapshots", snapshots)
        .build();

    let infra = Obj::new("How containers are created.")
        .opt(
            "backend",
            enumeration(
                "`terraform`: through generated Terraform; `proxmox-api`: through the Proxmox API directly; `none`: the hosts exist already and are only configured.",
                &["terraform", "proxmox-api", "none"],
                Some("terraform"),
            ),
        )
        .build();

    let ssh = Obj::new("How NixMox logs in to the hosts.")
        .opt("user", dflt(pattern("The user NixMox connects as: a POSIX login name (lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters).", "^[a-z_][a-z0-9_-]{0,31}$"), json!("root")))
        .opt(
            "authorized_keys",
            dflt(
                list(
                    "SSH public keys installed for that user on every host: whole lines like `ssh-ed25519 AAAA... you@laptop`.",
                    json!({"type": "string", "pattern": SSH_KEY}),
                ),
                json!([]),
            ),
        )
        .opt(
            "host_key_checking",
            dflt(
                json!({"description": "OpenSSH `StrictHostKeyChecking` for the hosts, whose keys are kept in `.nixmox/known_hosts`: `accept-new` trusts a key on first contact and refuses a changed one, `yes` only known hosts, `no` never checks.", "type": "string", "enum": ["accept-new", "yes", "no"]}),
                json!("accept-new"),
            ),
        )
        .build();

    let deployer_command = Obj::new("Your own deployer: an argv template run once per host.")
        .req(
            "command",
            json!({
                "description": "The deploy command as an argv list (a single string is one word) with the placeholders `{host}`, `{ip}`, `{flake}` and `{user}`. Must not be empty. Required.",
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}},
                ],
            }),
        )
        .opt(
            "rollback",
            dflt(list("The command that rolls a host back, with the same placeholders.", json!({"type": ["string", "number"]})), json!([])),
        )
        .build();
    let nix = Obj::new("How NixOS configurations are built and deployed.")
        .opt("nixpkgs", dflt(text("The nixpkgs flake reference the hosts are built from (the older spelling of `inputs.nixpkgs`)."), json!(DEFAULT_NIXPKGS)))
        .opt(
            "inputs",
            Obj::new("Overrides of the flake's input URLs: a fork, a local checkout (`path:./nixpkgs`, relative to the project), `git+file:`. The revisions are pinned in `flake.lock`.")
                .opt("nixpkgs", dflt(text("nixpkgs."), json!(DEFAULT_NIXPKGS)))
                .opt("sops-nix", dflt(text("sops-nix."), json!(DEFAULT_SOPS_NIX)))
                .opt("authentik-nix", dflt(text("authentik-nix (only when the project has an identity provider)."), json!(DEFAULT_AUTHENTIK_NIX)))
                .build(),
        )
        .opt(
            "deployer",
            dflt(
                json!({
                    "description": "How configurations are deployed to the hosts: `nixos-rebuild`, `colmena`, or your own command.",
                    "anyOf": [
                        {"type": "string", "enum": ["nixos-rebuild", "colmena"]},
                        deployer_command,
                    ],
                }),
                json!("nixos-rebuild"),
            ),
        )
        .build();

    let terraform = Obj::new(
        "The Terraform installation used by the `terraform` backend and `interface.terraform`.",
    )
    .opt(
        "binary",
        dflt(
            text("The Terraform-compatible binary to run, like `terraform` or `tofu`."),
            json!("terraform"),
        ),
    )
    .opt(
        "backend",
        Obj::new("Where every workspace keeps its Terraform state. Default: the `local` backend, with each workspace's state under `.nixmox/terraform/<workspace>/`.")
            .req("type", json!({"description": "The backend's name, like `local`, `s3`, `http` or `pg`. Required.", "type": "string", "pattern": "^[a-z0-9_]+$"}))
            .opt("config", json!({"description": "The backend's settings, rendered into every workspace. `{workspace}` inside a string is replaced by the workspace's name (`infra`, `auth-core`, `<service>-infra`, `<service>-config`) so each keeps its own state.", "type": ["object", "null"], "patternProperties": {"^.+$": true}, "additionalProperties": false}))
            .build(),
    )
    .build();

    let defaults = Obj::new("Defaults for every service.")
        .opt(
            "resources",
            reference(
                "Container resources of services that leave them out of `host.resources`.",
                "resources",
            ),
        )
        .opt(
            "health",
            timing_fields(
                Obj::new(
                    "Health-check timing of services that leave it out of `interface.health`.",
                ),
                TimingDefaults::Builtin,
            )
            .build(),
        )
        .build();

    let state = Obj::new("Where NixMox records what it has deployed.")
        .opt("backend", constant("The state store.", "sqlite"))
        .opt(
            "path",
            dflt(
                text("The state database: relative to the project directory (and inside it), or absolute."),
                json!(".nixmox/state.db"),
            ),
        )
        .build();

    let secrets = Obj::new("How secrets are encrypted in the project.")
        .opt("backend", constant("The secrets tool.", "sops"))
        .opt(
            "age_recipients",
            dflt(
                list(
                    "age public keys secrets are encrypted to (see `age-keygen -y`).",
                    json!({"type": ["string", "number"], "pattern": "^age1.{58}$"}),
                ),
                json!([]),
            ),
        )
        .build();

    let deploy = Obj::new("How deployments run.")
        .opt(
            "parallel",
            dflt(
                int("How many hosts are deployed at the same time.", 1, 1024),
                json!(4),
            ),
        )
        .build();

    let mut root = Obj::new("")
        .req("project", pattern("The project's name: lowercase letters, digits and `-`, starting with a letter, at most 63 characters. Required.", NAME))
        .req("domain", reference("The DNS domain of the hosts: a service's FQDN is `hostname.domain`. Required.", "domain"))
        .req("network", network)
        .opt("pools", pools)
        .opt("proxmox", proxmox)
        .opt("infra", infra)
        .opt("ssh", ssh)
        .opt("nix", nix)
        .opt("terraform", terraform)
        .opt("defaults", defaults)
        .opt("state", state)
        .opt("secrets", secrets)
        .opt("deploy", deploy)
        .build();
    let defs = json!({
        "ipv4": ipv4(),
        "domain": domain(),
        "url": url(),
        "duration": duration(),
        "resources": resources(),
    });
    document(
        PROJECT_FILE,
        "NixMox project (nixmox.yaml)",
        "The project file of a NixMox project: the network, the Proxmox node and project-wide settings. See docs/manifest.md.",
        &mut root,
        defs,
    )
}

/// The schema of `services/<name>/manifest.yaml`.
// One declarative table of every field of a manifest, like `project_inner`: kept whole.
fn manifest_inner() -> Value {
    let mut provides = Obj::new(
        "The capabilities this service provides to the others (only on the core services). Each is written `{ type: <implementation> }`, as the implementation's name, or with no value.",
    );
    for cap in Capability::ALL {
        let names: Vec<&str> = crate::providers::implementations(cap)
            .map(|p| p.implementation())
            .collect();
        // One implementation is a `const`; several an `enum`, the default first.
        let (imp, name) = match names.split_first() {
            Some((one, [])) => (format!("`{one}`"), json!({"type": "string", "const": one})),
            Some((first, rest)) => (
                format!(
                    "`{first}` (the default) or {}",
                    rest.iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                json!({"type": "string", "enum": names}),
            ),
            None => continue,
        };
        let mut typed = json!({"description": format!("The implementation: {imp}.")});
        for (k, v) in name.as_object().into_iter().flatten() {
            typed[k] = v.clone();
        }
        let object = Obj::new("").req("type", typed).build();
        provides = provides.set(
            cap.key(),
            json!({
                "description": format!("Provides `{}`, implemented by {imp}.", cap.key()),
                "anyOf": [
                    name,
                    without_description(object),
                    {"type": "null"},
                ],
            }),
        );
    }

    let features = Obj::new("Container features.")
        .opt(
            "nesting",
            boolean(
                "Allow nested containers and namespaces (systemd in NixOS needs it).",
                true,
            ),
        )
        .build();
    let host = Obj::new("The container the service runs in.")
        .opt("hostname", pattern("The host's name, one DNS label; its FQDN is `hostname.domain`. Default: the service's `name`.", LABEL))
        .opt(
            "ip",
            reference(
                "The host's IPv4 address: inside `network.cidr`, not the gateway, network or broadcast address. Default: the lowest free address of `pools.ip`, recorded in `nixmox.lock`.",
                "ipv4",
            ),
        )
        .opt(
            "vmid",
            json!({
                "description": "The Proxmox guest id, inside `pools.vmid` (an integer; not a string). Default: the lowest free id of `pools.vmid`, recorded in `nixmox.lock`.",
                "type": "integer",
                "minimum": VmId::MIN,
                "maximum": VmId::MAX,
            }),
        )
        .opt("node", pattern("Pins the container to this Proxmox node: one DNS label, one of `proxmox.nodes` when the project lists them. Default: placed by NixMox (the node with the most free memory and cores, honouring `spread`), recorded in `nixmox.lock`.", NODE))
        .opt("spread", pattern("Anti-affinity group: the services of one group are placed on different nodes while there are nodes. One DNS label.", NODE))
        .opt(
            "resources",
            reference("Container resources; each field left out takes its value from `defaults.resources` in nixmox.yaml.", "resources"),
        )
        .opt("onboot", boolean("Start the container when the Proxmox node boots.", true))
        .opt("start", boolean("Start the container after creating it.", true))
        .opt("unprivileged", boolean("Run the container unprivileged.", true))
        .opt("features", features)
        .opt(
            "ssh_host_key",
            pattern(
                "The host's SSH ed25519 public key (`/etc/ssh/ssh_host_ed25519_key.pub`), when known in advance. Default: none.",
                "^ssh-ed25519 \\s*\\S{21}",
            ),
        )
        .opt(
            "backup",
            Obj::new("Backups of the container with vzdump: `nixmox backup SERVICE`, and before `down` destroys it (unless `--no-backup`). Default: none.")
                .req("storage", pattern("A Proxmox storage with `backup` content, like `local`.", "^[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]$"))
                .opt("mode", enumeration("vzdump's mode: `snapshot` (no downtime; needs a storage that can snapshot, else PVE falls back to suspend), `suspend` or `stop`.", &["snapshot", "suspend", "stop"], Some("snapshot")))
                .opt("schedule", json!({"description": "A Proxmox calendar event (`daily`, `sun 02:30`, `*-*-* 03:00`): with `infra.backend: proxmox-api`, a PVE backup job for this container that NixMox keeps in step with the manifest. Default: none (no job).", "type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9 :,./*~-]+$"}))
                .opt("keep", int("The backup job's retention: keep the newest N backups. Default: PVE's (keep all).", 1, 1000))
                .build(),
        )
        .build();

    let nixos = Obj::new("The NixOS configuration of the host.")
        .opt(
            "modules",
            dflt(
                list(
                    "NixOS modules (files, or directories with default.nix), relative to the manifest's directory, inside the project; they must exist. Only listed files are copied into the build.",
                    json!({"type": ["string", "number"]}),
                ),
                json!([]),
            ),
        )
        .build();

    let sops_access = |what: &str| {
        Obj::new(&format!("How sops-nix installs {what} on the service's host (`sops.secrets.<name>.owner`, `group`, `mode`): give the user or group the reading service runs as. Without it the file is root's, mode 0400."))
            .opt("owner", pattern("The user owning the file. Default: root.", UNIX_NAME))
            .opt("group", pattern("The file's group. Default: the owner's primary group (root without an owner).", UNIX_NAME))
            .opt("mode", pattern("The file's mode, quoted octal; nothing for others. Default: \"0440\" when `group` is given, else \"0400\".", "^0?[0-7][0-7]0$"))
            .build()
    };
    let oidc = Obj::new("An OpenID Connect client for this service in the identity provider.")
        .opt("client_id", non_empty("The OIDC client id. Default: the service's `name`."))
        .opt("client_type", enumeration("`confidential` (has a client secret) or `public`.", &["confidential", "public"], Some("confidential")))
        .opt(
            "redirect_uris",
            dflt(
                list(
                    "Allowed redirect URIs: http(s) URLs. A URI that is not https, or on a domain no service proxies, is a warning.",
                    json!({"type": "string", "pattern": URL}),
                ),
                json!([]),
            ),
        )
        .opt("scopes", dflt(list("Scopes the client may request.", json!({"type": ["string", "number"]})), json!(["openid", "email", "profile"])))
        .opt("username_claim", dflt(text("The claim holding the user name."), json!("preferred_username")))
        .opt("groups_claim", dflt(text("The claim holding the user's groups."), json!("groups")))
        .opt("sops", sops_access("the client secret file (`config.nixmox.oidc.clientSecretFile`) of a confidential client"))
        .build();
    let auth = Obj::new("Sign-in through the identity provider. Implies a dependency on the service that provides `identity`.")
        .opt("provider", constant("The identity provider.", "authentik"))
        .opt("name", non_empty("The application's display name in the identity provider. Default: the service's `name`."))
        .opt("oidc", oidc)
        .build();

    let mut health = Obj::new(
        "Health checks. Each of `startup`, `liveness` and `readiness` is one check or a list; timing fields left out take their value from `defaults.health` in nixmox.yaml.",
    );
    for (key, what) in [
        ("startup", "Checks that pass once the service has started."),
        ("liveness", "Checks that pass while the service is alive."),
        (
            "readiness",
            "Checks that pass when the service is ready for traffic.",
        ),
    ] {
        health = health.opt(key, dflt(one_or_many(what, "check"), json!([])));
    }
    let health = timing_fields(health, TimingDefaults::Project).build();

    let interface = Obj::new("What the service needs from the core services and how its health is checked (the canonical form).")
        .opt(
            "db",
            one_or_many(
                "Databases on the service that provides `database`: one object or a list. Implies a dependency on that service.",
                "db",
            ),
        )
        .opt(
            "proxy",
            one_or_many(
                "Routes on the service that provides `reverse_proxy`: one object or a list. Implies a dependency on that service.",
                "proxy",
            ),
        )
        .opt("auth", auth)
        .opt("health", health)
        .opt("terraform", one_or_many("Terraform modules applied for this service: one object or a list.", "terraform"))
        .build();

    let req_database = Obj::new("A database, like `interface.db` with `mode: native-migration` and no migrations.")
        .opt("type", constant("The database engine.", "postgresql"))
        .opt("name", sql_name("The database's name (`interface.db.database`). Default: the service's `name` with `-` replaced by `_`."))
        .opt("user", sql_name("The role owning it (`interface.db.role`). Default: the database's name."))
        .opt(
            "host",
            text("The database provider's FQDN (`hostname.domain`) or hostname; it must match the service that provides `database`. Default: that service."),
        )
        .build();
    let req_proxy = Obj::new("A route, like `interface.proxy` with `path: /`, `tls: true` and no headers.")
        .opt("type", constant("The reverse proxy.", "caddy"))
        .req("domain", reference("The domain the route answers on (`interface.proxy.domain`). Required.", "domain"))
        .req("backend", reference("Where requests go (`interface.proxy.upstream`): a port on this service's host, or `host:port`. Required.", "upstream"))
        .opt("auth", boolean("Forward-auth through the identity provider (`interface.proxy.authz`).", false))
        .build();
    let req_oidc = Obj::new(
        "An OIDC client, like `interface.auth` with `client_type: confidential` and the default scopes and claims. Cannot be combined with `interface.auth`.",
    )
    .opt("type", constant("The identity provider (`interface.auth.provider`).", "authentik"))
    .opt("provider_name", non_empty("The application's display name (`interface.auth.name`). Default: the service's `name`."))
    .opt("client_id", non_empty("The OIDC client id (`interface.auth.oidc.client_id`). Default: the service's `name`."))
    .opt(
        "redirect_uri",
        dflt(
            list("Allowed redirect URIs (`interface.auth.oidc.redirect_uris`): http(s) URLs.", json!({"type": "string", "pattern": URL})),
            json!([]),
        ),
    )
    .build();
    let requirements = Obj::new(
        "The vision document's form of `interface`: read as the equivalent `interface.db`, `interface.proxy` and `interface.auth` entries (added to any given there).",
    )
    .opt("database", req_database)
    .opt("reverse_proxy", req_proxy)
    .opt("oidc", req_oidc)
    .build();

    let db = Obj::new("A PostgreSQL database and role for this service, created on the service that provides `database`.")
        .opt("type", constant("The database engine.", "postgresql"))
        .opt("database", sql_name("The database's name. Default: the service's `name` with `-` replaced by `_`."))
        .opt("role", sql_name("The role owning the database. Default: the database's name. A role belongs to one service: another service may use it only when both name each other in `share_role_with`."))
        .opt(
            "share_role_with",
            dflt(
                list("Services allowed to use this entry's `role` too. Sharing needs both sides: each service using the role names every other one here.", json!({"type": "string", "pattern": NAME})),
                json!([]),
            ),
        )
        .opt(
            "mode",
            enumeration(
                "How the schema is set up: `native-migration` (NixMox applies `migrations` in order) or `terraform`.",
                &["native-migration", "terraform"],
                Some("native-migration"),
            ),
        )
        .opt(
            "migrations",
            dflt(
                list("SQL files applied in order, relative to the manifest's directory, inside the project; they must exist.", json!({"type": ["string", "number"]})),
                json!([]),
            ),
        )
        .opt("sops", sops_access("the role's password file (`config.nixmox.db.<database>.passwordFile`)"))
        .build();
    let proxy = Obj::new(
        "A route on the reverse proxy. The pair (`domain`, `path`) must be unique in the project (a trailing `/` does not count).",
    )
    .req("domain", reference("The domain the route answers on. Required.", "domain"))
    .opt("path", dflt(pattern("The route's path prefix: an absolute URL path of letters, digits and `-._~!$&'()*+,;=:@%/` (no braces: Caddy would read them as placeholders).", "^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$"), json!("/")))
    .req("upstream", reference("Where requests go: a port on this service's host, or `host:port`. Required.", "upstream"))
    .opt("tls", boolean("Serve the route over https.", true))
    .opt("authz", boolean("Forward-auth through the identity provider before requests reach the service.", false))
    .opt(
        "headers",
        dflt(
            json!({
                "description": "Response headers to set, like `{ X-Frame-Options: SAMEORIGIN }`. Names use letters, digits, `-` and `_`; values are one line without `{`, `}` (Caddy placeholders) or backticks.",
                "type": "object",
                "patternProperties": {"^[A-Za-z0-9_-]+$": {"type": ["string", "number"], "pattern": "^[^\\u0000-\\u001f\\u007f{}`]*$"}},
                "additionalProperties": false,
            }),
            json!({}),
        ),
    )
    .build();
    let terraform = Obj::new("Terraform modules NixMox applies for this service.")
        .opt(
            "phase",
            enumeration(
                "When the modules are applied: `service-infra` (before the service's NixOS configuration is deployed) or `service-config` (after it).",
                &["service-infra", "service-config"],
                Some("service-infra"),
            ),
        )
        .opt(
            "modules",
            dflt(list("Module directories, relative to the manifest's directory; they must exist.", json!({"type": ["string", "number"]})), json!([])),
        )
        .opt(
            "variables",
            dflt(
                json!({
                    "description": "Input variables passed to the modules as they are written (any JSON value). Names start with a letter or `_` and use letters, digits, `_` and `-`; Terraform's module meta-arguments (`source`, `version`, `count`, `for_each`, `providers`, `provider`, `depends_on`, `lifecycle`) are not variables. Integers must lie within ±2^53.",
                    "type": "object",
                    "patternProperties": {"^(?!(source|version|count|for_each|providers|provider|depends_on|lifecycle)$)[A-Za-z_][A-Za-z0-9_-]*$": true},
                    "additionalProperties": false,
                }),
                json!({}),
            ),
        )
        .opt("targets", dflt(list("Resource addresses passed as `-target`.", json!({"type": "string", "pattern": TF_ADDRESS})), json!([])))
        .opt("apply_order", dflt(list("Resource addresses applied one by one (`-target`), in this order, before the full apply.", json!({"type": "string", "pattern": TF_ADDRESS})), json!([])))
        .opt("protect", dflt(list("Resources of these modules that a plan may not delete or replace unless `nixmox up --allow-destroy`: addresses as written in the module (`null_resource.keep`, `module.inner.null_resource.keep`, `null_resource.keep[0]`) or resource types (`null_resource`).", json!({"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_-]*(\\.[^.]+)*$"})), json!([])))
        .build();

    let mut root = Obj::new("")
        .req(
            "name",
            pattern(
                "The service's name, unique in the project and used as its default hostname: lowercase letters, digits and `-`, starting with a letter, at most 63 characters. Required.",
                NAME,
            ),
        )
        .opt("description", text("What the service is, in a few words. Default: none."))
        .opt(
            "depends_on",
            dflt(
                {
                    let mut v = list(
                        "Services this one starts after, by `name` (explicit ordering; the interface adds implicit edges). Cycles are errors. Docker Compose's long form, a mapping whose keys are the services, is accepted too.",
                        json!({"type": "string", "pattern": NAME}),
                    );
                    if let Some(any) = v.get_mut("anyOf").and_then(Value::as_array_mut) {
                        any.push(json!({"type": "object", "patternProperties": {NAME: true}, "additionalProperties": false}));
                    }
                    v
                },
                json!([]),
            ),
        )
        .opt("provides", provides.build())
        .opt("host", host)
        .opt("nixos", nixos)
        .opt("interface", interface)
        .opt("requirements", requirements)
        .build();
    let defs = json!({
        "ipv4": ipv4(),
        "domain": domain(),
        "url": url(),
        "duration": duration(),
        "resources": resources(),
        "upstream": {
            "description": "A port on this service's host (1-65535), or `host:port` (an optional `http://` prefix is dropped).",
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": format!("^(http://)?({HOST}:)?{PORT}$")},
            ],
        },
        "db": db,
        "proxy": proxy,
        "terraform": terraform,
        "check": check(),
    });
    document(
        MANIFEST_FILE,
        "NixMox service manifest (services/<name>/manifest.yaml)",
        "One service of a NixMox project: its host, NixOS modules and interface. See docs/manifest.md.",
        &mut root,
        defs,
    )
}

/// Both schemas with the file names they are written to (`nixmox schema --out DIR`).
pub fn files() -> Vec<(&'static str, Value)> {
    vec![(PROJECT_FILE, project()), (MANIFEST_FILE, manifest())]
}

/// Pretty JSON with a trailing newline, as the files are checked in.
pub fn to_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("a JSON value always serialises");
    s.push('\n');
    s
}

/// Wraps a root object into a schema document.
fn document(file: &str, title: &str, description: &str, root: &mut Value, defs: Value) -> Value {
    let mut doc = Map::new();
    doc.insert("$schema".into(), json!(DRAFT));
    doc.insert("$id".into(), json!(format!("{BASE}{file}")));
    doc.insert("title".into(), json!(title));
    doc.insert("description".into(), json!(description));
    if let Value::Object(m) = root {
        for (k, v) in std::mem::take(m) {
            if k != "description" {
                doc.insert(k, v);
            }
        }
    }
    doc.insert("$defs".into(), defs);
    Value::Object(doc)
}

/// An object schema: its properties, which are required, `x-` extensions allowed, nothing else.
struct Obj {
    description: String,
    properties: Map<String, Value>,
    required: Vec<&'static str>,
}

impl Obj {
    fn new(description: &str) -> Self {
        Obj {
            description: description.to_string(),
            properties: Map::new(),
            required: Vec::new(),
        }
    }
    /// An optional field; `null` means absent, so it is accepted too.
    fn opt(mut self, name: &'static str, schema: Value) -> Self {
        self.properties.insert(name.into(), nullable(schema));
        self
    }
    /// A required field.
    fn req(mut self, name: &'static str, schema: Value) -> Self {
        self.properties.insert(name.into(), schema);
        self.required.push(name);
        self
    }
    /// An optional field whose schema says itself whether `null` is accepted.
    fn set(mut self, name: &'static str, schema: Value) -> Self {
        self.properties.insert(name.into(), schema);
        self
    }
    fn build(self) -> Value {
        let mut m = Map::new();
        if !self.description.is_empty() {
            m.insert("description".into(), json!(self.description));
        }
        m.insert("type".into(), json!("object"));
        m.insert("properties".into(), Value::Object(self.properties));
        if !self.required.is_empty() {
            m.insert("required".into(), json!(self.required));
        }
        m.insert("patternProperties".into(), json!({"^x-": {}}));
        m.insert("additionalProperties".into(), json!(false));
        Value::Object(m)
    }
}

/// Makes a schema accept `null` as well (an explicit `null` counts as absent).
fn nullable(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    let has_combinator = ["anyOf", "oneOf", "allOf", "not", "$ref"]
        .iter()
        .any(|k| m.contains_key(*k));
    if m.contains_key("type") && !has_combinator {
        match m.get_mut("type") {
            Some(Value::String(t)) => {
                let t = std::mem::take(t);
                m.insert("type".into(), json!([t, "null"]));
            }
            Some(Value::Array(ts)) if !ts.contains(&json!("null")) => ts.push(json!("null")),
            _ => {}
        }
        if let Some(Value::Array(e)) = m.get_mut("enum") {
            e.push(Value::Null);
        }
        if let Some(c) = m.remove("const") {
            m.insert("enum".into(), json!([c, null]));
        }
        return Value::Object(m);
    }
    if !m.contains_key("type")
        && m.keys()
            .all(|k| k != "oneOf" && k != "allOf" && k != "not" && k != "$ref")
    {
        if let Some(Value::Array(alts)) = m.get_mut("anyOf") {
            if !alts.contains(&json!({"type": "null"})) {
                alts.push(json!({"type": "null"}));
            }
            return Value::Object(m);
        }
    }
    // Wrap: the annotations stay outside, the schema itself becomes one alternative.
    let mut outer = Map::new();
    for k in ["description", "default"] {
        if let Some(x) = m.remove(k) {
            outer.insert(k.into(), x);
        }
    }
    outer.insert("anyOf".into(), json!([Value::Object(m), {"type": "null"}]));
    Value::Object(outer)
}

/// Adds a default: as the `default` keyword and at the end of the description.
fn dflt(v: Value, default: Value) -> Value {
    let Value::Object(m) = v else { return v };
    let shown = show(&default);
    let mut out = Map::new();
    for (k, x) in m {
        if k == "description" {
            let d = x.as_str().unwrap_or_default();
            out.insert(
                k,
                json!(format!("{d} Default: `{shown}`.").trim_start().to_string()),
            );
            out.insert("default".into(), default.clone());
        } else {
            out.insert(k, x);
        }
    }
    if !out.contains_key("default") {
        out.insert("description".into(), json!(format!("Default: `{shown}`.")));
        out.insert("default".into(), default);
    }
    Value::Object(out)
}

fn without_description(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    m.remove("description");
    Value::Object(m)
}

/// Free text; a plain number is accepted as its text.
fn text(description: &str) -> Value {
    json!({"description": description, "type": ["string", "number"]})
}

/// Text that must not be empty or blank.
fn non_empty(description: &str) -> Value {
    json!({"description": description, "type": ["string", "number"], "pattern": NON_BLANK})
}

fn pattern(description: &str, pattern: &str) -> Value {
    json!({"description": description, "type": "string", "pattern": pattern})
}

fn sql_name(description: &str) -> Value {
    json!({
        "description": with_rule(description, "Lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 63 characters."),
        "type": "string",
        "pattern": SQL_NAME,
    })
}

fn boolean(description: &str, default: bool) -> Value {
    dflt(
        json!({"description": description, "type": "boolean"}),
        json!(default),
    )
}

fn enumeration(description: &str, values: &[&str], default: Option<&str>) -> Value {
    let v = json!({"description": description, "type": "string", "enum": values});
    match default {
        Some(d) => dflt(v, json!(d)),
        None => v,
    }
}

/// A field with one possible value, which is also its default.
fn constant(description: &str, value: &str) -> Value {
    dflt(
        json!({"description": description, "type": "string", "const": value}),
        json!(value),
    )
}

/// An integer in `min..=max`; an integer written as a string is accepted too.
fn int(description: &str, min: i64, max: i64) -> Value {
    json!({
        "description": with_rule(description, &format!("An integer from {min} to {max}.")),
        "anyOf": [
            {"type": "integer", "minimum": min, "maximum": max},
            {"type": "string", "pattern": INT_STRING},
        ],
    })
}

/// Adds a sentence on what is accepted, before the description's `Default:` sentence if any.
fn with_rule(description: &str, rule: &str) -> String {
    match description.split_once(" Default:") {
        Some((what, default)) => format!("{what} {rule} Default:{default}"),
        None => format!("{description} {rule}"),
    }
}

fn reference(description: &str, def: &str) -> Value {
    json!({"description": description, "$ref": format!("#/$defs/{def}")})
}

/// One string or a list of them (the decoder reads a single string as a list of one).
fn list(description: &str, item: Value) -> Value {
    let mut single = item.clone();
    single["type"] = json!("string");
    json!({"description": description, "anyOf": [single, {"type": "array", "items": item}]})
}

/// One object of `$defs/<def>` or a list of them.
fn one_or_many(description: &str, def: &str) -> Value {
    let r = format!("#/$defs/{def}");
    json!({"description": description, "anyOf": [{"$ref": r}, {"type": "array", "items": {"$ref": r}}]})
}

fn ipv4() -> Value {
    json!({
        "description": "A dotted IPv4 address, like `192.168.99.20`.",
        "type": "string",
        "pattern": format!("^{OCTET}(\\.{OCTET}){{3}}$"),
    })
}

fn domain() -> Value {
    json!({
        "description": "A fully qualified domain name (RFC 1123): dot-separated labels of lowercase letters, digits and `-`, no trailing dot, the last label not all digits.",
        "type": "string",
        "maxLength": 253,
        "pattern": DOMAIN,
    })
}

fn url() -> Value {
    json!({
        "description": "An http(s) URL with a valid host name or IPv4 address, an optional port and path; no whitespace or credentials.",
        "type": "string",
        "pattern": URL,
    })
}

fn duration() -> Value {
    json!({
        "description": "Whole seconds (`30`) or a number with a unit, parts added up: `500ms`, `10s`, `5m`, `1h`, `2d`, `1m30s`.",
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": DURATION},
        ],
    })
}

fn resources() -> Value {
    let r = DEFAULT_RESOURCES;
    Obj::new("Container resources.")
        .opt(
            "cores",
            dflt(int("CPU cores.", CORES.0, CORES.1), json!(r.cores)),
        )
        .opt(
            "memory",
            dflt(
                int("Memory in MiB.", MEMORY_MIB.0, MEMORY_MIB.1),
                json!(r.memory),
            ),
        )
        .opt(
            "swap",
            dflt(int("Swap in MiB.", SWAP_MIB.0, SWAP_MIB.1), json!(r.swap)),
        )
        .opt(
            "disk_gb",
            dflt(
                int("Root disk size in GB.", DISK_GB.0, DISK_GB.1),
                json!(r.disk_gb),
            ),
        )
        .build()
}

/// Where unset health timing fields come from.
#[derive(Clone, Copy)]
enum TimingDefaults {
    /// The built-in defaults (`defaults.health` in nixmox.yaml).
    Builtin,
    /// The project's `defaults.health` (a manifest's `interface.health`).
    Project,
}

/// Adds the health timing fields (`interval`, `timeout`, `retries`, `start_period`) to `obj`.
fn timing_fields(mut obj: Obj, defaults: TimingDefaults) -> Obj {
    let h = DEFAULT_HEALTH;
    let positive_duration = |what: &str| {
        json!({
            "description": format!("{what} Whole seconds or a duration string like `10s`; longer than zero."),
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": DURATION, "not": {"pattern": ZERO_DURATION}},
            ],
        })
    };
    let fields = [
        ("interval", positive_duration("Time between checks."), json!(format_duration_ms(h.interval_ms))),
        ("timeout", positive_duration("How long one check may take."), json!(format_duration_ms(h.timeout_ms))),
        ("retries", int("Consecutive failures before a check counts as failed.", 0, 1000), json!(h.retries)),
        (
            "start_period",
            reference("Time after start during which failures do not count. Whole seconds or a duration string like `10s`.", "duration"),
            json!(format_duration_ms(h.start_period_ms)),
        ),
    ];
    for (key, mut schema, default) in fields {
        let schema = match defaults {
            TimingDefaults::Builtin => dflt(schema, default),
            TimingDefaults::Project => {
                let d = schema["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                schema["description"] = json!(format!(
                    "{d} Default: `defaults.health.{key}` from nixmox.yaml (built in: `{}`).",
                    show(&default)
                ));
                schema
            }
        };
        obj = obj.opt(key, schema);
    }
    obj
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One health check: a string (an http(s) URL, else a command) or an object of one kind.
fn check() -> Value {
    let object = Obj::new("A check of one kind: `{command}`, `{http, status, body}`, `{tcp}` or `{dns, expect}`.")
        .set(
            "command",
            json!({
                "description": "A command run on the service's host; exit status 0 is healthy. A string is split into words like a shell would (quotes and backslashes), but never run through a shell; a list is the argv. Must not be empty.",
                "anyOf": [
                    {"type": ["string", "number"], "pattern": NON_BLANK},
                    {"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}},
                ],
            }),
        )
        .set("http", json!({"description": "An http(s) URL that must answer; `status` and `body` narrow what counts as healthy.", "type": "string", "pattern": URL}))
        .opt("status", int("The HTTP status the answer must have (with `http`). Default: not checked.", 100, 599))
        .opt("body", text("Text the response body must contain (with `http`). Default: not checked."))
        .set(
            "tcp",
            json!({
                "description": "`host:port` that must accept a TCP connection; host is a host name, FQDN or IPv4 address.",
                "type": "string",
                "pattern": format!("^{HOST}:{PORT}$"),
            }),
        )
        .set(
            "dns",
            json!({"description": "A host name or FQDN that must resolve.", "type": "string", "pattern": format!("^{HOST}$")}),
        )
        .opt("expect", reference("The IPv4 address the name must resolve to (with `dns`). Default: not checked.", "ipv4"))
        .build();
    let mut object = object;
    let kinds: [(&str, &[&str]); 4] = [
        ("command", &["command"]),
        ("http", &["http", "status", "body"]),
        ("tcp", &["tcp"]),
        ("dns", &["dns", "expect"]),
    ];
    object["oneOf"] = Value::Array(
        kinds
            .iter()
            .map(|(kind, allowed)| {
                let forbidden: Map<String, Value> = CHECK_FIELDS
                    .iter()
                    .filter(|f| !allowed.contains(f))
                    .map(|f| ((*f).to_string(), json!(false)))
                    .collect();
                json!({"title": format!("{kind} check"), "required": [kind], "properties": forbidden})
            })
            .collect(),
    );
    json!({
        "description": "A health check: a string starting with `http://` or `https://` is an `http` check, any other string a `command`; or an object of one kind.",
        "anyOf": [
            {"type": "string", "pattern": NON_BLANK},
            object,
        ],
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{
        DEFAULTS_FIELDS, DEPLOYER_FIELDS, DEPLOY_FIELDS, HEALTH_TIMING_FIELDS, INFRA_FIELDS,
        NETWORK_FIELDS, NIX_FIELDS, POOLS_FIELDS, PROXMOX_FIELDS, RESOURCES_FIELDS, SECRETS_FIELDS,
        SSH_FIELDS, STATE_FIELDS, TERRAFORM_FIELDS, TLS_FIELDS, TOKEN_FIELDS, TOP_FIELDS,
    };
    use crate::manifest::{
        AUTH_FIELDS, DB_FIELDS, FEATURES_FIELDS, HEALTH_FIELDS, HOST_FIELDS, INTERFACE_FIELDS,
        MANIFEST_FIELDS, NIXOS_FIELDS, OIDC_FIELDS, PROVIDES_FIELDS, PROVIDE_FIELDS, PROXY_FIELDS,
        REQUIREMENTS_FIELDS, REQ_DATABASE_FIELDS, REQ_OIDC_FIELDS, REQ_PROXY_FIELDS,
        TERRAFORM_USE_FIELDS,
    };

    /// The object schema at `path` (property names, `$defs/<name>`, or `anyOf`/`oneOf` to pick
    /// the alternative that is an object).
    fn at<'v>(root: &'v Value, path: &str) -> &'v Value {
        let mut v = root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            v = if part.starts_with('$') {
                &v[part]
            } else if let Some(def) = part.strip_prefix('#') {
                &root["$defs"][def]
            } else {
                &v["properties"][part]
            };
            assert!(!v.is_null(), "no `{part}` in `{path}`");
            v = object_of(v);
        }
        v
    }

    /// The object alternative of a schema (itself when it has properties).
    fn object_of(v: &Value) -> &Value {
        if v.get("properties").is_some() || v.get("$ref").is_some() {
            return v;
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(Value::Array(alts)) = v.get(key) {
                if let Some(o) = alts.iter().find(|a| a.get("properties").is_some()) {
                    return o;
                }
            }
        }
        v
    }

    fn keys(v: &Value) -> BTreeSet<&str> {
        v["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no properties in {v}"))
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn set<'a>(fields: &[&'a str]) -> BTreeSet<&'a str> {
        fields.iter().copied().collect()
    }

    #[test]
    fn project_fields_match_the_decoder() {
        let p = project();
        let cases: &[(&str, &[&str])] = &[
            ("", TOP_FIELDS),
            ("network", NETWORK_FIELDS),
            ("pools", POOLS_FIELDS),
            ("proxmox", PROXMOX_FIELDS),
            ("proxmox/token", TOKEN_FIELDS),
            ("proxmox/tls", TLS_FIELDS),
            ("proxmox/snapshots", crate::config::SNAPSHOTS_FIELDS),
            ("infra", INFRA_FIELDS),
            ("ssh", SSH_FIELDS),
            ("nix", NIX_FIELDS),
            ("nix/deployer", DEPLOYER_FIELDS),
            ("nix/inputs", crate::config::NIX_INPUTS),
            ("terraform", TERRAFORM_FIELDS),
            ("terraform/backend", crate::config::TF_BACKEND_FIELDS),
            ("defaults", DEFAULTS_FIELDS),
            ("#resources", RESOURCES_FIELDS),
            ("defaults/health", HEALTH_TIMING_FIELDS),
            ("state", STATE_FIELDS),
            ("secrets", SECRETS_FIELDS),
            ("deploy", DEPLOY_FIELDS),
        ];
        for (path, fields) in cases {
            assert_eq!(keys(at(&p, path)), set(fields), "nixmox.yaml `{path}`");
        }
        assert_eq!(p["required"], json!(["project", "domain", "network"]));
        assert_eq!(at(&p, "network")["required"], json!(["cidr", "gateway"]));
    }

    #[test]
    fn manifest_fields_match_the_decoder() {
        let m = manifest();
        let cases: &[(&str, &[&str])] = &[
            ("", MANIFEST_FIELDS),
            ("provides", PROVIDES_FIELDS),
            ("provides/dns", PROVIDE_FIELDS),
            ("provides/database", PROVIDE_FIELDS),
            ("provides/reverse_proxy", PROVIDE_FIELDS),
            ("provides/identity", PROVIDE_FIELDS),
            ("host", HOST_FIELDS),
            ("host/backup", crate::manifest::HOST_BACKUP_FIELDS),
            ("host/features", FEATURES_FIELDS),
            ("#resources", RESOURCES_FIELDS),
            ("nixos", NIXOS_FIELDS),
            ("interface", INTERFACE_FIELDS),
            ("#db", DB_FIELDS),
            ("#proxy", PROXY_FIELDS),
            ("interface/auth", AUTH_FIELDS),
            ("interface/auth/oidc", OIDC_FIELDS),
            ("interface/health", HEALTH_FIELDS),
            ("#check", CHECK_FIELDS),
            ("#terraform", TERRAFORM_USE_FIELDS),
            ("requirements", REQUIREMENTS_FIELDS),
            ("requirements/database", REQ_DATABASE_FIELDS),
            ("requirements/reverse_proxy", REQ_PROXY_FIELDS),
            ("requirements/oidc", REQ_OIDC_FIELDS),
        ];
        for (path, fields) in cases {
            assert_eq!(keys(at(&m, path)), set(fields), "manifest `{path}`");
        }
        assert_eq!(m["required"], json!(["name"]));
        assert_eq!(at(&m, "#proxy")["required"], json!(["domain", "upstream"]));
        assert_eq!(
            at(&m, "requirements/reverse_proxy")["required"],
            json!(["domain", "backend"])
        );
        // Every capability the model knows is a key of `provides`.
        for cap in Capability::ALL {
            assert!(PROVIDES_FIELDS.contains(&cap.key()));
        }
    }

    /// Walks every schema in a document.
    fn walk<'v>(v: &'v Value, path: String, f: &mut dyn FnMut(&str, &'v Value)) {
        f(&path, v);
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    walk(x, format!("{path}/{k}"), f);
                }
            }
            Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    walk(x, format!("{path}/{i}"), f);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn objects_are_closed_and_properties_described() {
        for (file, doc) in files() {
            walk(&doc, String::new(), &mut |path, v| {
                let Value::Object(m) = v else { return };
                let is_object = match m.get("type") {
                    Some(Value::String(t)) => t == "object",
                    Some(Value::Array(ts)) => ts.contains(&json!("object")),
                    _ => false,
                };
                if is_object {
                    assert_eq!(
                        m.get("additionalProperties"),
                        Some(&json!(false)),
                        "{file}{path}: not closed"
                    );
                    if m.contains_key("properties") {
                        assert_eq!(
                            m["patternProperties"]["^x-"],
                            json!({}),
                            "{file}{path}: x- keys not allowed"
                        );
                        for (name, prop) in m["properties"].as_object().into_iter().flatten() {
                            assert!(
                                prop.get("description")
                                    .and_then(Value::as_str)
                                    .is_some_and(|d| !d.is_empty()),
                                "{file}{path}/properties/{name}: no description"
                            );
                        }
                    }
                }
                if let Some(Value::String(r)) = m.get("$ref") {
                    let def = r
                        .strip_prefix("#/$defs/")
                        .unwrap_or_else(|| panic!("{file}{path}: ref {r}"));
                    assert!(
                        doc["$defs"].get(def).is_some(),
                        "{file}{path}: dangling ref {r}"
                    );
                }
            });
        }
    }

    #[test]
    fn optional_fields_accept_null_and_required_ones_do_not() {
        let p = project();
        let n = &p["properties"]["network"];
        assert_eq!(
            n["properties"]["vlan"]["anyOf"]
                .as_array()
                .and_then(|a| a.last()),
            Some(&json!({"type": "null"}))
        );
        assert_eq!(
            n["properties"]["bridge"]["type"],
            json!(["string", "number", "null"])
        );
        assert_eq!(p["properties"]["pools"]["type"], json!(["object", "null"]));
        assert_eq!(p["properties"]["network"]["type"], json!("object"));
        assert_eq!(
            p["properties"]["infra"]["properties"]["backend"]["enum"],
            json!(["terraform", "proxmox-api", "none", null])
        );
        let m = manifest();
        assert_eq!(m["properties"]["name"]["type"], json!("string"));
        assert_eq!(
            m["properties"]["host"]["properties"]["ip"]["anyOf"][1],
            json!({"type": "null"})
        );
    }

    #[test]
    fn defaults_come_from_the_decoder() {
        let p = project();
        let r = &p["$defs"]["resources"]["properties"];
        assert_eq!(r["cores"]["default"], json!(DEFAULT_RESOURCES.cores));
        assert_eq!(r["memory"]["default"], json!(DEFAULT_RESOURCES.memory));
        assert_eq!(r["cores"]["anyOf"][0]["maximum"], json!(CORES.1));
        assert_eq!(
            p["properties"]["pools"]["properties"]["vmid"]["default"],
            json!("900-999")
        );
        assert_eq!(
            p["properties"]["defaults"]["properties"]["health"]["properties"]["interval"]
                ["default"],
            json!("10s")
        );
        assert_eq!(
            p["properties"]["nix"]["properties"]["nixpkgs"]["default"],
            json!(DEFAULT_NIXPKGS)
        );
    }

    #[test]
    fn checked_in_files_are_current() {
        let checked_in = [
            (
                PROJECT_FILE,
                include_str!("../../../schema/nixmox.schema.json"),
            ),
            (
                MANIFEST_FILE,
                include_str!("../../../schema/manifest.schema.json"),
            ),
        ];
        for ((file, value), (name, text)) in files().into_iter().zip(checked_in) {
            assert_eq!(file, name);
            assert!(
                to_text(&value) == text,
                "schema/{file} is out of date: run `cargo run -p nixmox -- schema --out schema`"
            );
        }
    }
}
