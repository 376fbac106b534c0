//! What can go wrong talking to Proxmox VE, worded so an operator knows what to do next.
//! No variant ever holds a credential: messages come from PVE's answers, paths and settings.

use std::collections::BTreeMap;
use std::fmt;

/// An error from the PVE API or from getting to it.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    /// Settings that make talking to PVE impossible: no endpoint, no credentials, an unreadable
    /// CA file. Never retried.
    #[error("{0}")]
    Config(String),
    /// The request did not get an HTTP answer: refused, reset, timed out. Retried when safe.
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    /// The server's certificate was refused.
    #[error("{0}")]
    Tls(String),
    /// 401: the credentials were refused.
    #[error("authentication to {endpoint} failed: PVE says \"{message}\"; {hint}")]
    Auth {
        endpoint: String,
        message: String,
        hint: String,
    },
    /// 403: the credentials are fine, the privileges are not.
    #[error("permission denied for {method} {path}: {message}")]
    Forbidden {
        method: String,
        path: String,
        message: String,
    },
    /// 400 with PVE's per-field explanations.
    #[error("{}", params_message(method, path, message, fields))]
    Params {
        method: String,
        path: String,
        message: String,
        /// Parameter name → PVE's wording.
        fields: BTreeMap<String, String>,
    },
    /// Any other HTTP error status, with PVE's message.
    #[error("{method} {path} failed with HTTP {status}: {message}")]
    Api {
        status: u16,
        method: String,
        path: String,
        message: String,
    },
    /// A task (a UPID) ended with an exit status other than OK.
    #[error("{}", task_message(kind, node, exitstatus, log))]
    Task {
        node: String,
        upid: String,
        /// The task type, like `vzcreate`.
        kind: String,
        exitstatus: String,
        /// The last lines of the task log.
        log: Vec<String>,
    },
    /// A task still running when NixMox stopped waiting.
    #[error("{kind} task on {node} still running after {secs}s: {upid}")]
    TaskTimeout {
        node: String,
        upid: String,
        kind: String,
        secs: u64,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer to {method} {path}: {message}")]
    Protocol {
        method: String,
        path: String,
        message: String,
    },
    /// A transient error that persisted through every retry.
    #[error("{source} (gave up after {attempts} attempts)")]
    GaveUp {
        attempts: u32,
        source: Box<PveError>,
    },
}

fn params_message(
    method: &str,
    path: &str,
    message: &str,
    fields: &BTreeMap<String, String>,
) -> String {
    let mut out = format!("PVE rejected the parameters of {method} {path}");
    let message = message.trim();
    if !message.is_empty() {
        out.push_str(&format!(" ({message})"));
    }
    out.push(':');
    for (k, v) in fields {
        out.push_str(&format!(" `{k}`: {};", v.trim()));
    }
    if out.ends_with(';') {
        out.pop();
    }
    out
}

fn task_message(kind: &str, node: &str, exitstatus: &str, log: &[String]) -> String {
    let mut out = format!("{kind} task on {node} failed: {exitstatus}");
    let tail: Vec<&str> = log
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && *l != exitstatus && !l.starts_with("TASK ERROR"))
        .collect();
    if !tail.is_empty() {
        out.push_str(&format!(" (task log: {})", tail.join(" | ")));
    }
    out
}

impl PveError {
    /// The error at the bottom of retries.
    pub fn root(&self) -> &PveError {
        match self {
            PveError::GaveUp { source, .. } => source.root(),
            e => e,
        }
    }

    /// PVE's own message, when there is one.
    pub fn pve_message(&self) -> Option<&str> {
        match self.root() {
            PveError::Api { message, .. }
            | PveError::Params { message, .. }
            | PveError::Forbidden { message, .. }
            | PveError::Auth { message, .. } => Some(message),
            PveError::Task { exitstatus, .. } => Some(exitstatus),
            _ => None,
        }
    }

    /// Another config-lock holder made the request or task give up waiting.
    pub fn is_lock_timeout(&self) -> bool {
        self.pve_message().is_some_and(is_lock_message)
    }

