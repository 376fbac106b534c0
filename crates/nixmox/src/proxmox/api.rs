//! The PVE JSON API as one trait (`Api`: a single request, no retries), and its HTTP
//! implementation over `ureq` and rustls. Everything above it (retries, tasks, containers)
//! lives in `Client`, so it can be tested against an `Api` of the test's making.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::error::PveError;
use super::tls::{self, RejectionSlot, TlsSettings};

/// An HTTP method of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// One request to `/api2/json{path}`, answered with the `data` of PVE's reply. `params` go in
/// the query for GET and DELETE and in a form body for POST and PUT. Implementations do not
/// retry; `Client` decides what is safe to repeat.
pub trait Api: Send + Sync {
    fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError>;

    /// A multipart POST of `fields` and then the file (as the part `filename`), streamed.
    fn upload(
        &self,
        path: &str,
        fields: &[(String, String)],
        file: &Path,
        file_name: &str,
    ) -> Result<Value, PveError>;

    /// Where the API is, for messages.
    fn endpoint(&self) -> &str;
}

/// A value that must never be shown: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to authenticate.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// An API token, `user@realm!tokenid=secret`; `source` says where it came from, for
    /// messages (`$PROXMOX_API_TOKEN (proxmox.token)`).
    Token { token: Secret, source: String },
    /// A user and password, exchanged for a ticket (and a CSRF token for writes).
    Password { user: String, password: Secret },
}

impl Credentials {
    fn hint(&self) -> String {
        match self {
            Credentials::Token { source, .. } => format!(
                "check the API token in {source}: it must be `user@realm!tokenid=secret` of an existing, unexpired token"
            ),
            Credentials::Password { user, .. } => format!(
                "check the password of `{user}` in NIXMOX_PROXMOX_PASSWORD (the user comes from NIXMOX_PROXMOX_USER)"
            ),
        }
    }
    /// Every secret in these credentials, for scrubbing logs.
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Credentials::Token { token, .. } => {
                let mut v = vec![token.expose().to_string()];
                // The secret part alone, in case something echoes just that.
                if let Some((_, s)) = token.expose().rsplit_once('=') {
                    if s.len() >= 8 {
                        v.push(s.to_string());
                    }
                }
                v
            }
            Credentials::Password { password, .. } => vec![password.expose().to_string()],
        }
    }
}

/// Timeouts of the HTTP client.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest wait for any read or write on the socket (not for a whole upload).
    pub io_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            // PVE's synchronous calls wait up to 10 s for a config lock.
            io_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone)]
struct Session {
    ticket: Secret,
    csrf: Secret,
}

/// The API over HTTPS.
pub struct HttpApi {
    endpoint: String,
    agent: ureq::Agent,
    credentials: Credentials,
    session: Mutex<Option<Session>>,
    rejected: RejectionSlot,
}

