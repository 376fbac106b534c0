//! Validated identifiers: names, hostnames, domains, VM ids, networks.
//!
//! Each type is built only through a checking constructor, so a value of the type is proof that
//! it is well-formed and renderers can put it into generated code without escaping.

use core::fmt;
use core::net::Ipv4Addr;

/// Why an identifier was rejected, in words that follow "invalid X `value`: ".
pub type Reason = String;

/// A grammar check of one kind of string (`check_bridge`, `check_node`, …).
pub type Grammar = fn(&str) -> Result<(), Reason>;

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

string_id!(
    /// The login name NixMox uses on every host (`ssh.user`): a POSIX portable user name,
    /// `[a-z_][a-z0-9_-]*`, at most 32 characters. It can never start with `-`, so no tool
    /// reads it as an option.
    SshUser,
    check_user
);

string_id!(
    /// A user or group on a host (`interface.db.sops.owner`, `…group`): the same POSIX portable
    /// name grammar as a login name.
    UnixName,
    check_user
);

fn check_user(s: &str) -> Result<(), Reason> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err("it is empty".into()),
        Some(c) if !(c.is_ascii_lowercase() || c == '_') => {
            return Err(format!(
                "it starts with `{}`; a login name starts with a lowercase letter or `_`",
                c.escape_default()
            ))
        }
        _ => {}
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "`{}` is not allowed; use lowercase letters, digits, `_` and `-`",
            c.escape_default()
        ));
    }
    if s.len() > 32 {
        return Err(format!(
            "it is {} characters long; the limit is 32",
            s.len()
        ));
    }
    Ok(())
}

/// The key types OpenSSH accepts in `authorized_keys`.
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One OpenSSH public key line: `type base64 [comment]`, on one line. A newline, carriage
/// return or any other control character would make it two keys (or an option line) in
/// `authorized_keys`, so none is allowed anywhere in it.
pub fn check_ssh_public_key(s: &str, types: &[&str]) -> Result<(), Reason> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "it contains the control character `{}`; a key is one line",
            c.escape_default()
        ));
    }
    let mut parts = s.splitn(3, ' ');
    let kind = parts.next().unwrap_or("");
    if !types.contains(&kind) {
        return Err(format!(
            "`{kind}` is not a key type (expected one of: {})",
            types.join(", ")
        ));
    }
    let blob = parts.next().unwrap_or("");
    let b64 = blob.len() >= 20
        && blob
            .trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !b64 {
        return Err("the key's second word is not base64 key data".into());
    }
    Ok(())
}

/// An age X25519 recipient: `age1` and 58 bech32 characters. Checked character by character
/// so a value can never carry a `,` (sops's recipient separator) or anything else.
pub fn check_age_recipient(s: &str) -> Result<(), Reason> {
    let ok = s.len() == 62
        && s.starts_with("age1")
        && s[4..]
            .bytes()
            .all(|b| b"qpzry9x8gf2tvdw0s3jn54khce6mua7l".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("an age recipient is `age1` followed by 58 bech32 characters".into())
    }
}

/// A Proxmox storage id (PVE's `pve-storage-id`): a letter, then letters, digits, `-`, `_`
/// and `.`, ending in a letter or digit.
pub fn check_storage_id(s: &str) -> Result<(), Reason> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("a storage id starts with a letter and uses letters, digits, `-`, `_` and `.`".into())
    }
}

/// A Proxmox node name: one DNS label (letters in either case, digits, `-`).
pub fn check_node(s: &str) -> Result<(), Reason> {
    check_label(&s.to_ascii_lowercase())
}

/// A Linux network interface name usable as a Proxmox bridge: 1 to 15 characters, a letter
/// first, then letters, digits, `_`, `.` and `-`.
pub fn check_bridge(s: &str) -> Result<(), Reason> {
    let b = s.as_bytes();
    let ok = (1..=15).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("a bridge is a Linux interface name: a letter, then letters, digits, `_`, `.` or `-`, at most 15 characters".into())
    }
}

