//! `database: { type: postgresql }`: the PostgreSQL server, its databases, roles, `pg_hba`
//! lines and the setup unit (ownership, role passwords, migrations) derived from every
//! consumer's `interface.db`; the consumers' login probe (psql); `DROP` statements for
//! `down --purge-data`; `pg_dump` for `nixmox backup`; the roles and databases of
//! `mode: terraform` consumers (the `postgresql` Terraform provider in their
//! `tf:service-infra`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map};

use super::{
    db_secret, secret_path, Dump, HostConfig, Login, Ports, Probe, Provider, Purge, TfBlocks,
    TfWorkspace,
};
use crate::model::{Capability, DbMode, Project, Service};
use crate::nixexpr::{set, Nix, Part};
use crate::render::nixos::{release, Release};
use crate::render::terraform::{db_password_variable, lit, tf_name};
use crate::render::{base_name, safe_name};

pub const POSTGRES_PORT: u16 = 5432;
/// The Terraform provider of `mode: terraform` databases, pinned to the releases the renderer
/// was checked for (docs/generated-options.md, "Pinned providers").
pub const POSTGRESQL_PROVIDER: (&str, &str) = ("cyrilgdn/postgresql", "~> 1.22.0");
pub const SETUP_UNIT: &str = "nixmox-postgresql-setup";

/// The PostgreSQL implementation of `database`.
pub struct Postgresql;

impl Provider for Postgresql {
    fn capability(&self) -> Capability {
        Capability::Database
    }
    fn implementation(&self) -> &'static str {
        "postgresql"
    }
    fn ports(&self) -> Ports {
        Ports {
            tcp: &[POSTGRES_PORT],
            udp: &[],
        }
    }
    fn service_port(&self) -> Option<u16> {
        Some(POSTGRES_PORT)
    }
    fn host_config(&self, p: &Project, me: usize, host: &mut HostConfig) {
        let ensure = ensure(p, &mut host.secrets);
        let c = &mut host.options;
        server(c, &ensure, pg_hba(p, me));
        set(
            c,
            &["systemd", "services", SETUP_UNIT],
            setup_unit(p, ensure.setup),
        );
    }
    fn secret_names(&self, p: &Project) -> Vec<String> {
        p.services
            .iter()
            .flat_map(|s| &s.dbs)
            .filter(|db| db.mode != DbMode::Terraform)
            .map(|db| db_secret(&db.role))
            .collect()
    }
    fn probes(&self, p: &Project, s: &Service) -> Vec<Probe> {
        let Some(pg) = p.provider(Capability::Database) else {
            return Vec::new();
        };
        s.dbs
            .iter()
            .map(|db| {
                Probe::Login(Login {
                    server: pg.host.ip,
                    port: POSTGRES_PORT,
                    database: db.database.clone(),
                    role: db.role.clone(),
                    secret: db_secret(&db.role),
                    client: "psql",
                    script: DB_SCRIPT,
                    no_client: NO_PSQL,
                })
            })
            .collect()
    }
    fn purge(&self, database: &str, role: Option<&str>) -> Option<Purge> {
        let statements = drop_statements(database, role);
        let mut argv: Vec<String> = ["sudo", "-u", "postgres", "psql", "-v", "ON_ERROR_STOP=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for st in &statements {
            argv.push("-c".into());
            argv.push(st.clone());
        }
        Some(Purge {
            statements,
            argv,
            run_as: "postgres",
        })
    }
    fn dump(&self, database: &str, dir: &str) -> Option<Dump> {
        Some(dump_commands(dir, database))
    }
    fn terraform(&self, p: &Project, ws: TfWorkspace<'_>) -> Option<TfBlocks> {
        match ws {
            TfWorkspace::ServiceInfra(s) => terraform_databases(p, s),
            TfWorkspace::AuthCore => None,
        }
    }
    fn protected_types(&self) -> &'static [&'static str] {
        &["postgresql_database", "postgresql_role"]
    }
    fn check(&self, p: &Project, me: usize) -> Vec<String> {
        crate::render::verify::pg_hba(&pg_hba(p, me))
            .into_iter()
            .map(|e| format!("pg_hba: {e}"))
            .collect()
    }
}

/// The commands that dump `database` into `dir`: the directory made (mode 0700, owned by
/// postgres), then `pg_dump --format=custom` as postgres.
fn dump_commands(dir: &str, database: &str) -> Dump {
    let file = format!("{dir}/{database}.dump");
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    Dump {
        commands: vec![
            words(&[
                "sudo", "install", "-d", "-m", "0700", "-o", "postgres", "-g", "postgres", dir,
            ]),
            words(&[
                "sudo",
                "-u",
                "postgres",
                "pg_dump",
                "--format=custom",
                &format!("--file={file}"),
                "--",
                database,
            ]),
        ],
        file,
        kind: "pg_dump",
        how: "pg_dump --format=custom",
    }
}