impl fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpApi")
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl HttpApi {
    /// `endpoint` is the server's base URL, like `https://pve.example:8006` (a trailing `/` or
    /// `/api2/json` is accepted).
    pub fn new(
        endpoint: &str,
        credentials: Credentials,
        tls: &TlsSettings,
        opts: &HttpOptions,
    ) -> Result<HttpApi, PveError> {
        let mut endpoint = endpoint.trim().trim_end_matches('/').to_string();
        if let Some(base) = endpoint.strip_suffix("/api2/json") {
            endpoint = base.to_string();
        }
        if !endpoint.starts_with("https://") {
            return Err(PveError::Config(format!(
                "proxmox.endpoint `{endpoint}` must be an https:// URL (PVE's API is only served over TLS)"
            )));
        }
        let (config, rejected) = tls::client_config(tls)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(config)
            .timeout_connect(opts.connect_timeout)
            .timeout_read(opts.io_timeout)
            .timeout_write(opts.io_timeout)
            .redirects(0)
            .https_only(true)
            .user_agent(concat!("nixmox/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpApi {
            endpoint,
            agent,
            credentials,
            session: Mutex::new(None),
            rejected,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api2/json{path}", self.endpoint)
    }

    fn session(&self) -> Result<Session, PveError> {
        let Credentials::Password { user, password } = &self.credentials else {
            return Err(PveError::Config("no password credentials".into()));
        };
        if let Some(s) = self.session.lock().ok().and_then(|s| s.clone()) {
            return Ok(s);
        }
        let path = "/access/ticket";
        let result = self
            .agent
            .post(&self.url(path))
            .send_form(&[("username", user.as_str()), ("password", password.expose())]);
        let data = self.answer(Method::Post, path, result)?;
        let field = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .map(Secret::new)
                .ok_or_else(|| PveError::Protocol {
                    method: "POST".into(),
                    path: path.into(),
                    message: format!("no `{k}` in the answer (is two-factor authentication on for `{user}`? use an API token)"),
                })
        };
        if data.get("NeedTFA").is_some() {
            return Err(PveError::Auth {
                endpoint: self.endpoint.clone(),
                message: "two-factor authentication required".into(),
                hint: "use an API token (proxmox.token) for NixMox".into(),
            });
        }
        let s = Session {
            ticket: field("ticket")?,
            csrf: field("CSRFPreventionToken")?,
        };
        if let Ok(mut slot) = self.session.lock() {
            *slot = Some(s.clone());
        }
        Ok(s)
    }

    fn authorize(&self, req: ureq::Request, method: Method) -> Result<ureq::Request, PveError> {
        Ok(match &self.credentials {
            Credentials::Token { token, .. } => {
                req.set("Authorization", &format!("PVEAPIToken={}", token.expose()))
            }
            Credentials::Password { .. } => {
                let s = self.session()?;
                let req = req.set("Cookie", &format!("PVEAuthCookie={}", s.ticket.expose()));
                if method == Method::Get {
                    req
                } else {
                    req.set("CSRFPreventionToken", s.csrf.expose())
                }
            }
        })
    }

    fn once(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        let mut req = self.agent.request(method.as_str(), &self.url(path));
        req = self.authorize(req, method)?;
        let result = match method {
            Method::Get | Method::Delete => {
                for (k, v) in params {
                    req = req.query(k, v);
                }
                req.call()
            }
            Method::Post | Method::Put => {
                let pairs: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                req.send_form(&pairs)
            }
        };
        self.answer(method, path, result)
    }

    /// A ticket can expire (or be revoked) mid-run: log in again once.
    fn with_relogin(&self, f: impl Fn() -> Result<Value, PveError>) -> Result<Value, PveError> {
        match f() {
            Err(PveError::Auth { .. })
                if matches!(self.credentials, Credentials::Password { .. }) =>
            {
                if let Ok(mut s) = self.session.lock() {
                    *s = None;
                }
                f()
            }
            r => r,
        }
    }

    fn answer(
        &self,
        method: Method,
        path: &str,
        result: Result<ureq::Response, ureq::Error>,
    ) -> Result<Value, PveError> {
        let protocol = |message: String| PveError::Protocol {
            method: method.as_str().into(),
            path: path.into(),
            message,
        };
        match result {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| PveError::Connect {
                    url: self.url(path),
                    message: format!("reading the answer: {e}"),
                })?;
                let body: Value =
                    serde_json::from_str(&text).map_err(|e| protocol(format!("not JSON ({e})")))?;
                Ok(body.get("data").cloned().unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let reason = resp.status_text().trim().to_string();
                let text = resp.into_string().unwrap_or_default();
                let body: Option<Value> = serde_json::from_str(&text).ok();
                let message = body
                    .as_ref()
                    .and_then(|b| b.get("message"))
                    .and_then(Value::as_str)
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .unwrap_or(reason);
                let fields: std::collections::BTreeMap<String, String> = body
                    .as_ref()
                    .and_then(|b| b.get("errors"))
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| {
                                let v = v
                                    .as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| v.to_string());
                                (k.clone(), v.trim().to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Err(match status {
                    401 => PveError::Auth {
                        endpoint: self.endpoint.clone(),
                        message,
                        hint: self.credentials.hint(),
                    },
                    403 => PveError::Forbidden {
                        method: method.as_str().into(),
                        path: path.into(),
                        message,
                    },
                    400 if !fields.is_empty() => PveError::Params {
                        method: method.as_str().into(),
                        path: path.into(),
                        message,
                        fields,
                    },
                    _ => PveError::Api {
                        status,
                        method: method.as_str().into(),
                        path: path.into(),
                        message,
                    },
                })
            }
            Err(ureq::Error::Transport(t)) => {
                if let Some(r) = self.rejected.lock().ok().and_then(|mut s| s.take()) {
                    return Err(PveError::Tls(format!(
                        "refusing the TLS certificate of {}: {}. Its SHA-256 fingerprint is {}: if that is \
                         your node's certificate (compare with `pvenode cert info` on the node), pin it \
                         with proxmox.tls.fingerprint, or trust its CA with proxmox.tls.ca_file \
                         (/etc/pve/pve-root-ca.pem for PVE's own)",
                        self.endpoint, r.reason, r.fingerprint
                    )));
                }
                let mut message = t.kind().to_string();
                if let Some(m) = t.message() {
                    message.push_str(": ");
                    message.push_str(m);
                }
                if let Some(src) = std::error::Error::source(&t) {
                    message.push_str(&format!(": {src}"));
                }
                Err(PveError::Connect {
                    url: self.url(path),
                    message,
                })
            }
        }
    }
}

impl Api for HttpApi {
    fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        self.with_relogin(|| self.once(method, path, params))
    }

    fn upload(
        &self,
        path: &str,
        fields: &[(String, String)],
        file: &Path,
        file_name: &str,
    ) -> Result<Value, PveError> {
        self.with_relogin(|| {
            let f = std::fs::File::open(file).map_err(|e| {
                PveError::Config(format!("cannot read `{}`: {e}", file.display()))
            })?;
            let size = f
                .metadata()
                .map_err(|e| PveError::Config(format!("cannot read `{}`: {e}", file.display())))?
                .len();
            let boundary = format!("nixmox-{:016x}", random_u64());
            let mut head = String::new();
            for (k, v) in fields {
                head.push_str(&format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                ));
            }
            let quoted = file_name.replace(['"', '\r', '\n'], "_");
            head.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{quoted}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            ));
            let tail = format!("\r\n--{boundary}--\r\n");
            let len = head.len() as u64 + size + tail.len() as u64;
            let body = std::io::Cursor::new(head.into_bytes())
                .chain(f)
                .chain(std::io::Cursor::new(tail.into_bytes()));
            let req = self.agent.post(&self.url(path));
            let req = self
                .authorize(req, Method::Post)?
                .set(
                    "Content-Type",
                    &format!("multipart/form-data; boundary={boundary}"),
                )
                .set("Content-Length", &len.to_string());
            let result = req.send(body);
            self.answer(Method::Post, path, result)
        })
    }

    fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// Percent-encodes one path segment (a UPID, a volume id).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Keeps `Arc<dyn Api>` usable where an `Api` is expected.
