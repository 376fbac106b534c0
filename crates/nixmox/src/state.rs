//! The state store: an embedded SQLite database (`.nixmox/state.db` by default) holding what
//! the engine did and what it must remember.
//!
//! - `runs`: one row per `up` (who, where, when, arguments, result).
//! - `step_results`: one row per step per run (status, input hash, times, error, log).
//! - `step_records`: the last successful run of every step (input hash, parts, duration); this
//!   is the planner's [`Record`].
//! - `outputs`: the outputs of each recorded step. Sensitive values are never stored in clear:
//!   only their SHA-256 hash, with a NULL value.
//! - `rendered_inputs`: the rendered files of the last successful run of each step (rollback
//!   and `down`).
//! - `lock`: at most one row, the process running a command that changes the world.
//!
//! Every change is one transaction, so a process killed at any instant (kill -9) leaves the
//! store consistent; the next opener marks the dead process's run `interrupted`.
//!
//! Timestamps are RFC 3339 UTC text with milliseconds (`2025-01-31T12:00:00.123Z`): readable in
//! the `sqlite3` shell, and they sort as text. The clock is [`SystemTime::now`].
//!
//! The schema evolves through [`MIGRATIONS`], applied in order, each in its own transaction,
//! with `PRAGMA user_version` counting the scripts applied. Only append to that list.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nixmox_core::record::{Record, StepRecord};
use nixmox_core::step_id::StepId;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

/// Where the store lives in a project, relative to its root.
pub const DEFAULT_PATH: &str = ".nixmox/state.db";

/// How long a writer waits for another one before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub type RunId = i64;

/// The schema, one script per version (script `i` brings `user_version` from `i` to `i + 1`).
/// Only ever append.
pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r#"
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    user        TEXT NOT NULL,
    hostname    TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    args        TEXT NOT NULL,
    result      TEXT NOT NULL
        CHECK (result IN ('running', 'success', 'failed', 'interrupted', 'rolled_back')),
    summary     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_running ON runs (result) WHERE result = 'running';

CREATE TABLE step_results (
    run_id      INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id     TEXT NOT NULL,
    input_hash  TEXT NOT NULL,
    status      TEXT NOT NULL
        CHECK (status IN ('started', 'succeeded', 'unchanged', 'failed', 'skipped', 'cancelled')),
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    duration_ms INTEGER,
    error       TEXT,
    log_path    TEXT,
    PRIMARY KEY (run_id, step_id)
);
CREATE INDEX step_results_by_step ON step_results (step_id, run_id);

CREATE TABLE step_records (
    step_id      TEXT PRIMARY KEY,
    input_hash   TEXT NOT NULL,
    parts        TEXT NOT NULL,
    duration_ms  INTEGER,
    run_id       INTEGER NOT NULL REFERENCES runs (id),
    recorded_at  TEXT NOT NULL,
    has_rendered INTEGER NOT NULL DEFAULT 0 CHECK (has_rendered IN (0, 1))
);

CREATE TABLE outputs (
    step_id    TEXT NOT NULL REFERENCES step_records (step_id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    value      TEXT,
    value_hash TEXT NOT NULL,
    sensitive  INTEGER NOT NULL CHECK (sensitive IN (0, 1)),
    PRIMARY KEY (step_id, name),
    CHECK (sensitive = 0 OR value IS NULL)
);

CREATE TABLE rendered_inputs (
    step_id  TEXT NOT NULL REFERENCES step_records (step_id) ON DELETE CASCADE,
    path     TEXT NOT NULL,
    contents BLOB NOT NULL,
    PRIMARY KEY (step_id, path)
);

CREATE TABLE lock (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    pid        INTEGER NOT NULL,
    hostname   TEXT NOT NULL,
    user       TEXT NOT NULL,
    started_at TEXT NOT NULL,
    run_id     INTEGER,
    command    TEXT NOT NULL
);
"#,
    // 2: steps the destroy guard refused, until they next succeed.
    r#"
CREATE TABLE guard_refusals (
    step_id    TEXT PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs (id),
    changes    TEXT NOT NULL,
    refused_at TEXT NOT NULL
);
"#,
    // 3: container snapshots NixMox took (issue 14), steps held after a rolled-back failure,
    // and backups.
    r#"
CREATE TABLE snapshots (
    vmid           INTEGER NOT NULL,
    node           TEXT NOT NULL,
    name           TEXT NOT NULL,
    service        TEXT NOT NULL,
    run_id         INTEGER,
    step_id        TEXT,
    taken_at       TEXT NOT NULL,
    deleted_at     TEXT,
    rolled_back_at TEXT,
    rolled_back_in INTEGER,
    PRIMARY KEY (vmid, name)
);
CREATE TABLE held_steps (
    step_id    TEXT PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs (id),
    input_hash TEXT NOT NULL,
    reason     TEXT NOT NULL,
    held_at    TEXT NOT NULL
);
CREATE TABLE backups (
    id       INTEGER PRIMARY KEY,
    service  TEXT NOT NULL,
    vmid     INTEGER NOT NULL,
    node     TEXT NOT NULL,
    volid    TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('vzdump', 'pg_dump', 'snapshot')),
    reason   TEXT NOT NULL,
    taken_at TEXT NOT NULL
);
"#,
];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the directory of the state store `{}`: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the state store `{}`: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the state store `{}` has schema version {found}, newer than this nixmox knows \
         ({supported}); upgrade nixmox",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("cannot migrate the state store `{}` to schema version {version}: {source}", path.display())]
    Migrate {
        path: PathBuf,
        version: i64,
        source: rusqlite::Error,
    },
    #[error(
        "the state store `{}` is locked by {holder}; if that process is gone, run `nixmox unlock`",
        path.display()
    )]
    Locked {
        path: PathBuf,
        /// Boxed to keep `StateError` (and the errors that embed it) small.
        holder: Box<LockHolder>,
    },
    #[error("state store `{}`: cannot {action}: {source}", path.display())]
    Sql {
        path: PathBuf,
        /// What was being done, as a verb phrase ("record the end of a step").
        action: &'static str,
        source: rusqlite::Error,
    },
    #[error("the state store `{}` is corrupt: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("the state store `{}` has no run {run}", path.display())]
    NoSuchRun { path: PathBuf, run: RunId },
}

/// The process holding the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    pub hostname: String,
    pub user: String,
    pub started_at: String,
    pub command: String,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} on host {} since {} ({})",
            self.pid, self.hostname, self.started_at, self.command
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    Acquired,
    /// The previous holder's process is gone from this host; its lock was taken over (and its
    /// run, if any, marked interrupted). Worth a warning.
    TakenOver {
        previous: LockHolder,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunResult {
    Success,
    Failed,
    Interrupted,
    RolledBack,
}

impl RunResult {
    /// The value stored in `runs.result` (and shown in [`RunRow::result`]).
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failed => "failed",
            RunResult::Interrupted => "interrupted",
            RunResult::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a step ended (`crate::step_status`). (`started` is the status of a step in flight,
/// written by [`Store::step_started`].)
pub use crate::step_status::StepStatus;

/// The end of one step, written by [`Store::step_finished`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFinish {
    pub step_id: StepId,
    pub input_hash: String,
    pub parts: BTreeMap<String, String>,
    pub status: StepStatus,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// On success, replaces all the step's recorded outputs (an empty list clears them).
    pub outputs: Vec<OutputValue>,
    /// On success, `Some` replaces all the step's recorded rendered files (`Some(empty)`
    /// clears them); `None` keeps what was recorded.
    pub rendered: Option<BTreeMap<String, Vec<u8>>>,
    /// The destroy guard refused the step: what its plan would have deleted or replaced. Kept
    /// until the step next succeeds.
    pub refused: Option<Vec<String>>,
    /// The step failed its health gate and was rolled back: why. Held (not run again with the
    /// same input) until it next succeeds.
    pub held: Option<String>,
    /// Snapshots the step took before it changed its container(s).
    pub snapshots: Vec<SnapshotRow>,
}

/// A container snapshot NixMox took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub service: String,
    pub run: Option<RunId>,
    pub step_id: Option<String>,
    pub taken_at: String,
    /// When the container was rolled back to it, and in which run.
    pub rolled_back: Option<(String, Option<RunId>)>,
}

/// A backup NixMox took or saw finish: a vzdump archive, a logical dump, or a snapshot taken
/// instead of a backup before `down`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRow {
    pub service: String,
    pub vmid: u32,
    pub node: String,
    /// The volume id (`local:backup/vzdump-lxc-…`), a dump's path, or a snapshot's name.
    pub volid: String,
    /// `vzdump`, `pg_dump` or `snapshot`.
    pub kind: String,
    /// Why: `nixmox backup`, `down`, …
    pub reason: String,
    pub taken_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputValue {
    pub name: String,
    pub value: serde_json::Value,
    /// Stored only as the SHA-256 of its JSON text, never in clear.
    pub sensitive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub id: RunId,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub user: String,
    pub hostname: String,
    pub args: Vec<String>,
    /// `running`, `success`, `failed`, `interrupted` or `rolled_back`.
    pub result: String,
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRow {
    pub step_id: StepId,
    pub status: RowStatus,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    pub started_at: String,
    pub log_path: Option<PathBuf>,
}

/// A step's status as `step_results` holds it: in flight (`started`), or how it ended, read
/// back from its stored word ([`StepStatus::from_stored`]: a skipped step reads back as
/// `Unchanged`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStatus {
    Started,
    Ended(StepStatus),
}

impl RowStatus {
    /// The status of a `step_results.status` word; `None` for a word the table's `CHECK`
    /// does not allow.
    fn from_stored(word: &str) -> Option<RowStatus> {
        match word {
            "started" => Some(RowStatus::Started),
            other => StepStatus::from_stored(other).map(RowStatus::Ended),
        }
    }
}

impl fmt::Display for RowStatus {
    /// The stored word.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowStatus::Started => f.write_str("started"),
            RowStatus::Ended(status) => f.write_str(status.stored()),
        }
    }
}