/// A consumer's `mode: terraform` databases, made by its own `tf:service-infra` through the
/// `postgresql` provider: each role with its password from a workspace variable
/// (`db_password_variable`), and its database owned by it. The provider's credentials come
/// from `PGUSER` / `PGPASSWORD` in the environment.
fn terraform_databases(p: &Project, s: &Service) -> Option<TfBlocks> {
    let dbs: Vec<_> = s
        .dbs
        .iter()
        .filter(|d| d.mode == DbMode::Terraform)
        .collect();
    if dbs.is_empty() {
        return None;
    }
    let host = p
        .provider(Capability::Database)
        .map(|pg| p.fqdn(pg))
        .unwrap_or_default();
    let mut variable = Map::new();
    let mut roles = Map::new();
    let mut databases = Map::new();
    for d in dbs {
        let role = tf_name(&d.role);
        let var = db_password_variable(&d.role);
        variable.insert(
            var.clone(),
            json!({"type": "string", "sensitive": true, "description": format!("password of role {} (from the secrets file)", d.role)}),
        );
        roles.insert(
            role.clone(),
            json!({"name": lit(&d.role), "login": true, "password": format!("${{var.{var}}}")}),
        );
        databases.insert(
            tf_name(&d.database),
            json!({"name": lit(&d.database), "owner": format!("${{postgresql_role.{role}.name}}")}),
        );
    }
    Some(TfBlocks {
        required: vec![("postgresql", POSTGRESQL_PROVIDER)],
        provider: Map::from_iter([(
            "postgresql".to_string(),
            json!({"host": host, "port": POSTGRES_PORT, "sslmode": "disable"}),
        )]),
        variable,
        resource: Map::from_iter([
            ("postgresql_role".to_string(), roles.into()),
            ("postgresql_database".to_string(), databases.into()),
        ]),
        ..TfBlocks::default()
    })
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

/// What the server ensures for every consumer's `mode: nixos` database: the databases, the
/// roles (and whether each owns its namesake database), and the setup unit's script.
struct Ensure {
    databases: BTreeSet<String>,
    users: BTreeMap<String, bool>,
    setup: Vec<Part>,
}

/// Collects [`Ensure`] from every consumer, declaring each role's password secret for the
/// server (readable by `postgres`, restarting the setup unit when it changes).
fn ensure(p: &Project, secrets: &mut BTreeMap<String, Nix>) -> Ensure {
    let mut out = Ensure {
        databases: BTreeSet::new(),
        users: BTreeMap::new(),
        setup: vec![Part::Lit(SETUP_PRELUDE.to_string())],
    };
    for db in p.services.iter().flat_map(|s| &s.dbs) {
        if db.mode == DbMode::Terraform {
            // Created by the service's own Terraform (the postgresql provider).
            continue;
        }
        out.databases.insert(db.database.clone());
        let owns = db.role == db.database;
        *out.users.entry(db.role.clone()).or_insert(false) |= owns;
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
            out.setup.push(Part::Lit(format!(
                "nixmox_owner '{}' '{}'\n",
                db.database, db.role
            )));
        }
        out.setup
            .push(Part::Lit(format!("nixmox_password '{}' \"", db.role)));
        out.setup.push(Part::Expr(secret_path(&secret)));
        out.setup.push(Part::Lit("\"\n".into()));
        for m in &db.migrations {
            let name = safe_name(base_name(m));
            out.setup.push(Part::Lit(format!(
                "nixmox_migrate '{}' '{}' \"",
                db.database, name
            )));
            out.setup.push(Part::Expr(Nix::Expr(format!(
                "../migrations/{}/{}",
                db.database, name
            ))));
            out.setup.push(Part::Lit(format!("\" '{}'\n", db.role)));
        }
    }
    out
}

