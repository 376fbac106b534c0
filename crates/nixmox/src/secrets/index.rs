//! What NixMox remembers of the secrets files, in the state database: hashes only, never a
//! value in clear.
//!
//! - `secret_files`: per host, the SHA-256 of the encrypted file as NixMox last wrote or read
//!   it, and the recipients it was encrypted to. A file whose bytes still match was not
//!   touched since, so nothing needs decrypting to know what it holds.
//! - `secret_values`: per host and name, the SHA-256 of the value (see [`value_hash`]) and
//!   where the value came from (`generated`, `terraform:<step>`, `user`, or `file` when it was
//!   found in a file NixMox did not write).
//! - `secret_generated`: per generated name (`db/<role>`), the hash of the current value, so a
//!   host whose copy differs (after a rotation) is brought up to date.
//! - `host_keys`: SSH ed25519 host keys read from the hosts after they booted.
//!
//! These tables live in the state database but outside its numbered migrations: they are
//! created here with `CREATE TABLE IF NOT EXISTS`, through a connection of their own (the
//! engine's `Store` keeps its connection private).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS secret_files (
    host        TEXT PRIMARY KEY,
    file_sha256 TEXT NOT NULL,
    recipients  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS secret_values (
    host       TEXT NOT NULL,
    name       TEXT NOT NULL,
    value_hash TEXT NOT NULL,
    source     TEXT NOT NULL,
    PRIMARY KEY (host, name)
);
CREATE TABLE IF NOT EXISTS secret_generated (
    name       TEXT PRIMARY KEY,
    value_hash TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS host_keys (
    host        TEXT PRIMARY KEY,
    ssh_key     TEXT NOT NULL,
    recorded_at INTEGER NOT NULL
);
"#;

#[derive(Debug, thiserror::Error)]
#[error("state store `{}`: cannot {action}: {source}", path.display())]
pub struct IndexError {
    pub path: PathBuf,
    pub action: &'static str,
    #[source]
    pub source: rusqlite::Error,
}

/// The SHA-256 (hex) of a value under its name. Only ever compared, never reversed; a value
/// that is easy to guess (a short human password) could be guessed from it by someone holding
/// the state database, which is why generated values are long random strings.
pub fn value_hash(name: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"nixmox-secret-v1\0");
    h.update(name.as_bytes());
    h.update([0]);
    h.update(value.as_bytes());
    hex(&h.finalize())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What is recorded of one host's file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRecord {
    pub file_sha256: String,
    /// Sorted.
    pub recipients: Vec<String>,
    /// name → (value hash, source)
    pub values: BTreeMap<String, (String, String)>,
}

pub struct Index {
    conn: Connection,
    path: PathBuf,
}