/// An open state store. One connection; `Send`, not `Sync`.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    pid: u32,
    hostname: String,
    user: String,
    /// Whether this `Store` acquired the lock (and so releases it when dropped).
    held: bool,
}

/// Maps a SQLite error to [`StateError::Sql`] naming the store and the action.
fn sql<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(rusqlite::Error) -> StateError + 'a {
    move |source| StateError::Sql {
        path: path.to_path_buf(),
        action,
        source,
    }
}

impl Store {
    /// Opens (creating it and its directory if needed) and migrates the store, then marks the
    /// runs of dead processes interrupted.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        Self::open_with(path, MIGRATIONS)
    }

    fn open_with(path: &Path, migrations: &[&str]) -> Result<Store, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        create_private(path).map_err(|source| StateError::CreateDir {
            path: path.to_path_buf(),
            source,
        })?;
        let open_err = |source| StateError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        migrate(&mut conn, path, migrations)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            pid: std::process::id(),
            hostname: hostname(),
            user: user(),
            held: false,
        };
        store.recover_interrupted()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One run at a time. Fails with [`StateError::Locked`] when another live process holds
    /// the lock; a lock whose pid is gone on this host is taken over ([`LockOutcome::TakenOver`],
    /// its run marked interrupted); a lock from another host is never taken over. A lock held
    /// by this very process (same pid and host) is acquired again.
    pub fn acquire_lock(&mut self, command: &str) -> Result<LockOutcome, StateError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to take the lock"))?;
        let current = read_lock(&tx, path)?;
        let outcome = match current {
            None => LockOutcome::Acquired,
            Some((holder, _)) if holder.pid == self.pid && holder.hostname == self.hostname => {
                LockOutcome::Acquired
            }
            Some((holder, run)) if holder.hostname == self.hostname && !pid_alive(holder.pid) => {
                if let Some(run) = run {
                    mark_interrupted(&tx, path, run, &now())?;
                }
                LockOutcome::TakenOver { previous: holder }
            }
            Some((holder, _)) => {
                return Err(StateError::Locked {
                    path: path.clone(),
                    holder: Box::new(holder),
                })
            }
        };
        tx.execute(
            "INSERT OR REPLACE INTO lock (id, pid, hostname, user, started_at, run_id, command)
             VALUES (1, ?1, ?2, ?3, ?4, NULL, ?5)",
            params![self.pid, self.hostname, self.user, now(), command],
        )
        .map_err(sql(path, "write the lock"))?;
        tx.commit().map_err(sql(path, "commit the lock"))?;
        self.held = true;
        self.recover_interrupted()?;
        Ok(outcome)
    }

    /// Releases the lock if this process holds it; otherwise does nothing.
    pub fn release_lock(&mut self) -> Result<(), StateError> {
        self.conn
            .execute(
                "DELETE FROM lock WHERE id = 1 AND pid = ?1 AND hostname = ?2",
                params![self.pid, self.hostname],
            )
            .map_err(sql(&self.path, "release the lock"))?;
        self.held = false;
        Ok(())
    }

    /// Removes the lock whoever holds it (`nixmox unlock`), returning the holder it removed.
    pub fn force_unlock(&mut self) -> Result<Option<LockHolder>, StateError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to remove the lock"))?;
        let previous = read_lock(&tx, path)?.map(|(h, _)| h);
        tx.execute("DELETE FROM lock", [])
            .map_err(sql(path, "remove the lock"))?;
        tx.commit().map_err(sql(path, "commit the lock removal"))?;
        self.held = false;
        Ok(previous)
    }

    pub fn lock_holder(&self) -> Result<Option<LockHolder>, StateError> {
        Ok(read_lock(&self.conn, &self.path)?.map(|(h, _)| h))
    }

    /// Records the start of a run (result `running`); when this store holds the lock, the lock
    /// names the run.
    pub fn start_run(&mut self, args: &[String]) -> Result<RunId, StateError> {
        let path = &self.path;
        let args = serde_json::to_string(args).unwrap_or_else(|_| "[]".to_string());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to start a run"))?;
        tx.execute(
            "INSERT INTO runs (started_at, user, hostname, pid, args, result)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
            params![now(), self.user, self.hostname, self.pid, args],
        )
        .map_err(sql(path, "record the start of a run"))?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE lock SET run_id = ?1 WHERE id = 1 AND pid = ?2 AND hostname = ?3",
            params![id, self.pid, self.hostname],
        )
        .map_err(sql(path, "name the run in the lock"))?;
        tx.commit()
            .map_err(sql(path, "commit the start of a run"))?;
        Ok(id)
    }

    /// Records the end of a run. Steps of the run still `started` become `cancelled`.
    pub fn finish_run(
        &mut self,
        run: RunId,
        result: RunResult,
        summary: &str,
    ) -> Result<(), StateError> {
        let path = &self.path;
        let at = now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to finish a run"))?;
        let n = tx
            .execute(
                "UPDATE runs SET result = ?2, summary = ?3, finished_at = ?4 WHERE id = ?1",
                params![run, result.as_str(), summary, at],
            )
            .map_err(sql(path, "record the end of a run"))?;
        if n == 0 {
            return Err(StateError::NoSuchRun {
                path: path.clone(),
                run,
            });
        }
        cancel_started(&tx, path, run, &at, "the run ended before the step did")?;
        tx.commit().map_err(sql(path, "commit the end of a run"))?;
        Ok(())
    }

    /// Records that a step started (status `started`).
    pub fn step_started(
        &mut self,
        run: RunId,
        step_id: &StepId,
        input_hash: &str,
        log_path: Option<&Path>,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO step_results (run_id, step_id, input_hash, status, started_at, log_path)
                 VALUES (?1, ?2, ?3, 'started', ?4, ?5)
                 ON CONFLICT (run_id, step_id) DO UPDATE SET
                     input_hash = excluded.input_hash, status = 'started',
                     started_at = excluded.started_at, finished_at = NULL,
                     duration_ms = NULL, error = NULL, log_path = excluded.log_path",
                params![
                    run,
                    step_id.as_str(),
                    input_hash,
                    now(),
                    log_path.map(path_to_sql)
                ],
            )
            .map_err(sql(&self.path, "record the start of a step"))?;
        Ok(())
    }

    /// One transaction: the step's result row (created if the step never started, e.g. a
    /// skipped one); and when the status is `Succeeded` or `Unchanged` also its record (hash,
    /// parts, duration), its outputs (replacing the previous ones) and its rendered inputs
    /// (replacing the previous ones when `fin.rendered` is `Some`).
    pub fn step_finished(&mut self, run: RunId, fin: &StepFinish) -> Result<(), StateError> {
        let path = &self.path;
        let at = now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to finish a step"))?;
        finish_result(&tx, path, run, fin, &at)?;
        for snap in &fin.snapshots {
            insert_snapshot(&tx, path, snap)?;
        }
        finish_hold_and_guard(&tx, path, run, fin, &at)?;
        if fin.status.is_success() {
            finish_record(&tx, path, run, fin, &at)?;
            finish_outputs(&tx, path, fin)?;
            if let Some(rendered) = &fin.rendered {
                finish_rendered(&tx, path, &fin.step_id, rendered)?;
            }
        }
        tx.commit().map_err(sql(path, "commit the end of a step"))?;
        Ok(())
    }

    /// The planner's view: the last successful run of every step.
    pub fn record(&self) -> Result<Record, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare("SELECT step_id, input_hash, parts, duration_ms FROM step_records")
            .map_err(sql(path, "read the step records"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(sql(path, "read the step records"))?;
        let mut record = Record::default();
        for row in rows {
            let (id, hash, parts, duration) = row.map_err(sql(path, "read the step records"))?;
            let parts: BTreeMap<String, String> =
                serde_json::from_str(&parts).map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    detail: format!("the parts of step `{id}` are not a JSON map: {e}"),
                })?;
            record.steps.insert(
                id,
                StepRecord {
                    hash,
                    parts,
                    duration_ms: duration.map(to_u64),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare("SELECT step_id, changes FROM guard_refusals")
            .map_err(sql(path, "read the destroy-guard refusals"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql(path, "read the destroy-guard refusals"))?;
        for row in rows {
            let (id, changes) = row.map_err(sql(path, "read the destroy-guard refusals"))?;
            let changes: Vec<String> =
                serde_json::from_str(&changes).map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    detail: format!("the refusal of step `{id}` is not a JSON list: {e}"),
                })?;
            record.refused.insert(id, changes);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT step_id, run_id, input_hash, reason FROM held_steps")
            .map_err(sql(path, "read the held steps"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    nixmox_core::record::Held {
                        run: r.get(1)?,
                        hash: r.get(2)?,
                        reason: r.get(3)?,
                    },
                ))
            })
            .map_err(sql(path, "read the held steps"))?;
        for row in rows {
            let (id, held) = row.map_err(sql(path, "read the held steps"))?;
            record.held.insert(id, held);
        }
        Ok(record)
    }

    /// Holds a step at `input_hash` (it was rolled back after applying that input): the next
    /// run does not apply the same input again unless forced.
    pub fn hold_step(
        &mut self,
        step_id: &StepId,
        run: RunId,
        input_hash: &str,
        reason: &str,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO held_steps (step_id, run_id, input_hash, reason, held_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (step_id) DO UPDATE SET
                     run_id = excluded.run_id, input_hash = excluded.input_hash,
                     reason = excluded.reason, held_at = excluded.held_at",
                params![step_id.as_str(), run, input_hash, reason, now()],
            )
            .map_err(sql(&self.path, "hold a rolled-back step"))?;
        Ok(())
    }

    /// Records a snapshot taken outside a step (`nixmox snapshot create`, before `down`).
    pub fn record_snapshot(&mut self, snap: &SnapshotRow) -> Result<(), StateError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(&path, "begin a transaction to record a snapshot"))?;
        insert_snapshot(&tx, &path, snap)?;
        tx.commit().map_err(sql(&path, "commit a snapshot"))?;
        Ok(())
    }

    /// The container was rolled back to a snapshot (in run `run`, or by `snapshot rollback`).
    pub fn snapshot_rolled_back(
        &mut self,
        vmid: u32,
        name: &str,
        run: Option<RunId>,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE snapshots SET rolled_back_at = ?3, rolled_back_in = ?4
                 WHERE vmid = ?1 AND name = ?2",
                params![vmid, name, now(), run],
            )
            .map_err(sql(&self.path, "record a snapshot rollback"))?;
        Ok(())
    }

    /// Retention deleted a snapshot (or PVE no longer has it).
    pub fn snapshot_deleted(&mut self, vmid: u32, name: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE snapshots SET deleted_at = ?3 WHERE vmid = ?1 AND name = ?2",
                params![vmid, name, now()],
            )
            .map_err(sql(&self.path, "record a deleted snapshot"))?;
        Ok(())
    }

    /// The snapshots NixMox took that are not known to be deleted, oldest first; of one
    /// container when `vmid` is given.
    pub fn snapshots(&self, vmid: Option<u32>) -> Result<Vec<SnapshotRow>, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT vmid, node, name, service, run_id, step_id, taken_at, rolled_back_at,
                        rolled_back_in
                 FROM snapshots WHERE deleted_at IS NULL AND (?1 IS NULL OR vmid = ?1)
                 ORDER BY taken_at, name",
            )
            .map_err(sql(path, "read the snapshots"))?;
        let rows = stmt
            .query_map([vmid], |r| {
                let at: Option<String> = r.get(7)?;
                let run_in: Option<RunId> = r.get(8)?;
                Ok(SnapshotRow {
                    vmid: r.get(0)?,
                    node: r.get(1)?,
                    name: r.get(2)?,
                    service: r.get(3)?,
                    run: r.get(4)?,
                    step_id: r.get(5)?,
                    taken_at: r.get(6)?,
                    rolled_back: at.map(|a| (a, run_in)),
                })
            })
            .map_err(sql(path, "read the snapshots"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "read the snapshots"))
    }

    /// Records a backup.
    pub fn record_backup(&mut self, b: &BackupRow) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO backups (service, vmid, node, volid, kind, reason, taken_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![b.service, b.vmid, b.node, b.volid, b.kind, b.reason, b.taken_at],
            )
            .map_err(sql(&self.path, "record a backup"))?;
        Ok(())
    }

    /// The backups recorded, oldest first; of one service when given.
    pub fn backups(&self, service: Option<&str>) -> Result<Vec<BackupRow>, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT service, vmid, node, volid, kind, reason, taken_at FROM backups
                 WHERE ?1 IS NULL OR service = ?1 ORDER BY id",
            )
            .map_err(sql(path, "read the backups"))?;
        let rows = stmt
            .query_map([service], |r| {
                Ok(BackupRow {
                    service: r.get(0)?,
                    vmid: r.get(1)?,
                    node: r.get(2)?,
                    volid: r.get(3)?,
                    kind: r.get(4)?,
                    reason: r.get(5)?,
                    taken_at: r.get(6)?,
                })
            })
            .map_err(sql(path, "read the backups"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "read the backups"))
    }

    /// The non-sensitive outputs of every recorded step, by step id then name.
    pub fn outputs(
        &self,
    ) -> Result<BTreeMap<String, BTreeMap<String, serde_json::Value>>, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare("SELECT step_id, name, value FROM outputs WHERE sensitive = 0")
            .map_err(sql(path, "read the outputs"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .map_err(sql(path, "read the outputs"))?;
        let mut out: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        for row in rows {
            let (step, name, value) = row.map_err(sql(path, "read the outputs"))?;
            let corrupt = |detail: String| StateError::Corrupt {
                path: path.clone(),
                detail: format!("output `{name}` of step `{step}`: {detail}"),
            };
            let value = value.ok_or_else(|| corrupt("no value".to_string()))?;
            let value = serde_json::from_str(&value)
                .map_err(|e| corrupt(format!("the value is not JSON: {e}")))?;
            out.entry(step).or_default().insert(name, value);
        }
        Ok(out)
    }

    /// The SHA-256 (lowercase hex, of the value's compact JSON text) of every output of a
    /// step, sensitive ones included, by name.
    pub fn output_hashes(&self, step_id: &str) -> Result<BTreeMap<String, String>, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare("SELECT name, value_hash FROM outputs WHERE step_id = ?1")
            .map_err(sql(path, "read the output hashes"))?;
        let rows = stmt
            .query_map([step_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql(path, "read the output hashes"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql(path, "read the output hashes"))
    }

    /// The rendered files of the step's last successful run, by path; `None` when none were
    /// recorded.
    pub fn rendered_inputs(
        &self,
        step_id: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, StateError> {
        let path = &self.path;
        let has: Option<bool> = self
            .conn
            .query_row(
                "SELECT has_rendered FROM step_records WHERE step_id = ?1",
                [step_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(path, "read the rendered inputs"))?;
        if has != Some(true) {
            return Ok(None);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT path, contents FROM rendered_inputs WHERE step_id = ?1")
            .map_err(sql(path, "read the rendered inputs"))?;
        let rows = stmt
            .query_map([step_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql(path, "read the rendered inputs"))?;
        let files = rows
            .collect::<Result<_, _>>()
            .map_err(sql(path, "read the rendered inputs"))?;
        Ok(Some(files))
    }

    /// The last `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRow>, StateError> {
        let path = &self.path;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, started_at, finished_at, user, hostname, args, result, summary
                 FROM runs ORDER BY id DESC LIMIT ?1",
            )
            .map_err(sql(path, "read the runs"))?;
        let rows = stmt
            .query_map([limit], |r| {
                Ok((
                    RunRow {
                        id: r.get(0)?,
                        started_at: r.get(1)?,
                        finished_at: r.get(2)?,
                        user: r.get(3)?,
                        hostname: r.get(4)?,
                        args: Vec::new(),
                        result: r.get(6)?,
                        summary: r.get(7)?,
                    },
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(sql(path, "read the runs"))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut run, args) = row.map_err(sql(path, "read the runs"))?;
            run.args = serde_json::from_str(&args).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                detail: format!("the arguments of run {} are not a JSON list: {e}", run.id),
            })?;
            out.push(run);
        }
        Ok(out)
    }

    /// The steps of a run, in the order they started. A row whose id is no step id (written
    /// by hand, or by a NixMox with other phases) names nothing NixMox runs and is left out.
    pub fn step_results(&self, run: RunId) -> Result<Vec<StepRow>, StateError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT step_id, status, duration_ms, error, started_at, log_path
                 FROM step_results WHERE run_id = ?1 ORDER BY started_at, rowid",
            )
            .map_err(sql(path, "read the step results"))?;
        let rows = stmt
            .query_map([run], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?.map(to_u64),
                    r.get(3)?,
                    r.get(4)?,
                    path_from_sql(r.get_ref(5)?),
                ))
            })
            .map_err(sql(path, "read the step results"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, word, duration_ms, error, started_at, log_path) =
                row.map_err(sql(path, "read the step results"))?;
            let Ok(step_id) = id.parse::<StepId>() else {
                continue;
            };
            // The table's `CHECK` allows no other word.
            let status = RowStatus::from_stored(&word).ok_or_else(|| StateError::Corrupt {
                path: path.clone(),
                detail: format!(
                    "step `{step_id}` of run {run} has the status `{}`",
                    nixmox_core::diag::visible(&word)
                ),
            })?;
            out.push(StepRow {
                step_id,
                status,
                duration_ms,
                error,
                started_at,
                log_path,
            });
        }
        Ok(out)
    }

    /// The log of the latest run of the step that has one.
    pub fn last_log(&self, step_id: &str) -> Result<Option<(RunId, PathBuf)>, StateError> {
        let path = &self.path;
        let row = self
            .conn
            .query_row(
                "SELECT run_id, log_path FROM step_results
                 WHERE step_id = ?1 AND log_path IS NOT NULL ORDER BY run_id DESC LIMIT 1",
                [step_id],
                |r| Ok((r.get::<_, RunId>(0)?, path_from_sql(r.get_ref(1)?))),
            )
            .optional()
            .map_err(sql(path, "read the last log of a step"))?;
        Ok(row.and_then(|(run, log)| log.map(|l| (run, l))))
    }

    /// Runs left `running` by a process that died (kill -9): marks them `interrupted` and
    /// their `started` steps `cancelled`; returns how many runs. A run is known dead when it
    /// was started on this host by a pid that no longer exists, or on another host and the
    /// lock no longer names it. Called by [`Store::open`] and [`Store::acquire_lock`].
    pub fn recover_interrupted(&mut self) -> Result<usize, StateError> {
        let path = &self.path;
        // A read first, so that opening a healthy store writes nothing.
        let dead = dead_runs(&self.conn, path, &self.hostname)?;
        if dead.is_empty() {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to recover interrupted runs"))?;
        let dead = dead_runs(&tx, path, &self.hostname)?;
        let at = now();
        for &run in &dead {
            mark_interrupted(&tx, path, run, &at)?;
        }
        tx.commit()
            .map_err(sql(path, "commit the recovery of interrupted runs"))?;
        Ok(dead.len())
    }

    /// Forgets a step entirely: its record, outputs and rendered inputs (`down`). Its past
    /// results stay in the history.
    pub fn forget_step(&mut self, step_id: &str) -> Result<(), StateError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin a transaction to forget a step"))?;
        for table in [
            "outputs",
            "rendered_inputs",
            "step_records",
            "guard_refusals",
            "held_steps",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE step_id = ?1"),
                [step_id],
            )
            .map_err(sql(path, "forget a step"))?;
        }
        tx.commit().map_err(sql(path, "commit forgetting a step"))?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.held {
            let _ = self.release_lock();
        }
    }
}

