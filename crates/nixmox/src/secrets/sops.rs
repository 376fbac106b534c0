//! The `sops` binary, run through [`crate::exec`] (an argv, never a shell). Plaintext goes in
//! on stdin and comes out on stdout, never through a file; stdout is captured as data (never
//! logged) and every known secret is passed to exec's redaction for anything that is logged.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tree::{self, Flat};
use crate::exec::{self, Cmd, RunOpts};

/// The environment variable naming the sops binary (default: `sops` on `PATH`).
pub const SOPS_ENV: &str = "NIXMOX_SOPS";

#[derive(Debug, thiserror::Error)]
pub enum SopsError {
    #[error("{0}")]
    Exec(#[from] exec::ExecError),
    /// No identity available to this process decrypts the file.
    #[error("no age identity available here can decrypt `{}`: set SOPS_AGE_KEY_FILE to a key file holding the identity of one of `secrets.age_recipients`", path.display())]
    NoKey { path: PathBuf },
    #[error("sops could not decrypt `{}` (exit {code}): {message}", path.display())]
    Decrypt {
        path: PathBuf,
        code: i32,
        message: String,
    },
    #[error("sops could not encrypt `{name}` (exit {code}): {message}")]
    Encrypt {
        name: String,
        code: i32,
        message: String,
    },
    #[error("`{}` did not decrypt to a mapping of secrets: {detail}", path.display())]
    Shape { path: PathBuf, detail: String },
    #[error("{0}")]
    Names(String),
}

/// How to run sops.
#[derive(Clone, Debug)]
pub struct Sops {
    pub binary: OsString,
    /// Extra environment (tests point `SOPS_AGE_KEY_FILE` here; normally inherited).
    pub env: Vec<(OsString, OsString)>,
    pub timeout: Duration,
}

impl Default for Sops {
    fn default() -> Self {
        Sops {
            binary: std::env::var_os(SOPS_ENV)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "sops".into()),
            env: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The last lines of stderr, for an error message (already redacted by exec).
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(4);
    let t = lines[start..].join(" | ");
    if t.is_empty() {
        "no message".into()
    } else {
        t
    }
}

impl Sops {
    fn cmd(&self) -> Cmd {
        let mut c = Cmd::new(&self.binary);
        c.env = self.env.clone();
        // Never ask GitHub for a newer release.
        c.env
            .push(("SOPS_DISABLE_VERSION_CHECK".into(), "1".into()));
        c
    }

    /// Encrypts `plain` for `recipients`, returning the encrypted YAML. `name` is the file name
    /// sops sees (it picks the format from it); nothing is written.
    pub fn encrypt(
        &self,
        plain: &Flat,
        recipients: &[String],
        name: &str,
        log: Option<&Path>,
        redact: &[String],
    ) -> Result<Vec<u8>, SopsError> {
        let yaml = tree::to_yaml(plain).map_err(SopsError::Names)?;
        // `--config /dev/null`: a `.sops.yaml` of the project must not add or change keys.
        let cmd = self.cmd().args([
            "--config",
            "/dev/null",
            "encrypt",
            "--input-type",
            "yaml",
            "--output-type",
            "yaml",
            "--filename-override",
            name,
            "--age",
            &recipients.join(","),
        ]);
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: log.map(Path::to_path_buf),
            redact: redact.to_vec(),
            stdin: Some(yaml.into_bytes()),
            stdout_is_data: true,
            ..RunOpts::default()
        };
        let fin = exec::run(&cmd, &opts)?;
        if !fin.success() {
            return Err(SopsError::Encrypt {
                name: name.to_string(),
                code: fin.code.unwrap_or(-1),
                message: tail(&fin.stderr),
            });
        }
        Ok(fin.stdout.into_bytes())
    }

    /// Decrypts a file to its flat names and values. Fails with [`SopsError::NoKey`] when no
    /// identity here matches, [`SopsError::Decrypt`] when the file is damaged or tampered with.
    pub fn decrypt(
        &self,
        path: &Path,
        log: Option<&Path>,
        redact: &[String],
    ) -> Result<Flat, SopsError> {
        let cmd = self
            .cmd()
            .args(["decrypt", "--output-type", "json"])
            .arg(path);
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: log.map(Path::to_path_buf),
            redact: redact.to_vec(),
            stdout_is_data: true,
            ..RunOpts::default()
        };
        let fin = exec::run(&cmd, &opts)?;
        if !fin.success() {
            let code = fin.code.unwrap_or(-1);
            // sops exits 128 when it cannot get the data key (no matching identity).
            if code == 128 || fin.stderr.contains("Failed to get the data key") {
                return Err(SopsError::NoKey {
                    path: path.to_path_buf(),
                });
            }
            return Err(SopsError::Decrypt {
                path: path.to_path_buf(),
                code,
                message: tail(&fin.stderr),
            });
        }
        let json: serde_json::Value =
            serde_json::from_str(&fin.stdout).map_err(|e| SopsError::Shape {
                path: path.to_path_buf(),
                detail: format!("not JSON: {}", e.classify_name()),
            })?;
        if !json.is_object() {
            return Err(SopsError::Shape {
                path: path.to_path_buf(),
                detail: "not a mapping".into(),
            });
        }
        Ok(tree::from_json(&json))
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The kind of JSON error only: its message could quote plaintext.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "data error",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}
