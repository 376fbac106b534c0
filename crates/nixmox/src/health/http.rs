//! A small HTTP/1.1 client for checks: one `GET` per connection (`Connection: close`), over
//! plain TCP or rustls (ring), every read and write bounded by the check's deadline. It reads
//! at most [`BODY_LIMIT`] bytes of body, understands `Content-Length` and chunked encoding, and
//! never follows redirects by itself.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

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

/// `GET` with a deadline. The error says what happened instead of an answer, worded to follow
/// "got" (`connection refused`, `no answer within 5s`, `TLS: certificate not valid for …`).
pub fn get(ctx: &Context, req: &Request<'_>, deadline: Instant) -> Result<Response, String> {
    let to = ctx.route(req.ip, req.port);
    let left = remaining(deadline)?;
    let tcp = TcpStream::connect_timeout(&SocketAddr::V4(to), left)
        .map_err(|e| io_text(&e, "connect"))?;
    let _ = tcp.set_nodelay(true);
    let default_port = if req.https { 443 } else { 80 };
    let host_header = if req.port == default_port {
        req.host.to_string()
    } else {
        format!("{}:{}", req.host, req.port)
    };
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: nixmox-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        req.path
    );
    if req.https {
        let name = ServerName::try_from(req.host.to_string())
            .map_err(|e| format!("an invalid TLS server name `{}`: {e}", req.host))?;
        let conn = ClientConnection::new(ctx.tls.clone(), name)
            .map_err(|e| format!("TLS set-up failed: {e}"))?;
        let mut stream = StreamOwned::new(conn, tcp);
        exchange(&mut stream, head.as_bytes(), deadline, |s, t| {
            s.sock.set_read_timeout(Some(t))?;
            s.sock.set_write_timeout(Some(t))
        })
    } else {
        let mut stream = tcp;
        exchange(&mut stream, head.as_bytes(), deadline, |s, t| {
            s.set_read_timeout(Some(t))?;
            s.set_write_timeout(Some(t))
        })
    }
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("no answer in time".into())
    } else {
        Ok(left)
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

fn exchange<S: Read + Write>(
    s: &mut S,
    head: &[u8],
    deadline: Instant,
    set_timeouts: impl Fn(&mut S, Duration) -> io::Result<()>,
) -> Result<Response, String> {
    let left = remaining(deadline)?;
    set_timeouts(s, left).map_err(|e| io_text(&e, "set-up"))?;
    s.write_all(head)
        .and_then(|()| s.flush())
        .map_err(|e| io_text(&e, "sending the request"))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // The status, the headers, and where the body starts in `buf`.
    let mut parsed: Option<(Head, usize)> = None;
    loop {
        if let Some(((_, headers), body_at)) = &parsed {
            if complete(headers, &buf[*body_at..]) || buf.len() - body_at > BODY_LIMIT + 64 * 1024 {
                break;
            }
        }
        let left = remaining(deadline)?;
        set_timeouts(s, left).map_err(|e| io_text(&e, "reading"))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A TLS peer that closes without close_notify: the end of the answer.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && parsed.is_some() => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let during = if parsed.is_some() {
                    "reading the body"
                } else {
                    "waiting for the answer"
                };
                return Err(io_text(&e, during));
            }
        }
        if parsed.is_none() {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                parsed = Some((parse_head(&buf[..end])?, end + 4));
            } else if buf.len() > 64 * 1024 {
                return Err("an answer whose header is over 64 KiB".into());
            }
        }
    }
    let Some(((status, headers), body_at)) = parsed else {
        return Err(if buf.is_empty() {
            "the connection closed without an answer".into()
        } else {
            format!(
                "something that is not HTTP: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(80)])
            )
        });
    };
    let raw = &buf[body_at..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let mut body = if chunked {
        dechunk(raw)
    } else {
        match content_length(&headers) {
            Some(n) => raw[..raw.len().min(n)].to_vec(),
            None => raw.to_vec(),
        }
    };
    body.truncate(BODY_LIMIT);
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A status and the headers.
type Head = (u16, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status.filter(|_| version.starts_with("HTTP/")) else {
        return Err(format!(
            "something that is not HTTP: {:?}",
            &first[..first.len().min(80)]
        ));
    };
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok((status, headers))
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
}

/// Whether the body so far is the whole body.
fn complete(headers: &[(String, String)], body: &[u8]) -> bool {
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        return chunked_done(body);
    }
    content_length(headers).is_some_and(|n| body.len() >= n)
}

/// Walks chunk sizes; true once the last (zero-size) chunk and the final CRLF arrived.
fn chunked_done(body: &[u8]) -> bool {
    let mut i = 0;
    loop {
        let Some(eol) = find(&body[i..], b"\r\n") else {
            return false;
        };
        let line = String::from_utf8_lossy(&body[i..i + eol]);
        let size = line.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            // Malformed: stop reading, decode what there is.
            return true;
        };
        i += eol + 2;
        if n == 0 {
            // Optional trailers, then an empty line.
            return find(&body[i..], b"\r\n").is_some();
        }
        if body.len() < i + n + 2 {
            return false;
        }
        i += n + 2;
    }
}

fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(eol) = find(&body[i..], b"\r\n") {
        let line = String::from_utf8_lossy(&body[i..i + eol]);
        let Ok(n) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        i += eol + 2;
        if n == 0 {
            break;
        }
        let end = (i + n).min(body.len());
        out.extend_from_slice(&body[i..end]);
        i = end + 2;
        if i >= body.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded_and_known_complete() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
        assert!(chunked_done(body));
        assert!(!chunked_done(&body[..body.len() - 2]));
        assert!(!chunked_done(b"4\r\nWi"));
        assert_eq!(dechunk(body), b"Wikipedia");
    }

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

    #[test]
    fn heads_parse() {
        let (status, headers) =
            parse_head(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0").unwrap();
        assert_eq!(status, 302);
        assert_eq!(headers[0], ("Location".into(), "/x".into()));
        assert!(parse_head(b"SSH-2.0-OpenSSH").is_err());
    }
}