    /// The container (or its config file) does not exist: PVE answers 500 for that.
    pub fn is_not_found(&self) -> bool {
        match self.root() {
            PveError::Api { status: 404, .. } => true,
            PveError::Api {
                status: 500,
                message,
                ..
            } => message.contains("does not exist") && message.contains("Configuration file"),
            _ => false,
        }
    }

    /// Worth another try for an operation that is safe to repeat: no answer, a server error
    /// that is not a statement about the object (exists, does not exist, already running), a
    /// lock held by someone else.
    pub fn is_transient(&self) -> bool {
        match self {
            PveError::Connect { .. } => true,
            PveError::Api {
                status, message, ..
            } => {
                *status >= 500
                    && !message.contains("already exists")
                    && !message.contains("does not exist")
                    && !message.contains("already running")
                    && !message.contains("not running")
                    && !message.contains("protection mode")
            }
            PveError::Task { exitstatus, .. } => is_lock_message(exitstatus),
            _ => false,
        }
    }
}

fn is_lock_message(m: &str) -> bool {
    (m.contains("can't lock file") && m.contains("got timeout"))
        || m.contains("got timeout while trying to lock")
}

/// One container's failure, named so the operator knows which container and what NixMox was
/// doing.
#[derive(Debug)]
pub struct CtError {
    pub vmid: u32,
    pub hostname: String,
    pub node: String,
    /// What NixMox was doing: `create`, `update config`, `start`, `destroy`, …
    pub action: String,
    pub error: PveError,
}

impl fmt::Display for CtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = format!(
            "CT {} (`{}`) on node {}",
            self.vmid, self.hostname, self.node
        );
        if self.error.is_lock_timeout() {
            write!(
                f,
                "{what}: {}: its configuration stayed locked by another task (a backup, a migration, another client?): {}",
                self.action, self.error
            )
        } else {
            write!(f, "{what}: {}: {}", self.action, self.error)
        }
    }
}

impl std::error::Error for CtError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_error_lists_every_field_with_pve_wording() {
        let e = PveError::Params {
            method: "POST".into(),
            path: "/nodes/pve1/lxc".into(),
            message: "Parameter verification failed.\n".into(),
            fields: [
                (
                    "memory".to_string(),
                    "type check ('integer') failed - got 'lots'".to_string(),
                ),
                (
                    "cores".to_string(),
                    "value must have a minimum value of 1".to_string(),
                ),
            ]
            .into(),
        };
        assert_eq!(
            e.to_string(),
            "PVE rejected the parameters of POST /nodes/pve1/lxc (Parameter verification failed.): \
             `cores`: value must have a minimum value of 1; `memory`: type check ('integer') failed - got 'lots'"
        );
    }

    #[test]
    fn classification() {
        let api = |status, m: &str| PveError::Api {
            status,
            method: "PUT".into(),
            path: "/x".into(),
            message: m.into(),
        };
        assert!(api(500, "cluster not ready - no quorum?").is_transient());
        assert!(api(503, "injected").is_transient());
        assert!(!api(500, "CT 901 already exists on node 'pve1'").is_transient());
        assert!(api(
            500,
            "Configuration file 'nodes/pve1/lxc/901.conf' does not exist"
        )
        .is_not_found());
        let lock = api(
            500,
            "can't lock file '/run/lock/lxc/pve-config-901.lock' - got timeout",
        );
        assert!(lock.is_transient() && lock.is_lock_timeout());
        assert!(!api(400, "bad").is_transient());
        let gave_up = PveError::GaveUp {
            attempts: 3,
            source: Box::new(lock),
        };
        assert!(gave_up.is_lock_timeout());
    }

    #[test]
    fn task_error_carries_message_and_log_tail() {
        let e = PveError::Task {
            node: "pve1".into(),
            upid: "UPID:pve1:1".into(),
            kind: "vzstart".into(),
            exitstatus: "startup for container '901' failed".into(),
            log: vec![
                "run_buffer: 571 Script exited with status 1".into(),
                "startup for container '901' failed".into(),
                "TASK ERROR: startup for container '901' failed".into(),
            ],
        };
        assert_eq!(
            e.to_string(),
            "vzstart task on pve1 failed: startup for container '901' failed (task log: run_buffer: 571 Script exited with status 1)"
        );
    }
}