/// [`Store::step_finished`]: the step's row of the run, created if it never started.
fn finish_result(
    tx: &rusqlite::Transaction,
    path: &Path,
    run: RunId,
    fin: &StepFinish,
    at: &str,
) -> Result<(), StateError> {
    let duration = i64::try_from(fin.duration_ms).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO step_results
             (run_id, step_id, input_hash, status, started_at, finished_at, duration_ms, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)
         ON CONFLICT (run_id, step_id) DO UPDATE SET
             input_hash = excluded.input_hash, status = excluded.status,
             finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
             error = excluded.error",
        params![
            run,
            fin.step_id.as_str(),
            fin.input_hash,
            fin.status.stored(),
            at,
            duration,
            fin.error
        ],
    )
    .map_err(sql(path, "record the end of a step"))?;
    Ok(())
}

/// [`Store::step_finished`]: a rolled-back step is held; a success releases the hold and
/// clears the destroy guard's refusal; a refusal is kept until then.
fn finish_hold_and_guard(
    tx: &rusqlite::Transaction,
    path: &Path,
    run: RunId,
    fin: &StepFinish,
    at: &str,
) -> Result<(), StateError> {
    if let Some(reason) = &fin.held {
        tx.execute(
            "INSERT INTO held_steps (step_id, run_id, input_hash, reason, held_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (step_id) DO UPDATE SET
                 run_id = excluded.run_id, input_hash = excluded.input_hash,
                 reason = excluded.reason, held_at = excluded.held_at",
            params![fin.step_id.as_str(), run, fin.input_hash, reason, at],
        )
        .map_err(sql(path, "hold a rolled-back step"))?;
    }
    if fin.status.is_success() {
        tx.execute(
            "DELETE FROM held_steps WHERE step_id = ?1",
            [fin.step_id.as_str()],
        )
        .map_err(sql(path, "release a held step"))?;
        tx.execute(
            "DELETE FROM guard_refusals WHERE step_id = ?1",
            [fin.step_id.as_str()],
        )
        .map_err(sql(path, "clear a destroy-guard refusal"))?;
    } else if let Some(changes) = &fin.refused {
        let changes = serde_json::to_string(changes).unwrap_or_else(|_| "[]".to_string());
        tx.execute(
            "INSERT INTO guard_refusals (step_id, run_id, changes, refused_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (step_id) DO UPDATE SET
                 run_id = excluded.run_id, changes = excluded.changes,
                 refused_at = excluded.refused_at",
            params![fin.step_id.as_str(), run, changes, at],
        )
        .map_err(sql(path, "record a destroy-guard refusal"))?;
    }
    Ok(())
}