impl Index {
    /// Opens the tables in the state database at `path`. Callers open the engine's `Store`
    /// first, which creates the database (mode 0600) and migrates it.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let err = |action| {
            let path = path.to_path_buf();
            move |source| IndexError {
                path,
                action,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err("open it"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(err("set its busy timeout"))?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(err("use WAL"))?;
        conn.execute_batch(SCHEMA)
            .map_err(err("create the secrets tables"))?;
        Ok(Index {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> IndexError + '_ {
        move |source| IndexError {
            path: self.path.clone(),
            action,
            source,
        }
    }

    pub fn file(&self, host: &str) -> Result<Option<FileRecord>, IndexError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT file_sha256, recipients FROM secret_files WHERE host = ?1",
                params![host],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err("read the secrets index"))?;
        let Some((file_sha256, recipients)) = row else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare("SELECT name, value_hash, source FROM secret_values WHERE host = ?1")
            .map_err(self.err("read the secrets index"))?;
        let rows = stmt
            .query_map(params![host], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(self.err("read the secrets index"))?;
        let mut values = BTreeMap::new();
        for row in rows {
            let (name, hash, source) = row.map_err(self.err("read the secrets index"))?;
            values.insert(name, (hash, source));
        }
        Ok(Some(FileRecord {
            file_sha256,
            recipients: recipients
                .split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect(),
            values,
        }))
    }

    /// Replaces what is recorded of a host's file, in one transaction.
    pub fn set_file(&mut self, host: &str, rec: &FileRecord) -> Result<(), IndexError> {
        let path = self.path.clone();
        let err = |action: &'static str| {
            let path = path.clone();
            move |source| IndexError {
                path,
                action,
                source,
            }
        };
        let tx = self
            .conn
            .transaction()
            .map_err(err("record a secrets file"))?;
        tx.execute(
            "INSERT INTO secret_files (host, file_sha256, recipients, updated_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (host) DO UPDATE SET file_sha256 = ?2, recipients = ?3, updated_at = ?4",
            params![host, rec.file_sha256, rec.recipients.join(","), now()],
        )
        .map_err(err("record a secrets file"))?;
        tx.execute("DELETE FROM secret_values WHERE host = ?1", params![host])
            .map_err(err("record a secrets file"))?;
        for (name, (hash, source)) in &rec.values {
            tx.execute(
                "INSERT INTO secret_values (host, name, value_hash, source) VALUES (?1, ?2, ?3, ?4)",
                params![host, name, hash, source],
            )
            .map_err(err("record a secrets file"))?;
        }
        tx.commit().map_err(err("record a secrets file"))
    }

    pub fn forget_file(&mut self, host: &str) -> Result<(), IndexError> {
        self.conn
            .execute("DELETE FROM secret_files WHERE host = ?1", params![host])
            .map_err(self.err("forget a secrets file"))?;
        self.conn
            .execute("DELETE FROM secret_values WHERE host = ?1", params![host])
            .map_err(self.err("forget a secrets file"))?;
        Ok(())
    }

    pub fn generated(&self, name: &str) -> Result<Option<String>, IndexError> {
        self.conn
            .query_row(
                "SELECT value_hash FROM secret_generated WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("read the secrets index"))
    }

    pub fn set_generated(&mut self, name: &str, hash: &str) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT INTO secret_generated (name, value_hash, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET value_hash = ?2, updated_at = ?3",
                params![name, hash, now()],
            )
            .map(|_| ())
            .map_err(self.err("record a generated secret"))
    }

    pub fn host_key(&self, host: &str) -> Result<Option<String>, IndexError> {
        self.conn
            .query_row(
                "SELECT ssh_key FROM host_keys WHERE host = ?1",
                params![host],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("read the recorded host keys"))
    }

    pub fn set_host_key(&mut self, host: &str, key: &str) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT INTO host_keys (host, ssh_key, recorded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (host) DO UPDATE SET ssh_key = ?2, recorded_at = ?3",
                params![host, key, now()],
            )
            .map(|_| ())
            .map_err(self.err("record a host key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut ix = Index::open(&path).unwrap();
        assert_eq!(ix.file("pg").unwrap(), None);
        let rec = FileRecord {
            file_sha256: "abc".into(),
            recipients: vec!["age1a".into(), "age1b".into()],
            values: BTreeMap::from([(
                "db/app".to_string(),
                (value_hash("db/app", "x"), "generated".to_string()),
            )]),
        };
        ix.set_file("pg", &rec).unwrap();
        assert_eq!(ix.file("pg").unwrap(), Some(rec));
        ix.set_generated("db/app", "h1").unwrap();
        ix.set_generated("db/app", "h2").unwrap();
        assert_eq!(ix.generated("db/app").unwrap().as_deref(), Some("h2"));
        ix.set_host_key("pg", "ssh-ed25519 AAAA").unwrap();
        assert_eq!(
            ix.host_key("pg").unwrap().as_deref(),
            Some("ssh-ed25519 AAAA")
        );
        ix.forget_file("pg").unwrap();
        assert_eq!(ix.file("pg").unwrap(), None);
        // Reopening keeps everything and does not fail on the existing tables.
        drop(ix);
        let ix = Index::open(&path).unwrap();
        assert_eq!(ix.generated("db/app").unwrap().as_deref(), Some("h2"));
        assert_ne!(value_hash("a", "b"), value_hash("a", "c"));
        assert_ne!(value_hash("a", "b"), value_hash("b", "b"));
    }
}
