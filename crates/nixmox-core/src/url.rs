//! A small, strict reader of http(s) URLs, enough to reject what cannot work before deploying.

use crate::ids::DomainName;

/// The parts of an http(s) URL NixMox looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
    /// Always starts with `/`.
    pub path: String,
}

/// Checks an `http://` or `https://` URL: a valid host name or IPv4 address, an optional port
/// in 1-65535, and an optional path.
pub fn check(s: &str) -> Result<Url, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| "it has no scheme; start it with https:// or http://".to_string())?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "the scheme `{scheme}` is not supported; use https or http"
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace".into());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err("credentials in URLs are not allowed".into());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))?;
            (h, Some(port))
        }
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("it has no host".into());
    }
    let is_ip = host.parse::<core::net::Ipv4Addr>().is_ok();
    if !is_ip {
        if let Err(why) = DomainName::new(&host.to_ascii_lowercase()) {
            if host != "localhost" {
                return Err(format!("the host `{host}` is not valid: {why}"));
            }
        }
    }
    let path = if tail.is_empty() || !tail.starts_with('/') {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    Ok(Url {
        scheme: scheme.to_string(),
        host: host.to_ascii_lowercase(),
        port,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = check("https://guac.nixmox.lan/guacamole/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("guac.nixmox.lan", None, "/guacamole/")
        );
        let u = check("http://127.0.0.1:8280").unwrap();
        assert_eq!((u.port, u.path.as_str()), (Some(8280), "/"));
        assert!(check("ftp://x.lan").is_err());
        assert!(check("guac.nixmox.lan").is_err());
        assert!(check("https://bad_host.lan/").is_err());
        assert!(check("https://x.lan:99999/").is_err());
        assert!(check("https://").is_err());
    }
}