impl<T: Api + ?Sized> Api for Arc<T> {
    fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        (**self).call(method, path, params)
    }
    fn upload(
        &self,
        path: &str,
        fields: &[(String, String)],
        file: &Path,
        file_name: &str,
    ) -> Result<Value, PveError> {
        (**self).upload(path, fields, file, file_name)
    }
    fn endpoint(&self) -> &str {
        (**self).endpoint()
    }
}

/// A random number for jitter and multipart boundaries (not for anything secret).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    // splitmix64
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credentials::Token {
            token: Secret::new("root@pam!nixmox=0b6a7c2e-secret"),
            source: "$PROXMOX_API_TOKEN (proxmox.token)".into(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("0b6a7c2e"), "{shown}");
        assert!(shown.contains("<redacted>"));
        let api = HttpApi::new(
            "https://127.0.0.1:8006/",
            c.clone(),
            &TlsSettings::default(),
            &HttpOptions::default(),
        )
        .unwrap();
        assert!(!format!("{api:?}").contains("0b6a7c2e"));
        assert_eq!(api.endpoint(), "https://127.0.0.1:8006");
        assert_eq!(
            c.secrets(),
            vec![
                "root@pam!nixmox=0b6a7c2e-secret".to_string(),
                "0b6a7c2e-secret".to_string()
            ]
        );
    }

    #[test]
    fn plain_http_is_refused() {
        let e = HttpApi::new(
            "http://pve:8006",
            Credentials::Password {
                user: "root@pam".into(),
                password: Secret::new("pw"),
            },
            &TlsSettings::default(),
            &HttpOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be an https:// URL"), "{e}");
    }

    #[test]
    fn upids_are_encoded() {
        assert_eq!(
            encode_segment("UPID:pve1:0000:root@pam!nixmox:"),
            "UPID%3Apve1%3A0000%3Aroot%40pam%21nixmox%3A"
        );
    }
}