/// `services.postgresql`: listening on TCP, SCRAM passwords, the ensured databases and roles,
/// and the `pg_hba` lines.
fn server(c: &mut BTreeMap<String, Nix>, ensure: &Ensure, hba: String) {
    let pg = |k: &[&'static str]| -> Vec<&'static str> {
        let mut path = vec!["services", "postgresql"];
        path.extend_from_slice(k);
        path
    };
    set(c, &pg(&["enable"]), Nix::Bool(true));
    set(c, &pg(&["enableTCPIP"]), Nix::Bool(true));
    set(
        c,
        &pg(&["settings", "port"]),
        Nix::Int(i64::from(POSTGRES_PORT)),
    );
    set(
        c,
        &pg(&["settings", "password_encryption"]),
        Nix::str("scram-sha-256"),
    );
    set(
        c,
        &pg(&["ensureDatabases"]),
        Nix::strs(ensure.databases.iter().cloned()),
    );
    let users = ensure
        .users
        .iter()
        .map(|(name, owns)| {
            let mut u = BTreeMap::from([("name".to_string(), Nix::str(name))]);
            if *owns {
                u.insert("ensureDBOwnership".into(), Nix::Bool(true));
            }
            set(&mut u, &["ensureClauses", "login"], Nix::Bool(true));
            Nix::Attrs(u)
        })
        .collect();
    set(c, &pg(&["ensureUsers"]), Nix::List(users));
    set(c, &pg(&["authentication"]), Nix::Str(hba));
}

/// The setup unit: a oneshot after the units that ensure the roles, running `setup` as
/// `postgres`.
fn setup_unit(p: &Project, setup: Vec<Part>) -> Nix {
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
    Nix::Attrs(unit)
}

/// The statements that drop a database and, unless a remaining service shares it
/// (`share_role_with`), its role. Names are validated SQL identifiers, quoted all the same.
pub fn drop_statements(database: &str, role: Option<&str>) -> Vec<String> {
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let mut out = vec![format!("DROP DATABASE IF EXISTS {}", quote(database))];
    if let Some(role) = role {
        out.push(format!("DROP ROLE IF EXISTS {}", quote(role)));
    }
    out
}

/// What `bash -c` runs on a service's host for the db check: reads the role's password from
/// its sops secret ($1), then `SELECT 1` with psql as the role ($4) in its database ($5) on
/// the server ($2:$3), waiting at most $6 seconds to connect. Exit 3: no password file.
/// Without psql on the host, only the port's reachability (bash's /dev/tcp): 0 with a marker
/// line, 5 when it is closed.
pub const DB_SCRIPT: &str = r#"pw=$(cat -- "$1") || exit 3
if ! command -v psql >/dev/null 2>&1; then
  if timeout "$6" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$2" "$3" 2>/dev/null; then
    echo NIXMOX-NO-PSQL; exit 0
  fi
  echo "psql is not installed and $2:$3 does not accept connections" >&2; exit 5
fi
PGPASSWORD=$pw PGCONNECT_TIMEOUT=$6 PGPASSFILE=/dev/null exec psql -X -w -q -v ON_ERROR_STOP=1 -h "$2" -p "$3" -U "$4" -d "$5" -tAc 'SELECT 1'"#;
const NO_PSQL: &str = "NIXMOX-NO-PSQL";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_statements_quote_the_names() {
        assert_eq!(
            drop_statements("wiki", Some("wi\"ki")),
            [
                "DROP DATABASE IF EXISTS \"wiki\"".to_string(),
                "DROP ROLE IF EXISTS \"wi\"\"ki\"".to_string()
            ]
        );
        // A role a remaining service shares is not dropped.
        assert_eq!(
            drop_statements("wiki", None),
            ["DROP DATABASE IF EXISTS \"wiki\"".to_string()]
        );
        let purge = Postgresql.purge("wiki", None).expect("a database has data");
        assert_eq!(
            purge.argv,
            [
                "sudo",
                "-u",
                "postgres",
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "DROP DATABASE IF EXISTS \"wiki\""
            ]
        );
    }

    #[test]
    fn a_dump_is_made_by_postgres_in_its_own_directory() {
        let dump = Postgresql
            .dump("wiki_db", "/var/lib/nixmox/dumps/wiki/v")
            .expect("a database has data");
        assert_eq!(dump.file, "/var/lib/nixmox/dumps/wiki/v/wiki_db.dump");
        assert_eq!(dump.kind, "pg_dump");
        assert_eq!(
            dump.commands[0],
            [
                "sudo",
                "install",
                "-d",
                "-m",
                "0700",
                "-o",
                "postgres",
                "-g",
                "postgres",
                "/var/lib/nixmox/dumps/wiki/v"
            ]
        );
        assert_eq!(
            dump.commands[1],
            [
                "sudo",
                "-u",
                "postgres",
                "pg_dump",
                "--format=custom",
                "--file=/var/lib/nixmox/dumps/wiki/v/wiki_db.dump",
                "--",
                "wiki_db"
            ]
        );
    }
}
