//! HTTP(S) for checks: one `GET` through ureq (rustls with `ring`, the same TLS set-up as the
//! Proxmox client: webpki's roots plus the project's CA), bounded as a whole by the check's
//! deadline. It keeps at most [`BODY_LIMIT`] bytes of body and never follows redirects by
//! itself (the checks that follow one do it themselves, one hop at a time).

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::Context;

/// How much of a body is kept (enough for any health page or discovery document).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The rustls configuration checks use: webpki's public roots plus every certificate in each of
/// `ca_files` (the project's trust set, `crate::pki::trust_files`).
pub fn tls_config(ca_files: &[PathBuf]) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for path in ca_files {
        let bad = |why: String| format!("the CA file `{}`: {why}", path.display());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// In order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Decoded (chunked encoding removed), at most [`BODY_LIMIT`] bytes.
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What to fetch.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub https: bool,
    /// The name for the `Host` header and TLS (SNI and certificate check).
    pub host: &'a str,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: &'a str,
    /// The address to connect to (before [`Context::route`]).
    pub ip: Ipv4Addr,
}

/// A parsed `http(s)://` URL: (https, host, port, path and query).
pub fn parse_url(url: &str) -> Result<(bool, String, u16, String), String> {
    let u = nixmox_core::url::check(url)?;
    let https = u.scheme == "https";
    let port = u.port.unwrap_or(if https { 443 } else { 80 });
    let mut path = u.path;
    if let Some(i) = path.find('#') {
        path.truncate(i);
    }
    if path.starts_with('?') {
        path.insert(0, '/');
    }
    Ok((https, u.host.to_ascii_lowercase(), port, path))
}

/// `GET` with a deadline, through ureq (no redirects followed, at most [`BODY_LIMIT`] bytes of
/// body kept). The error says what happened instead of an answer, worded to follow "got"
/// (`connection refused`, `no answer in time`, `TLS: certificate not valid for …`).
pub fn get(ctx: &Context, req: &Request<'_>, deadline: Instant) -> Result<Response, String> {
    let to = SocketAddr::V4(ctx.route(req.ip, req.port));
    let left = remaining(deadline)?;
    // The URL carries the name (for `Host`, SNI and the certificate check); the resolver sends
    // the connection where the check points, whatever the name would resolve to.
    let agent = ureq::AgentBuilder::new()
        .tls_config(ctx.tls.clone())
        .resolver(move |_: &str| Ok(vec![to]))
        .timeout(left)
        .redirects(0)
        .user_agent("nixmox-health")
        .build();
    let scheme = if req.https { "https" } else { "http" };
    let url = format!("{scheme}://{}:{}{}", req.host, req.port, req.path);
    let response = match agent.get(&url).set("Accept", "*/*").call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(transport_text(&t)),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .flat_map(|name| {
            let values: Vec<String> = response.all(&name).iter().map(|v| v.to_string()).collect();
            values.into_iter().map(move |v| (name.clone(), v))
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .take(BODY_LIMIT as u64)
        .read_to_end(&mut body)
        .map_err(|e| io_text(&e, "reading the body"))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("no answer in time".into())
    } else {
        Ok(left)
    }
}

/// Words for a failure before any answer, to follow "got".
fn transport_text(t: &ureq::Transport) -> String {
    let io = std::error::Error::source(t).and_then(|e| e.downcast_ref::<io::Error>());
    match (t.kind(), io) {
        (_, Some(e)) => {
            let during = match t.kind() {
                ureq::ErrorKind::ConnectionFailed => "connect",
                _ => "waiting for the answer",
            };
            io_text(e, during)
        }
        (ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader, None) => {
            format!("something that is not HTTP: {}", t.message().unwrap_or(""))
        }
        _ => t.to_string(),
    }
}

/// Words for an I/O error, to follow "got".
pub fn io_text(e: &io::Error, during: &str) -> String {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return format!("TLS: {tls}");
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "the connection reset".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("no answer in time ({during})")
        }
        io::ErrorKind::UnexpectedEof => "the connection closed before an answer".into(),
        _ => format!("{e} ({during})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_what_a_request_needs() {
        assert_eq!(
            parse_url("https://Auth.Lan/a/b?x=1#frag").unwrap(),
            (true, "auth.lan".into(), 443, "/a/b?x=1".into())
        );
        assert_eq!(
            parse_url("http://10.0.0.1:8080").unwrap(),
            (false, "10.0.0.1".into(), 8080, "/".into())
        );
        assert!(parse_url("ftp://x").is_err());
    }
}