/// [`Store::step_finished`] of a success: the step's record (hash, parts, duration).
fn finish_record(
    tx: &rusqlite::Transaction,
    path: &Path,
    run: RunId,
    fin: &StepFinish,
    at: &str,
) -> Result<(), StateError> {
    let duration = i64::try_from(fin.duration_ms).unwrap_or(i64::MAX);
    let parts = serde_json::to_string(&fin.parts).unwrap_or_else(|_| "{}".to_string());
    tx.execute(
        "INSERT INTO step_records
             (step_id, input_hash, parts, duration_ms, run_id, recorded_at, has_rendered)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (step_id) DO UPDATE SET
             input_hash = excluded.input_hash, parts = excluded.parts,
             duration_ms = excluded.duration_ms, run_id = excluded.run_id,
             recorded_at = excluded.recorded_at,
             has_rendered = CASE WHEN ?8 THEN excluded.has_rendered
                                 ELSE step_records.has_rendered END",
        params![
            fin.step_id.as_str(),
            fin.input_hash,
            parts,
            duration,
            run,
            at,
            fin.rendered.is_some(),
            fin.rendered.is_some()
        ],
    )
    .map_err(sql(path, "record a successful step"))?;
    Ok(())
}

/// [`Store::step_finished`] of a success: its outputs replace the recorded ones (sensitive
/// values as hashes only).
fn finish_outputs(
    tx: &rusqlite::Transaction,
    path: &Path,
    fin: &StepFinish,
) -> Result<(), StateError> {
    tx.execute(
        "DELETE FROM outputs WHERE step_id = ?1",
        [fin.step_id.as_str()],
    )
    .map_err(sql(path, "replace the outputs of a step"))?;
    let mut insert = tx
        .prepare(
            "INSERT INTO outputs (step_id, name, value, value_hash, sensitive)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(sql(path, "record the outputs of a step"))?;
    for o in &fin.outputs {
        let json = o.value.to_string();
        let hash = sha256_hex(json.as_bytes());
        let clear = if o.sensitive { None } else { Some(json) };
        insert
            .execute(params![
                fin.step_id.as_str(),
                o.name,
                clear,
                hash,
                o.sensitive
            ])
            .map_err(sql(path, "record the outputs of a step"))?;
    }
    Ok(())
}

/// [`Store::step_finished`] of a success that used rendered files: they replace the recorded
/// ones.
fn finish_rendered(
    tx: &rusqlite::Transaction,
    path: &Path,
    step_id: &str,
    rendered: &BTreeMap<String, Vec<u8>>,
) -> Result<(), StateError> {
    tx.execute("DELETE FROM rendered_inputs WHERE step_id = ?1", [step_id])
        .map_err(sql(path, "replace the rendered inputs of a step"))?;
    let mut insert = tx
        .prepare("INSERT INTO rendered_inputs (step_id, path, contents) VALUES (?1, ?2, ?3)")
        .map_err(sql(path, "record the rendered inputs of a step"))?;
    for (file, contents) in rendered {
        insert
            .execute(params![step_id, file, contents])
            .map_err(sql(path, "record the rendered inputs of a step"))?;
    }
    Ok(())
}

fn insert_snapshot(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    s: &SnapshotRow,
) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO snapshots (vmid, node, name, service, run_id, step_id, taken_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (vmid, name) DO UPDATE SET
             node = excluded.node, service = excluded.service, run_id = excluded.run_id,
             step_id = excluded.step_id, taken_at = excluded.taken_at, deleted_at = NULL,
             rolled_back_at = NULL, rolled_back_in = NULL",
        params![s.vmid, s.node, s.name, s.service, s.run, s.step_id, s.taken_at],
    )
    .map_err(sql(path, "record a snapshot"))?;
    Ok(())
}

/// The time now, as the store writes it.
pub fn timestamp() -> String {
    now()
}

