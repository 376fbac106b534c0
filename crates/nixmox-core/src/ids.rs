//! Validated identifiers: names, hostnames, domains, VM ids, networks.
//!
//! Each type is built only through a checking constructor, so a value of the type is proof that
//! it is well-formed and renderers can put it into generated code without escaping.

use core::fmt;
use core::net::Ipv4Addr;

/// Why an identifier was rejected, in words that follow "invalid X `value`: ".
pub type Reason = String;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: &str) -> Result<Self, Reason> {
                $check(s).map(|()| $name(s.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A service's name: `[a-z][a-z0-9-]*`, at most 63 characters, so it can be a hostname.
    ServiceName,
    check_name
);
string_id!(
    /// The project's name: `[a-z][a-z0-9-]*`, at most 63 characters.
    ProjectName,
    check_name
);
string_id!(
    /// One DNS label (RFC 1123), lowercase: a host's short name.
    Hostname,
    check_label
);
string_id!(
    /// A fully qualified domain name (RFC 1123), lowercase, without a trailing dot.
    DomainName,
    check_domain
);

fn check_name(s: &str) -> Result<(), Reason> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err("it is empty".into()),
        Some(c) if !c.is_ascii_lowercase() => {
            return Err("it must start with a lowercase letter (a-z)".into())
        }
        _ => {}
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "`{c}` is not allowed; use lowercase letters, digits and `-`"
        ));
    }
    if s.ends_with('-') {
        return Err("it must not end with `-`".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "it is {} characters long; the limit is 63",
            s.len()
        ));
    }
    Ok(())
}

fn check_label(s: &str) -> Result<(), Reason> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "the label `{s}` is {} characters long; a DNS label holds at most 63",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if c.is_ascii_uppercase() {
            "; write it in lowercase".to_string()
        } else {
            String::new()
        };
        return Err(format!(
            "`{c}` is not allowed in a host name (RFC 1123: letters, digits and `-`){hint}"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("a label must not start or end with `-`".into());
    }
    Ok(())
}

fn check_domain(s: &str) -> Result<(), Reason> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > 253 {
        return Err(format!(
            "it is {} characters long; the limit is 253",
            s.len()
        ));
    }
    if s.ends_with('.') {
        return Err("remove the trailing `.`".into());
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (`..`)".into());
        }
        check_label(label)?;
    }
    if s.rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label must not be all digits".into());
    }
    Ok(())
}

/// A Proxmox guest id: 100 to 999,999,999 (ids below 100 are reserved by Proxmox).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(u32);

impl VmId {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 999_999_999;

    pub fn new(n: i64) -> Result<Self, Reason> {
        if n < i64::from(Self::MIN) {
            return Err(format!("{n} is below 100; Proxmox reserves ids 0-99"));
        }
        if n > i64::from(Self::MAX) {
            return Err(format!("{n} is above Proxmox's maximum of 999999999"));
        }
        Ok(VmId(
            u32::try_from(n).map_err(|_| "out of range".to_string())?,
        ))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An IPv4 network in CIDR notation, stored with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            "expected an address and a prefix length, like 192.168.1.0/24".to_string()
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("`{prefix}` is not a prefix length (0-32)"))?;
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(format!(
                "`{addr}` has host bits set for a /{prefix}; the network is {network}/{prefix}"
            ));
        }
        Ok(Cidr { network, prefix })
    }
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }
    /// True for the network and broadcast addresses of networks that have them (not /31, /32).
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.prefix < 31 && (ip == self.network || ip == self.broadcast())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// An inclusive range written `start-end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range<T> {
    pub start: T,
    pub end: T,
}

pub fn parse_ip(s: &str) -> Result<Ipv4Addr, Reason> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(ServiceName::new("guacamole").is_ok());
        assert!(ServiceName::new("Guacamole").is_err());
        assert!(ServiceName::new("1abc").is_err());
        assert!(ServiceName::new("a_b").is_err());
        assert!(Hostname::new("web-1").is_ok());
        assert!(Hostname::new("-web").is_err());
        assert!(Hostname::new(&"a".repeat(64)).is_err());
        assert!(DomainName::new("guac.nixmox.lan").is_ok());
        assert!(DomainName::new("guac..lan").is_err());
        assert!(DomainName::new("bad_name.lan").is_err());
        assert!(DomainName::new("1.2.3.4").is_err());
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("192.168.99.0/24").unwrap();
        assert_eq!(c.broadcast(), Ipv4Addr::new(192, 168, 99, 255));
        assert!(c.contains(Ipv4Addr::new(192, 168, 99, 7)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 98, 7)));
        assert!(c.is_reserved(Ipv4Addr::new(192, 168, 99, 0)));
        assert!(Cidr::parse("192.168.99.1/24").is_err());
        assert!(Cidr::parse("192.168.99.0/33").is_err());
        assert!(Cidr::parse("192.168.99.0").is_err());
    }

    #[test]
    fn vmids() {
        assert!(VmId::new(99).is_err());
        assert!(VmId::new(100).is_ok());
        assert!(VmId::new(1_000_000_000).is_err());
    }
}