/// A Proxmox volume id for a container template (`local:vztmpl/nixos.tar.xz`): `storage:`,
/// then a path of letters, digits and `._-+/`.
pub fn check_volume_id(s: &str) -> Result<(), Reason> {
    let Some((storage, path)) = s.split_once(':') else {
        return Err("a volume id is `storage:path`, like local:vztmpl/nixos.tar.xz".into());
    };
    check_storage_id(storage)?;
    let ok = !path.is_empty()
        && !path.starts_with('-')
        && !path.split('/').any(|seg| seg == "..")
        && path
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+' | b'/'));
    if ok {
        Ok(())
    } else {
        Err("the path after `storage:` uses letters, digits and `._-+/`".into())
    }
}

/// A Terraform resource address (`authentik_provider_oauth2.app`,
/// `module.db.postgresql_role.r["x"]`): dot-separated names, each optionally indexed.
pub fn check_tf_address(s: &str) -> Result<(), Reason> {
    let bad = || {
        Err(format!(
            "`{}` is not a Terraform resource address (like `module.db.postgresql_role.app`)",
            s.escape_default()
        ))
    };
    if s.is_empty() || s.len() > 512 {
        return bad();
    }
    let mut parts = 0;
    for seg in s.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, Some(rest)),
            None => (seg, None),
        };
        let name_ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let index_ok = match index {
            None => true,
            Some(i) => {
                let Some(inner) = i.strip_suffix(']') else {
                    return bad();
                };
                inner.bytes().all(|b| b.is_ascii_digit()) && !inner.is_empty()
                    || (inner.len() >= 2
                        && inner.starts_with('"')
                        && inner.ends_with('"')
                        && inner[1..inner.len() - 1]
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-./:".contains(c)))
            }
        };
        if !(name_ok && index_ok) {
            return bad();
        }
        parts += 1;
    }
    if parts < 2 {
        return bad();
    }
    Ok(())
}

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
    fn hostile_identifiers() {
        assert!(SshUser::new("ops").is_ok());
        assert!(SshUser::new("_svc-1").is_ok());
        assert!(SshUser::new("-oProxyCommand=touch /tmp/x").is_err());
        assert!(SshUser::new("root@evil").is_err());
        assert!(SshUser::new("a\nb").is_err());
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q me@x";
        assert!(check_ssh_public_key(key, SSH_KEY_TYPES).is_ok());
        assert!(
            check_ssh_public_key(&format!("{key}\nssh-ed25519 AAAAevil"), SSH_KEY_TYPES).is_err()
        );
        assert!(check_ssh_public_key(&format!("{key}\r"), SSH_KEY_TYPES).is_err());
        assert!(check_ssh_public_key("command=\"sh\" ssh-ed25519 AAAA", SSH_KEY_TYPES).is_err());
        assert!(check_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
        )
        .is_ok());
        assert!(check_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmc,c8p"
        )
        .is_err());
        assert!(check_bridge("vmbr0").is_ok());
        assert!(check_bridge("vmbr0\"}").is_err());
        assert!(check_bridge("${x}").is_err());
        assert!(check_storage_id("local-lvm").is_ok());
        assert!(check_storage_id("../x").is_err());
        assert!(check_volume_id("local:vztmpl/nixos-25.05-x86_64-linux.tar.xz").is_ok());
        assert!(check_volume_id("local:../../etc").is_err());
        assert!(check_node("pve1").is_ok());
        assert!(check_node("pve/../x").is_err());
        assert!(check_tf_address("authentik_provider_oauth2.app").is_ok());
        assert!(check_tf_address("module.db.postgresql_role.r[\"x\"]").is_ok());
        assert!(check_tf_address("-destroy").is_err());
        assert!(check_tf_address("a.b c").is_err());
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