/// Applies the scripts not yet applied, each with its `user_version` bump in one transaction.
fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), StateError> {
    let supported = migrations.len() as i64;
    let version = |conn: &Connection| -> Result<i64, StateError> {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|source| StateError::Open {
                path: path.to_path_buf(),
                source,
            })
    };
    let check = |found: i64| {
        if found > supported {
            Err(StateError::TooNew {
                path: path.to_path_buf(),
                found,
                supported,
            })
        } else {
            Ok(found)
        }
    };
    if check(version(conn)?)? == supported {
        return Ok(());
    }
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StateError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Read again under the write lock: another process may have migrated meanwhile.
        let current = check(version(&tx)?)?;
        if current == supported {
            return Ok(());
        }
        let next = current + 1;
        let err = |source| StateError::Migrate {
            path: path.to_path_buf(),
            version: next,
            source,
        };
        tx.execute_batch(migrations[current as usize])
            .map_err(err)?;
        tx.pragma_update(None, "user_version", next).map_err(err)?;
        tx.commit().map_err(err)?;
    }
}

/// The lock row, with the run it names.
fn read_lock(
    conn: &Connection,
    path: &Path,
) -> Result<Option<(LockHolder, Option<RunId>)>, StateError> {
    conn.query_row(
        "SELECT pid, hostname, user, started_at, command, run_id FROM lock WHERE id = 1",
        [],
        |r| {
            Ok((
                LockHolder {
                    pid: r.get(0)?,
                    hostname: r.get(1)?,
                    user: r.get(2)?,
                    started_at: r.get(3)?,
                    command: r.get(4)?,
                },
                r.get(5)?,
            ))
        },
    )
    .optional()
    .map_err(sql(path, "read the lock"))
}

/// The `running` runs whose process is known to be gone.
fn dead_runs(conn: &Connection, path: &Path, host: &str) -> Result<Vec<RunId>, StateError> {
    let locked_run: Option<RunId> = read_lock(conn, path)?.and_then(|(_, run)| run);
    let mut stmt = conn
        .prepare("SELECT id, hostname, pid FROM runs WHERE result = 'running'")
        .map_err(sql(path, "read the running runs"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, RunId>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
            ))
        })
        .map_err(sql(path, "read the running runs"))?;
    let mut dead = Vec::new();
    for row in rows {
        let (id, run_host, pid) = row.map_err(sql(path, "read the running runs"))?;
        let gone = if run_host == host {
            !pid_alive(pid)
        } else {
            locked_run != Some(id)
        };
        if gone {
            dead.push(id);
        }
    }
    Ok(dead)
}

fn mark_interrupted(
    conn: &Connection,
    path: &Path,
    run: RunId,
    at: &str,
) -> Result<(), StateError> {
    conn.execute(
        "UPDATE runs SET result = 'interrupted', finished_at = ?2,
             summary = CASE WHEN summary = '' THEN 'the process running it died' ELSE summary END
         WHERE id = ?1 AND result = 'running'",
        params![run, at],
    )
    .map_err(sql(path, "mark a run interrupted"))?;
    cancel_started(
        conn,
        path,
        run,
        at,
        "interrupted: the process running the step died",
    )
}

fn cancel_started(
    conn: &Connection,
    path: &Path,
    run: RunId,
    at: &str,
    why: &str,
) -> Result<(), StateError> {
    conn.execute(
        "UPDATE step_results SET status = 'cancelled', finished_at = ?2,
             error = COALESCE(error, ?3)
         WHERE run_id = ?1 AND status = 'started'",
        params![run, at, why],
    )
    .map_err(sql(path, "cancel the unfinished steps of a run"))?;
    Ok(())
}

/// Creates the database file readable by its owner only (it holds rendered inputs and
/// outputs); SQLite gives its `-wal` and `-shm` files the same mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn path_to_sql(p: &Path) -> SqlValue {
    match p.to_str() {
        Some(s) => SqlValue::Text(s.to_string()),
        None => SqlValue::Blob(os_bytes(p)),
    }
}

#[cfg(unix)]
fn os_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(p: &Path) -> Vec<u8> {
    p.to_string_lossy().into_owned().into_bytes()
}

fn path_from_sql(v: ValueRef<'_>) -> Option<PathBuf> {
    match v {
        ValueRef::Text(b) => Some(PathBuf::from(String::from_utf8_lossy(b).into_owned())),
        ValueRef::Blob(b) => Some(path_from_bytes(b)),
        _ => None,
    }
}

#[cfg(unix)]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

#[cfg(not(unix))]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(b).into_owned())
}

/// Now, as stored.
fn now() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    rfc3339_millis(ms)
}

/// `1970-01-01T00:00:00.000Z` for 0.
fn rfc3339_millis(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let milli = unix_ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// This machine's name, as the lock and runs record it.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::process::Command::new("hostname")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// Who runs this process: `$USER`, `$LOGNAME`, else `uid N`.
fn user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = fs::metadata("/proc/self") {
            return format!("uid {}", m.uid());
        }
    }
    "unknown".to_string()
}

