//! NixMox's container snapshots as data: their names (recognisably NixMox's, naming the run
//! and the step), what a step snapshots, and which of a container's snapshots retention
//! deletes. The shell takes, rolls back and deletes them through the PVE API.
//!
//! A PVE snapshot name starts with a letter, holds only `[A-Za-z0-9_-]` and is at most 40
//! characters (`pve-configid` in PVE's schema); `current` and `vzdump` are reserved.

use crate::model::{Capability, Project, Service};
use crate::plan::Phase;

/// Every NixMox snapshot name starts with this.
pub const PREFIX: &str = "nixmox-r";
/// PVE's longest snapshot name.
pub const MAX_LEN: usize = 40;

/// Why a snapshot was taken: the part of its name after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Before `nix:core:S`.
    Core,
    /// Before `nix:core-auth:S`.
    Auth,
    /// Before `nix:service-config:S`.
    Service,
    /// The database host, before a deploy of a service that owns a database.
    Db,
    /// `nixmox snapshot create`.
    Manual,
    /// Before `down` destroys the container.
    Down,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Core => "core",
            Kind::Auth => "auth",
            Kind::Service => "svc",
            Kind::Db => "db",
            Kind::Manual => "man",
            Kind::Down => "down",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Core,
            Kind::Auth,
            Kind::Service,
            Kind::Db,
            Kind::Manual,
            Kind::Down,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The kind of snapshot a deploy step takes of its own host.
    pub fn of_phase(phase: Phase) -> Option<Kind> {
        match phase {
            Phase::NixCore => Some(Kind::Core),
            Phase::NixCoreAuth => Some(Kind::Auth),
            Phase::NixServiceConfig => Some(Kind::Service),
            _ => None,
        }
    }
}

/// A parsed NixMox snapshot name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name {
    /// The run (or, for `snapshot create`, the moment in seconds) that took it.
    pub run: i64,
    pub kind: Kind,
    /// The service, possibly shortened to fit.
    pub service: String,
}

/// `nixmox-r<run>-<kind>-<service>`, shortened to 40 characters with a hash of the full name
/// when the service's name is long.
pub fn name(run: i64, kind: Kind, service: &str) -> String {
    let head = format!("{PREFIX}{run}-{}-", kind.as_str());
    let clean: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let full = format!("{head}{clean}");
    if full.len() <= MAX_LEN {
        return full;
    }
    // Room for `_` and 6 hex digits of an FNV-1a hash of the whole service name.
    let mut h: u32 = 0x811c_9dc5;
    for b in service.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let room = MAX_LEN.saturating_sub(head.len() + 7);
    format!(
        "{head}{}_{:06x}",
        &clean[..room.min(clean.len())],
        h & 0xff_ffff
    )
}

/// The parts of a NixMox snapshot name; `None` for any other name.
pub fn parse(s: &str) -> Option<Name> {
    let rest = s.strip_prefix(PREFIX)?;
    let (run, rest) = rest.split_once('-')?;
    if run.is_empty() || !run.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (kind, service) = rest.split_once('-')?;
    Some(Name {
        run: run.parse().ok()?,
        kind: Kind::parse(kind)?,
        service: service.to_string(),
    })
}

/// The snapshot's description in PVE: who took it and why.
pub fn description(run: i64, step: &str) -> String {
    format!("taken by NixMox, run {run}, before {step}")
}

/// What a step snapshots first: its own host, and for a service that owns a database the
/// database host (its migrations change data there), when that is another container.
/// `(service whose host it is, kind)`.
pub fn targets<'p>(
    project: &'p Project,
    phase: Phase,
    service: &'p Service,
) -> Vec<(&'p Service, Kind)> {
    let Some(kind) = Kind::of_phase(phase) else {
        return Vec::new();
    };
    let mut out = vec![(service, kind)];
    if !service.dbs.is_empty() {
        if let Some(db) = project.provider(Capability::Database) {
            if db.host.vmid != service.host.vmid {
                out.push((db, Kind::Db));
            }
        }
    }
    out
}

/// Retention: of a container's snapshots that NixMox made (`ours`: name and PVE's snaptime),
/// the ones to delete so that the newest `keep` remain. Newest by run, then by snaptime.
pub fn to_prune(ours: &[(String, u64)], keep: u32) -> Vec<String> {
    let mut v: Vec<(i64, u64, &str)> = ours
        .iter()
        .filter_map(|(n, t)| parse(n).map(|p| (p.run, *t, n.as_str())))
        .collect();
    v.sort_by(|a, b| (b.0, b.1, b.2).cmp(&(a.0, a.1, a.2)));
    v.into_iter()
        .skip(keep as usize)
        .map(|(_, _, n)| n.to_string())
        .collect()
}

/// True when `s` is a valid PVE snapshot name (what `snapshot rollback SERVICE NAME` accepts).
pub fn valid_name(s: &str) -> bool {
    s.len() <= MAX_LEN
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s != "current"
        && s != "vzdump"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_pve_and_read_back() {
        let n = name(12, Kind::Service, "nextcloud");
        assert_eq!(n, "nixmox-r12-svc-nextcloud");
        assert!(valid_name(&n));
        assert_eq!(
            parse(&n),
            Some(Name {
                run: 12,
                kind: Kind::Service,
                service: "nextcloud".into()
            })
        );
        let long = name(
            123_456,
            Kind::Db,
            "a-service-with-a-really-long-name-indeed",
        );
        assert_eq!(long.len(), MAX_LEN, "{long}");
        assert!(valid_name(&long), "{long}");
        assert_eq!(parse(&long).unwrap().run, 123_456);
        assert_ne!(
            long,
            name(
                123_456,
                Kind::Db,
                "a-service-with-a-really-long-name-indeeb"
            )
        );
    }

    #[test]
    fn other_names_are_not_ours() {
        for n in [
            "before-upgrade",
            "nixmox",
            "nixmox-r-svc-x",
            "nixmox-rx1-svc-x",
            "nixmox-r1-zzz-x",
            "nixmox-r1",
        ] {
            assert_eq!(parse(n), None, "{n}");
        }
        assert!(!valid_name("1abc"));
        assert!(!valid_name("current"));
        assert!(!valid_name("a.b"));
    }

    #[test]
    fn retention_keeps_the_newest() {
        let ours: Vec<(String, u64)> = [1, 5, 3, 4, 2]
            .iter()
            .map(|r| (name(*r, Kind::Service, "app"), 100 + *r as u64))
            .collect();
        let mut gone = to_prune(&ours, 2);
        gone.sort();
        assert_eq!(
            gone,
            vec![
                "nixmox-r1-svc-app",
                "nixmox-r2-svc-app",
                "nixmox-r3-svc-app"
            ]
        );
        assert!(to_prune(&ours, 10).is_empty());
        // A name that is not ours is never chosen.
        assert!(to_prune(&[("mine".into(), 1)], 0).is_empty());
    }
}