/// Whether a process with this pid exists on this host (a zombie counts as gone). Uses procfs
/// (`unsafe` is forbidden in this workspace, so not `kill(pid, 0)`); without procfs asks
/// `kill -0`, and when unsure answers "alive", so that a live lock is never taken over.
fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let proc = Path::new("/proc");
    if proc.join("self").exists() {
        return match fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
            // The state follows the command name, which is in parentheses and may contain them.
            Ok(stat) => !matches!(
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next()),
                Some('Z' | 'X' | 'x')
            ),
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        };
    }
    match std::process::Command::new("kill")
        .arg("-0")
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            err.contains("not permitted") || err.contains("permission")
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".nixmox").join("state.db");
        (dir, path)
    }

    fn sid(step: &str) -> StepId {
        step.parse().unwrap()
    }

    fn finish(step: &str, hash: &str, status: StepStatus) -> StepFinish {
        StepFinish {
            step_id: sid(step),
            input_hash: hash.to_string(),
            parts: BTreeMap::from([("host:web".to_string(), format!("p-{hash}"))]),
            status,
            duration_ms: 1234,
            error: (!status.is_success()).then(|| "boom".to_string()),
            outputs: Vec::new(),
            rendered: None,
            refused: None,
            held: None,
            snapshots: Vec::new(),
        }
    }

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// A pid that existed a moment ago and no longer does.
    fn dead_pid() -> u32 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "no::such::test"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(pid));
        pid
    }

    fn user_version(s: &Store) -> i64 {
        s.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        let t = now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z'));
    }

    #[test]
    fn open_creates_schema_and_reopen_is_idempotent() {
        let (_dir, path) = fresh();
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.path(), path);
            assert_eq!(user_version(&s), MIGRATIONS.len() as i64);
            let mode: String = s
                .conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            let fk: i64 = s
                .conn
                .pragma_query_value(None, "foreign_keys", |r| r.get(0))
                .unwrap();
            assert_eq!(fk, 1);
            let mut tables: Vec<String> = s
                .conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            tables.sort();
            assert_eq!(
                tables,
                [
                    "backups",
                    "guard_refusals",
                    "held_steps",
                    "lock",
                    "outputs",
                    "rendered_inputs",
                    "runs",
                    "snapshots",
                    "step_records",
                    "step_results"
                ]
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&["up".to_string()]).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&s), MIGRATIONS.len() as i64);
        assert_eq!(s.runs(10).unwrap()[0].id, run);
    }

    #[test]
    fn migrations_apply_in_order_and_refuse_newer_schemas() {
        let (_dir, path) = fresh();
        drop(Store::open_with(&path, &MIGRATIONS[..1]).unwrap());
        let mut more: Vec<&str> = MIGRATIONS.to_vec();
        more.push("ALTER TABLE runs ADD COLUMN extra TEXT;");
        more.push("UPDATE runs SET extra = 'x'; CREATE TABLE later (a INTEGER);");
        let s = Store::open_with(&path, &more).unwrap();
        assert_eq!(user_version(&s), more.len() as i64);
        s.conn
            .execute("INSERT INTO later (a) VALUES (1)", [])
            .unwrap();
        drop(s);
        // Opened by an older nixmox.
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, StateError::TooNew { found, .. } if found == more.len() as i64));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("upgrade nixmox"), "{msg}");
    }

    #[test]
    fn a_failing_migration_changes_nothing() {
        let (_dir, path) = fresh();
        drop(Store::open(&path).unwrap());
        let mut more: Vec<&str> = MIGRATIONS.to_vec();
        more.push("CREATE TABLE half (a INTEGER); THIS IS NOT SQL;");
        let err = Store::open_with(&path, &more).err().unwrap();
        assert!(matches!(err, StateError::Migrate { version, .. } if version == more.len() as i64));
        let s = Store::open(&path).unwrap();
        assert_eq!(user_version(&s), MIGRATIONS.len() as i64);
        let half: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'half'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(half, 0);
    }

    #[test]
    fn open_names_the_path_when_it_cannot_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let path = file.join("state.db");
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, StateError::CreateDir { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn lock_is_exclusive_and_names_its_holder() {
        let (_dir, path) = fresh();
        let mut a = Store::open(&path).unwrap();
        let mut b = Store::open(&path).unwrap();
        assert_eq!(a.lock_holder().unwrap(), None);
        assert_eq!(a.acquire_lock("nixmox up").unwrap(), LockOutcome::Acquired);
        let holder = b.lock_holder().unwrap().unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.hostname, hostname());
        assert_eq!(holder.command, "nixmox up");
        // Same process: acquired again.
        assert_eq!(b.acquire_lock("nixmox up").unwrap(), LockOutcome::Acquired);

        // Another live process (pid 1 always exists) holds it.
        a.conn
            .execute("UPDATE lock SET pid = 1, command = 'nixmox up web'", [])
            .unwrap();
        let err = b.acquire_lock("nixmox up").unwrap_err();
        let StateError::Locked { holder, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(holder.pid, 1);
        let msg = err.to_string();
        let want = format!(
            "locked by pid 1 on host {} since {} (nixmox up web)",
            hostname(),
            holder.started_at
        );
        assert!(msg.contains(&want), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("nixmox unlock"), "{msg}");

        // Releasing someone else's lock does nothing.
        b.release_lock().unwrap();
        assert_eq!(a.lock_holder().unwrap().unwrap().pid, 1);

        // `nixmox unlock`.
        let removed = b.force_unlock().unwrap().unwrap();
        assert_eq!(removed.pid, 1);
        assert_eq!(b.force_unlock().unwrap(), None);
        assert_eq!(
            b.acquire_lock("nixmox down").unwrap(),
            LockOutcome::Acquired
        );
        b.release_lock().unwrap();
        assert_eq!(a.lock_holder().unwrap(), None);
    }

    #[test]
    fn dropping_the_store_releases_its_lock() {
        let (_dir, path) = fresh();
        let mut a = Store::open(&path).unwrap();
        a.acquire_lock("nixmox up").unwrap();
        drop(a);
        assert_eq!(Store::open(&path).unwrap().lock_holder().unwrap(), None);
    }

    #[test]
    fn a_lock_of_a_dead_process_is_taken_over_with_its_run_interrupted() {
        let (_dir, path) = fresh();
        let mut a = Store::open(&path).unwrap();
        a.acquire_lock("nixmox up").unwrap();
        let run = a.start_run(&["up".to_string()]).unwrap();
        a.step_started(run, &sid("tf:infra"), "h1", None).unwrap();
        let dead = dead_pid();
        // The holder becomes a process that has exited; keep its run `running`.
        a.conn.execute("UPDATE lock SET pid = ?1", [dead]).unwrap();
        a.conn.execute("UPDATE runs SET pid = ?1", [dead]).unwrap();
        a.held = false;

        let mut b = Store::open(&path).unwrap();
        match b.acquire_lock("nixmox up").unwrap() {
            LockOutcome::TakenOver { previous } => {
                assert_eq!(previous.pid, dead);
                assert_eq!(previous.command, "nixmox up");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.lock_holder().unwrap().unwrap().pid, std::process::id());
        let runs = b.runs(10).unwrap();
        assert_eq!(runs[0].result, "interrupted");
        let steps = b.step_results(run).unwrap();
        assert_eq!(steps[0].status, RowStatus::Ended(StepStatus::Cancelled));
    }

    #[test]
    fn a_lock_from_another_host_is_never_taken_over() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let dead = dead_pid();
        s.conn
            .execute(
                "INSERT INTO lock (id, pid, hostname, user, started_at, command)
                 VALUES (1, ?1, 'elsewhere.example', 'ops', '2025-01-01T00:00:00.000Z', 'nixmox up')",
                [dead],
            )
            .unwrap();
        let err = s.acquire_lock("nixmox up").unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "locked by pid {dead} on host elsewhere.example since 2025-01-01T00:00:00.000Z (nixmox up)"
            )),
            "{err}"
        );
        assert_eq!(
            s.force_unlock().unwrap().unwrap().hostname,
            "elsewhere.example"
        );
        assert_eq!(s.acquire_lock("nixmox up").unwrap(), LockOutcome::Acquired);
    }

    #[test]
    fn runs_and_steps_round_trip() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        s.acquire_lock("nixmox up").unwrap();
        let args = vec!["up".to_string(), "--parallel".to_string(), "4".to_string()];
        let r1 = s.start_run(&args).unwrap();
        let held: Option<RunId> = s
            .conn
            .query_row("SELECT run_id FROM lock", [], |r| r.get(0))
            .unwrap();
        assert_eq!(held, Some(r1));
        let log = PathBuf::from(".nixmox/logs/1/tf:infra.log");
        s.step_started(r1, &sid("tf:infra"), "h1", Some(&log))
            .unwrap();
        s.step_finished(r1, &finish("tf:infra", "h1", StepStatus::Changed))
            .unwrap();
        s.step_started(r1, &sid("nix:core:web"), "h2", None)
            .unwrap();
        s.step_finished(r1, &finish("nix:core:web", "h2", StepStatus::Failed))
            .unwrap();
        // Never started.
        s.step_finished(
            r1,
            &finish("nix:core:db", "h3", StepStatus::DependencyFailed),
        )
        .unwrap();
        s.finish_run(r1, RunResult::Failed, "1 failed").unwrap();
        let r2 = s.start_run(&["up".to_string()]).unwrap();
        let log2 = PathBuf::from(".nixmox/logs/2/tf:infra.log");
        s.step_started(r2, &sid("tf:infra"), "h1", Some(&log2))
            .unwrap();

        let runs = s.runs(10).unwrap();
        assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [r2, r1]);
        assert_eq!(runs[1].args, args);
        assert_eq!(runs[1].result, "failed");
        assert_eq!(runs[1].summary, "1 failed");
        assert!(runs[1].finished_at.is_some());
        assert_eq!(runs[0].result, "running");
        assert_eq!(runs[0].finished_at, None);
        assert_eq!(runs[0].hostname, hostname());
        assert_eq!(runs[0].user, user());
        assert_eq!(s.runs(1).unwrap().len(), 1);

        let steps = s.step_results(r1).unwrap();
        let summary: Vec<_> = steps
            .iter()
            .map(|r| (r.step_id.as_str(), r.status, r.duration_ms))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "tf:infra",
                    RowStatus::Ended(StepStatus::Changed),
                    Some(1234)
                ),
                (
                    "nix:core:web",
                    RowStatus::Ended(StepStatus::Failed),
                    Some(1234)
                ),
                (
                    "nix:core:db",
                    RowStatus::Ended(StepStatus::DependencyFailed),
                    Some(1234)
                ),
            ]
        );
        // The words in the table are the ones NixMox always wrote.
        let words: Vec<String> = steps.iter().map(|r| r.status.to_string()).collect();
        assert_eq!(words, ["succeeded", "failed", "skipped"]);
        assert_eq!(steps[0].log_path.as_deref(), Some(log.as_path()));
        assert_eq!(steps[1].error.as_deref(), Some("boom"));
        assert_eq!(s.step_results(r2).unwrap()[0].status, RowStatus::Started);
        assert_eq!(s.step_results(r2).unwrap()[0].duration_ms, None);

        assert_eq!(s.last_log("tf:infra").unwrap(), Some((r2, log2)));
        assert_eq!(s.last_log("nix:core:web").unwrap(), None);

        // Finishing the run cancels what is still started.
        s.finish_run(r2, RunResult::Interrupted, "ctrl-c").unwrap();
        assert_eq!(
            s.step_results(r2).unwrap()[0].status,
            RowStatus::Ended(StepStatus::Cancelled)
        );
        assert!(matches!(
            s.finish_run(999, RunResult::Success, ""),
            Err(StateError::NoSuchRun { run: 999, .. })
        ));
        // A step of a run that does not exist violates the foreign key.
        assert!(s.step_started(999, &sid("tf:infra"), "h", None).is_err());
    }

    /// A row whose id is no step id (written by hand, or by a NixMox with other phases) is left
    /// out of a run's steps, as `ps` always passed over it; the others are read.
    #[test]
    fn step_results_leave_out_ids_that_are_no_step_id() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&[]).unwrap();
        s.step_finished(run, &finish("nix:core:web", "h1", StepStatus::Changed))
            .unwrap();
        s.conn
            .execute(
                "INSERT INTO step_results (run_id, step_id, input_hash, status, started_at)
                 VALUES (?1, 'deploy:web', 'h', 'failed', '2000-01-01T00:00:00Z')",
                [run],
            )
            .unwrap();
        let steps = s.step_results(run).unwrap();
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!(steps[0].step_id, "nix:core:web");
        assert_eq!(steps[0].status, RowStatus::Ended(StepStatus::Changed));
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_log_paths_round_trip() {
        use std::os::unix::ffi::OsStrExt;
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&[]).unwrap();
        let log = PathBuf::from(std::ffi::OsStr::from_bytes(b"logs/\xff.log"));
        s.step_started(run, &sid("nix:core:a"), "h", Some(&log))
            .unwrap();
        assert_eq!(s.last_log("nix:core:a").unwrap(), Some((run, log)));
    }

    #[test]
    fn record_round_trip() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.record().unwrap(), Record::default());
        let run = s.start_run(&[]).unwrap();
        let mut a = finish("tf:infra", "h1", StepStatus::Changed);
        a.parts.insert("module:x".to_string(), "m1".to_string());
        s.step_finished(run, &a).unwrap();
        let mut b = finish("nix:core:web", "h2", StepStatus::Unchanged);
        b.duration_ms = 7;
        s.step_finished(run, &b).unwrap();
        s.step_finished(run, &finish("nix:core:db", "h3", StepStatus::Failed))
            .unwrap();
        let want = Record {
            steps: BTreeMap::from([
                (
                    "tf:infra".to_string(),
                    StepRecord {
                        hash: "h1".to_string(),
                        parts: a.parts.clone(),
                        duration_ms: Some(1234),
                    },
                ),
                (
                    "nix:core:web".to_string(),
                    StepRecord {
                        hash: "h2".to_string(),
                        parts: b.parts.clone(),
                        duration_ms: Some(7),
                    },
                ),
            ]),
            ..Record::default()
        };
        assert_eq!(s.record().unwrap(), want);

        // A later failure leaves the last success recorded.
        let run2 = s.start_run(&[]).unwrap();
        s.step_finished(run2, &finish("tf:infra", "h9", StepStatus::Failed))
            .unwrap();
        assert_eq!(s.record().unwrap(), want);
        // A later success replaces it.
        s.step_finished(run2, &finish("tf:infra", "h9", StepStatus::Changed))
            .unwrap();
        assert_eq!(s.record().unwrap().get("tf:infra").unwrap().hash, "h9");
        drop(s);
        assert_eq!(
            Store::open(&path)
                .unwrap()
                .record()
                .unwrap()
                .get("nix:core:web"),
            want.get("nix:core:web")
        );
    }

    #[test]
    fn outputs_are_replaced_and_sensitive_ones_kept_only_as_hashes() {
        const SECRET: &str = "hunter2-correct-horse-battery-staple";
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&[]).unwrap();
        let mut fin = finish("tf:infra", "h1", StepStatus::Changed);
        fin.outputs = vec![
            OutputValue {
                name: "ip".to_string(),
                value: serde_json::json!("10.0.0.5"),
                sensitive: false,
            },
            OutputValue {
                name: "ids".to_string(),
                value: serde_json::json!({"web": 101, "db": null}),
                sensitive: false,
            },
            OutputValue {
                name: "token".to_string(),
                value: serde_json::json!(SECRET),
                sensitive: true,
            },
        ];
        s.step_finished(run, &fin).unwrap();

        let outputs = s.outputs().unwrap();
        assert_eq!(outputs.len(), 1);
        let infra = &outputs["tf:infra"];
        assert_eq!(infra.keys().collect::<Vec<_>>(), ["ids", "ip"]);
        assert_eq!(infra["ip"], serde_json::json!("10.0.0.5"));
        assert_eq!(infra["ids"], serde_json::json!({"web": 101, "db": null}));
        let hashes = s.output_hashes("tf:infra").unwrap();
        assert_eq!(hashes.len(), 3);
        assert_eq!(
            hashes["token"],
            sha256_hex(serde_json::json!(SECRET).to_string().as_bytes())
        );
        assert_eq!(hashes["token"].len(), 64);
        let stored: Option<String> = s
            .conn
            .query_row("SELECT value FROM outputs WHERE name = 'token'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, None);

        // The clear value is nowhere in the files, before and after a checkpoint.
        let assert_absent = |when: &str| {
            for suffix in ["", "-wal", "-shm"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                let Ok(bytes) = fs::read(&file) else { continue };
                assert!(
                    !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                    "{when}: the secret is in {}",
                    file.display()
                );
                // The test would be vacuous if nothing were written at all.
                if suffix.is_empty() && when == "after checkpoint" {
                    assert!(bytes.windows(8).any(|w| w == b"10.0.0.5"));
                }
            }
        };
        assert_absent("before checkpoint");
        s.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert_absent("after checkpoint");

        // Outputs are replaced, not merged, on the next success; kept on failure.
        let mut fail = finish("tf:infra", "h2", StepStatus::Failed);
        fail.outputs = vec![OutputValue {
            name: "other".to_string(),
            value: serde_json::json!(1),
            sensitive: false,
        }];
        s.step_finished(run, &fail).unwrap();
        assert_eq!(s.output_hashes("tf:infra").unwrap().len(), 3);
        let mut again = finish("tf:infra", "h2", StepStatus::Unchanged);
        again.outputs = vec![OutputValue {
            name: "ip".to_string(),
            value: serde_json::json!("10.0.0.6"),
            sensitive: false,
        }];
        s.step_finished(run, &again).unwrap();
        assert_eq!(
            s.outputs().unwrap()["tf:infra"],
            BTreeMap::from([("ip".to_string(), serde_json::json!("10.0.0.6"))])
        );
        assert_eq!(s.output_hashes("tf:infra").unwrap().len(), 1);
        assert!(s.output_hashes("nope").unwrap().is_empty());
    }

    #[test]
    fn rendered_inputs_are_replaced_on_success_and_untouched_otherwise() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&[]).unwrap();
        assert_eq!(s.rendered_inputs("tf:service-infra:web").unwrap(), None);

        let mut first = finish("tf:service-infra:web", "h1", StepStatus::Changed);
        first.rendered = Some(files(&[("main.tf", "one"), ("vars.tf.json", "{}")]));
        s.step_finished(run, &first).unwrap();
        assert_eq!(
            s.rendered_inputs("tf:service-infra:web").unwrap(),
            first.rendered
        );

        // Failure: untouched.
        let mut failed = finish("tf:service-infra:web", "h2", StepStatus::Failed);
        failed.rendered = Some(files(&[("main.tf", "broken")]));
        s.step_finished(run, &failed).unwrap();
        assert_eq!(
            s.rendered_inputs("tf:service-infra:web").unwrap(),
            first.rendered
        );

        // Success without rendered files: kept.
        s.step_finished(
            run,
            &finish("tf:service-infra:web", "h1", StepStatus::Unchanged),
        )
        .unwrap();
        assert_eq!(
            s.rendered_inputs("tf:service-infra:web").unwrap(),
            first.rendered
        );

        // Success: replaced entirely (vars.tf.json goes away).
        let mut second = finish("tf:service-infra:web", "h3", StepStatus::Changed);
        second.rendered = Some(files(&[("main.tf", "two")]));
        s.step_finished(run, &second).unwrap();
        assert_eq!(
            s.rendered_inputs("tf:service-infra:web").unwrap(),
            second.rendered
        );

        // An empty set is recorded as such.
        let mut empty = finish("tf:service-infra:web", "h4", StepStatus::Changed);
        empty.rendered = Some(BTreeMap::new());
        s.step_finished(run, &empty).unwrap();
        assert_eq!(
            s.rendered_inputs("tf:service-infra:web").unwrap(),
            Some(BTreeMap::new())
        );
    }

    /// Issue 14: a rolled-back step is held until it next succeeds; snapshots are listed
    /// until deleted, with what was rolled back to them.
    #[test]
    fn issue_14_held_steps_and_snapshots_are_kept_until_the_step_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("state.db")).unwrap();
        let run = s.start_run(&[]).unwrap();
        let snap = SnapshotRow {
            vmid: 910,
            node: "pve".into(),
            name: "nixmox-r1-svc-app".into(),
            service: "app".into(),
            run: Some(run),
            step_id: Some("nix:service-config:app".into()),
            taken_at: now(),
            rolled_back: None,
        };
        let mut fin = finish("nix:service-config:app", "h2", StepStatus::Failed);
        fin.held = Some("health gate failed".into());
        fin.snapshots = vec![snap.clone()];
        s.step_finished(run, &fin).unwrap();
        s.snapshot_rolled_back(910, "nixmox-r1-svc-app", Some(run))
            .unwrap();
        let held = s.record().unwrap().held;
        assert_eq!(held["nix:service-config:app"].hash, "h2");
        assert_eq!(held["nix:service-config:app"].run, run);
        let rows = s.snapshots(Some(910)).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].rolled_back.as_ref().map(|r| r.1), Some(Some(run)));
        assert!(s.snapshots(Some(911)).unwrap().is_empty());
        // A success releases the step; a deleted snapshot is no longer listed.
        s.step_finished(
            run,
            &finish("nix:service-config:app", "h3", StepStatus::Changed),
        )
        .unwrap();
        assert!(s.record().unwrap().held.is_empty());
        s.snapshot_deleted(910, "nixmox-r1-svc-app").unwrap();
        assert!(s.snapshots(None).unwrap().is_empty());
    }

    /// Issue 11: a refusal by the destroy guard is kept until the step next succeeds.
    #[test]
    fn destroy_guard_refusals_last_until_the_step_succeeds() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&["up".into()]).unwrap();
        let mut failed = finish("tf:infra", "h1", StepStatus::Failed);
        failed.refused = Some(vec!["a.b (replace)".into()]);
        s.step_finished(run, &failed).unwrap();
        assert_eq!(
            s.record().unwrap().refused,
            BTreeMap::from([("tf:infra".to_string(), vec!["a.b (replace)".to_string()])])
        );
        // Another failure without a refusal keeps it; a success clears it.
        s.step_finished(run, &finish("tf:infra", "h1", StepStatus::Failed))
            .unwrap();
        assert_eq!(s.record().unwrap().refused.len(), 1);
        s.step_finished(run, &finish("tf:infra", "h1", StepStatus::Changed))
            .unwrap();
        assert!(s.record().unwrap().refused.is_empty());
        s.step_finished(run, &failed).unwrap();
        s.forget_step("tf:infra").unwrap();
        assert!(s.record().unwrap().refused.is_empty());
    }

    #[test]
    fn forget_step_removes_record_outputs_and_rendered_inputs() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let run = s.start_run(&[]).unwrap();
        for step in ["tf:service-infra:web", "tf:service-infra:db"] {
            let mut fin = finish(step, "h", StepStatus::Changed);
            fin.outputs = vec![OutputValue {
                name: "ip".to_string(),
                value: serde_json::json!("10.0.0.1"),
                sensitive: false,
            }];
            fin.rendered = Some(files(&[("main.tf", "x")]));
            s.step_finished(run, &fin).unwrap();
        }
        s.forget_step("tf:service-infra:web").unwrap();
        s.forget_step("never:recorded").unwrap();
        assert_eq!(s.record().unwrap().get("tf:service-infra:web"), None);
        assert!(s.record().unwrap().get("tf:service-infra:db").is_some());
        assert!(!s.outputs().unwrap().contains_key("tf:service-infra:web"));
        assert!(s.output_hashes("tf:service-infra:web").unwrap().is_empty());
        assert_eq!(s.rendered_inputs("tf:service-infra:web").unwrap(), None);
        assert!(s.rendered_inputs("tf:service-infra:db").unwrap().is_some());
        // The history stays.
        assert_eq!(s.step_results(run).unwrap().len(), 2);
    }

    #[test]
    fn recover_interrupted_marks_only_dead_runs() {
        let (_dir, path) = fresh();
        let mut s = Store::open(&path).unwrap();
        let dead = dead_pid();
        let gone = s.start_run(&["up".to_string()]).unwrap();
        s.step_started(gone, &sid("tf:infra"), "h1", None).unwrap();
        s.step_finished(gone, &finish("tf:infra", "h1", StepStatus::Changed))
            .unwrap();
        s.step_started(gone, &sid("nix:core:web"), "h2", None)
            .unwrap();
        s.conn
            .execute(
                "UPDATE runs SET pid = ?1 WHERE id = ?2",
                params![dead, gone],
            )
            .unwrap();
        // This process's own run is alive.
        let alive = s.start_run(&["up".to_string()]).unwrap();
        s.step_started(alive, &sid("nix:core:db"), "h3", None)
            .unwrap();
        // A run on another host: alive while the lock names it, dead once it does not.
        let foreign = s.start_run(&[]).unwrap();
        let foreign_locked = s.start_run(&[]).unwrap();
        s.conn
            .execute(
                "UPDATE runs SET hostname = 'elsewhere' WHERE id IN (?1, ?2)",
                [foreign, foreign_locked],
            )
            .unwrap();
        s.conn
            .execute(
                "INSERT INTO lock (id, pid, hostname, user, started_at, run_id, command)
                 VALUES (1, 1, 'elsewhere', 'ops', '2025-01-01T00:00:00.000Z', ?1, 'nixmox up')",
                [foreign_locked],
            )
            .unwrap();

        assert_eq!(s.recover_interrupted().unwrap(), 2);
        assert_eq!(s.recover_interrupted().unwrap(), 0);
        let result = |id: RunId| {
            s.runs(100)
                .unwrap()
                .into_iter()
                .find(|r| r.id == id)
                .unwrap()
        };
        assert_eq!(result(gone).result, "interrupted");
        assert!(result(gone).finished_at.is_some());
        assert_eq!(result(foreign).result, "interrupted");
        assert_eq!(result(alive).result, "running");
        assert_eq!(result(foreign_locked).result, "running");
        let steps = s.step_results(gone).unwrap();
        assert_eq!(steps[0].status, RowStatus::Ended(StepStatus::Changed));
        assert_eq!(steps[1].status, RowStatus::Ended(StepStatus::Cancelled));
        assert!(steps[1].error.as_deref().unwrap().contains("interrupted"));
        assert_eq!(s.step_results(alive).unwrap()[0].status, RowStatus::Started);
        // The record of the step that succeeded before the crash stays.
        assert_eq!(s.record().unwrap().get("tf:infra").unwrap().hash, "h1");
    }

    const CHILD_ENV: &str = "NIXMOX_STATE_TEST_WRITER_DB";
    const CHILD_TEST: &str = "state::tests::kill9_writer_child";

    /// Not a test on its own: the body of the child process of
    /// `kill9_leaves_the_store_consistent`, which runs it with `CHILD_ENV` set.
    #[test]
    fn kill9_writer_child() {
        let Some(db) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let mut s = Store::open(Path::new(&db)).unwrap();
        s.acquire_lock("writer").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i: u64 = 0;
        while Instant::now() < deadline {
            // 16 steps per run, each once, as the engine does.
            let run = s.start_run(&["writer".to_string()]).unwrap();
            for k in 0..16 {
                writer_step(&mut s, run, k, i);
                i += 1;
            }
            s.finish_run(run, RunResult::Success, "").unwrap();
        }
    }

    fn writer_step(s: &mut Store, run: RunId, k: u64, i: u64) {
        let step = format!("nix:core:s{k}");
        let hash = format!("{run}-{i}");
        s.step_started(
            run,
            &sid(&step),
            &hash,
            Some(Path::new(&format!("logs/{i}"))),
        )
        .unwrap();
        let status = if i % 5 == 3 {
            StepStatus::Failed
        } else {
            StepStatus::Changed
        };
        let mut fin = finish(&step, &hash, status);
        fin.outputs = (0..4)
            .map(|k| OutputValue {
                name: format!("o{k}"),
                value: serde_json::json!(hash),
                sensitive: k == 3,
            })
            .collect();
        let big = hash.repeat(400);
        fin.rendered = Some(
            (0..6)
                .map(|k| (format!("f{k}"), big.clone().into_bytes()))
                .collect(),
        );
        s.step_finished(run, &fin).unwrap();
    }

    /// Every recorded step matches a successful result of the same run and hash, and its
    /// outputs and rendered inputs belong to that same result.
    fn assert_consistent(s: &Store) {
        let check: String = s
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let fk_violations: i64 = s
            .conn
            .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(fk_violations, 0);
        let unmatched: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM step_records r WHERE NOT EXISTS (
                     SELECT 1 FROM step_results s
                     WHERE s.run_id = r.run_id AND s.step_id = r.step_id
                       AND s.input_hash = r.input_hash
                       AND s.status IN ('succeeded', 'unchanged'))",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unmatched, 0);
        let outputs = s.outputs().unwrap();
        for (step, rec) in s.record().unwrap().steps {
            let values = &outputs[&step];
            assert_eq!(values.len(), 3, "{step}");
            for v in values.values() {
                assert_eq!(v, &serde_json::json!(rec.hash), "{step}");
            }
            assert_eq!(s.output_hashes(&step).unwrap().len(), 4, "{step}");
            let files = s.rendered_inputs(&step).unwrap().unwrap();
            assert_eq!(files.len(), 6, "{step}");
            for contents in files.values() {
                assert_eq!(contents, &rec.hash.repeat(400).into_bytes(), "{step}");
            }
        }
        let started: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM step_results s JOIN runs r ON r.id = s.run_id
                 WHERE s.status = 'started' AND r.result != 'running'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(started, 0);
    }

    #[test]
    fn kill9_leaves_the_store_consistent() {
        let (_dir, path) = fresh();
        drop(Store::open(&path).unwrap());
        let exe = std::env::current_exe().unwrap();
        for round in 0..4u32 {
            let reader = Store::open(&path).unwrap();
            let before: RunId = reader
                .conn
                .query_row("SELECT COALESCE(max(id), 0) FROM runs", [], |r| r.get(0))
                .unwrap();
            let mut child = Command::new(&exe)
                .args(["--exact", CHILD_TEST, "--test-threads=1"])
                .env(CHILD_ENV, &path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Wait for this child to get going (40 steps written), then kill it at a varying
            // instant.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let done: i64 = reader
                    .conn
                    .query_row(
                        "SELECT count(*) FROM step_results WHERE run_id > ?1",
                        [before],
                        |r| r.get(0),
                    )
                    .unwrap();
                if done >= 40 {
                    break;
                }
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the writer exited early"
                );
                assert!(Instant::now() < deadline, "the writer made no progress");
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(reader);
            let jitter = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 7_000_000;
            std::thread::sleep(Duration::from_nanos(u64::from(jitter + round * 1_000_000)));
            child.kill().unwrap(); // SIGKILL
            let pid = child.id();
            child.wait().unwrap();

            let mut s = Store::open(&path).unwrap();
            assert_consistent(&s);
            // The killed writer's run (or none, if it died between two runs) is over.
            let runs = s.runs(usize::MAX).unwrap();
            assert!(runs.iter().all(|r| r.result != "running"), "round {round}");
            let interrupted = runs.iter().filter(|r| r.result == "interrupted").count();
            assert!(interrupted <= round as usize + 1, "round {round}");
            match s.acquire_lock("checker").unwrap() {
                LockOutcome::TakenOver { previous } => assert_eq!(previous.pid, pid),
                other => panic!("round {round}: {other:?}, child {pid}, runs {runs:?}"),
            }
            s.release_lock().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(!s.record().unwrap().steps.is_empty());
    }
}
