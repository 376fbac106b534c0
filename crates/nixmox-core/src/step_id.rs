//! Step ids (`tf:infra`, `nix:service-config:app`, `verify:app`): the one place they are
//! built, parsed, and turned into the names derived from them (a Terraform step's rendered
//! configuration and data directories, a step's log file).
//!
//! The text form is what the plan's JSON (`docs/plan-json.md`), the state store, events and
//! the command line carry; [`StepId`]'s `Display`, `FromStr` and serde all use it, so no
//! format changes with the type.

use core::borrow::Borrow;
use core::fmt;
use core::str::FromStr;

use crate::ids::ServiceName;
use crate::plan::Phase;

/// A step of the plan: a phase, and the service it belongs to unless the phase is one step for
/// the whole project (`tf:infra`, `tf:auth-core`). Built from a phase and a valid service
/// name, or parsed from its text. A parsed id's service is taken as written, whatever its
/// characters: ids come back from the state store, which may name services no longer valid
/// (or be tampered with), and such an orphan is still shown, escaped (issue 13). Everything
/// derived from an id escapes what a service name could not hold.
///
/// Ordered, compared and hashed as its text (so a map keyed by `StepId` can be read with a
/// `&str`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId {
    /// `phase` then, for a service's step, `:` and the service's name.
    text: String,
    phase: Phase,
}

/// Why a string is not a step id. Messages follow "invalid step id `…`: ".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepIdError {
    #[error("it names no phase (the phases: {})", phase_list())]
    UnknownPhase,
    #[error("`{phase}` is one step for the whole project and takes no service")]
    UnexpectedService { phase: &'static str },
    #[error("`{phase}` is a step of one service: `{phase}:SERVICE`")]
    MissingService { phase: &'static str },
    #[error("the service name after `{phase}:` is empty")]
    EmptyService { phase: &'static str },
}

/// A string that is not a step id, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid step id `{}`: {reason}", crate::diag::visible(.id))]
pub struct ParseStepIdError {
    pub id: String,
    pub reason: StepIdError,
}

fn phase_list() -> String {
    Phase::ALL
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl StepId {
    /// The step of `phase` for `service`, or the project-wide step of `phase` (`None`).
    /// Fails when the phase does not take a service and one is given, or the reverse.
    pub fn new(phase: Phase, service: Option<&ServiceName>) -> Result<StepId, StepIdError> {
        match (phase.is_project_wide(), service) {
            (true, None) => Ok(StepId {
                text: phase.as_str().to_string(),
                phase,
            }),
            (false, Some(s)) => Ok(StepId {
                text: format!("{}:{s}", phase.as_str()),
                phase,
            }),
            (true, Some(_)) => Err(StepIdError::UnexpectedService {
                phase: phase.as_str(),
            }),
            (false, None) => Err(StepIdError::MissingService {
                phase: phase.as_str(),
            }),
        }
    }

    /// The project-wide step of a phase that has one (`tf:infra`, `tf:auth-core`).
    pub fn project_wide(phase: Phase) -> Result<StepId, StepIdError> {
        StepId::new(phase, None)
    }

    /// A service's step of a phase that has one per service.
    pub fn of_service(phase: Phase, service: &ServiceName) -> Result<StepId, StepIdError> {
        StepId::new(phase, Some(service))
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The service the step belongs to; `None` for a project-wide step.
    pub fn service(&self) -> Option<&str> {
        self.text
            .get(self.phase.as_str().len()..)
            .and_then(|rest| rest.strip_prefix(':'))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_terraform(&self) -> bool {
        self.phase.is_terraform()
    }

    /// A Terraform step's configuration as the renderer writes it, relative to the build
    /// directory: `terraform/infra`, `terraform/auth-core`, `terraform/services/S/infra`,
    /// `terraform/services/S/config`. `None` for a step that is not Terraform's.
    pub fn terraform_config_dir(&self) -> Option<String> {
        let service = self.service();
        match (self.phase, service) {
            (Phase::TfInfra, _) => Some("terraform/infra".into()),
            (Phase::TfAuthCore, _) => Some("terraform/auth-core".into()),
            (Phase::TfServiceInfra, Some(s)) => Some(format!("terraform/services/{s}/infra")),
            (Phase::TfServiceConfig, Some(s)) => Some(format!("terraform/services/{s}/config")),
            _ => None,
        }
    }

    /// The name of a Terraform step's data directory (its state, providers and saved plans)
    /// under `.nixmox/terraform/`: the id without `tf:`, each `:` written `--`
    /// (`tf:service-infra:app` → `service-infra--app`), any character a file name should not
    /// hold written `_`, and never `.` or `..`. `None` for a step that is not Terraform's.
    pub fn terraform_data_dir(&self) -> Option<String> {
        let rest = self.text.strip_prefix("tf:")?;
        let mut slug = String::with_capacity(rest.len() + 4);
        for c in rest.chars() {
            match c {
                ':' => slug.push_str("--"),
                c if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') => slug.push(c),
                _ => slug.push('_'),
            }
        }
        if slug.is_empty() || slug.chars().all(|c| c == '.') {
            slug.insert(0, '_');
        }
        Some(slug)
    }

    /// The name of the step's log file in a run's log directory: the id with each `:` written
    /// `_` (`nix:core:dns` → `nix_core_dns.log`).
    pub fn log_file_name(&self) -> String {
        format!("{}.log", self.text.replace(':', "_"))
    }
}

impl fmt::Display for StepId {
    /// The text, padded as the format asks (`{:<width$}` lines ids up in tables).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.text)
    }
}

impl fmt::Debug for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl FromStr for StepId {
    type Err = ParseStepIdError;

    fn from_str(id: &str) -> Result<StepId, ParseStepIdError> {
        let err = |reason| ParseStepIdError {
            id: id.to_string(),
            reason,
        };
        // Longest phase names first, so `nix:core-auth:x` is not read as `nix:core` with the
        // service `-auth:x`, nor `tf:service-infra` as something shorter.
        let mut phases = Phase::ALL;
        phases.sort_by_key(|p| core::cmp::Reverse(p.as_str().len()));
        for phase in phases {
            if id == phase.as_str() {
                return StepId::new(phase, None).map_err(err);
            }
            let Some(service) = id
                .strip_prefix(phase.as_str())
                .and_then(|r| r.strip_prefix(':'))
            else {
                continue;
            };
            if phase.is_project_wide() {
                return Err(err(StepIdError::UnexpectedService {
                    phase: phase.as_str(),
                }));
            }
            if service.is_empty() {
                return Err(err(StepIdError::EmptyService {
                    phase: phase.as_str(),
                }));
            }
            return Ok(StepId {
                text: id.to_string(),
                phase,
            });
        }
        Err(err(StepIdError::UnknownPhase))
    }
}

/// A step id reads as its text wherever a `&str` is wanted (map lookups, printing, widths).
impl core::ops::Deref for StepId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl AsRef<str> for StepId {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl Borrow<str> for StepId {
    fn borrow(&self) -> &str {
        &self.text
    }
}

impl PartialEq<str> for StepId {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for StepId {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl PartialEq<String> for StepId {
    fn eq(&self, other: &String) -> bool {
        &self.text == other
    }
}

impl PartialEq<StepId> for String {
    fn eq(&self, other: &StepId) -> bool {
        *self == other.text
    }
}

impl PartialEq<StepId> for str {
    fn eq(&self, other: &StepId) -> bool {
        self == other.text
    }
}

impl PartialEq<StepId> for &str {
    fn eq(&self, other: &StepId) -> bool {
        *self == other.text
    }
}

impl serde::Serialize for StepId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for StepId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StepId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    /// Valid service names that look like parts of other ids.
    const AWKWARD: &[&str] = &[
        "a",
        "app",
        "a--b",
        "infra",
        "core",
        "auth",
        "core-auth",
        "service-infra",
        "service-config",
        "verify",
        "tf",
        "nix",
        "x9-9",
        "abcdefghijklmnopqrstuvwxyz-0123456789-abcdefghijklmnopqrstuvwxy",
    ];

    #[test]
    fn every_phase_round_trips_through_its_text_and_serde() {
        for phase in Phase::ALL {
            let ids: Vec<StepId> = if phase.is_project_wide() {
                vec![StepId::project_wide(phase).unwrap()]
            } else {
                AWKWARD
                    .iter()
                    .map(|s| StepId::of_service(phase, &name(s)).unwrap())
                    .collect()
            };
            for id in ids {
                let text = id.to_string();
                let back: StepId = text.parse().unwrap();
                assert_eq!(back, id, "{text}");
                assert_eq!(back.phase(), phase, "{text}");
                assert_eq!(back.service(), id.service(), "{text}");
                let json = serde_json::to_string(&id).unwrap();
                assert_eq!(json, format!("\"{text}\""));
                assert_eq!(serde_json::from_str::<StepId>(&json).unwrap(), id);
            }
        }
    }

    #[test]
    fn the_text_is_the_phase_then_the_service() {
        assert_eq!(
            StepId::project_wide(Phase::TfInfra).unwrap().as_str(),
            "tf:infra"
        );
        let id = StepId::of_service(Phase::NixCoreAuth, &name("core-auth")).unwrap();
        assert_eq!(id.as_str(), "nix:core-auth:core-auth");
        assert_eq!(id.service(), Some("core-auth"));
        let id: StepId = "nix:core:auth".parse().unwrap();
        assert_eq!((id.phase(), id.service()), (Phase::NixCore, Some("auth")));
        let id: StepId = "nix:core-auth:pgadmin".parse().unwrap();
        assert_eq!(
            (id.phase(), id.service()),
            (Phase::NixCoreAuth, Some("pgadmin"))
        );
        let id: StepId = "tf:service-infra:infra".parse().unwrap();
        assert_eq!(
            (id.phase(), id.service()),
            (Phase::TfServiceInfra, Some("infra"))
        );
        assert_eq!(
            StepId::project_wide(Phase::TfAuthCore).unwrap().service(),
            None
        );
    }

    #[test]
    fn what_is_not_a_step_id_says_why() {
        let reason = |s: &str| s.parse::<StepId>().unwrap_err().reason;
        assert_eq!(reason(""), StepIdError::UnknownPhase);
        assert_eq!(reason("tf"), StepIdError::UnknownPhase);
        assert_eq!(reason("nix:web"), StepIdError::UnknownPhase);
        assert_eq!(reason("verify-app"), StepIdError::UnknownPhase);
        assert_eq!(
            reason("tf:infra:web"),
            StepIdError::UnexpectedService { phase: "tf:infra" }
        );
        assert_eq!(
            reason("verify"),
            StepIdError::MissingService { phase: "verify" }
        );
        assert_eq!(
            reason("nix:core:"),
            StepIdError::EmptyService { phase: "nix:core" }
        );
        let e = "tf:a\u{1b}b".parse::<StepId>().unwrap_err().to_string();
        assert!(e.starts_with("invalid step id `tf:a\\u{1b}b`: "), "{e}");
        assert!(serde_json::from_str::<StepId>("\"nix:core\"").is_err());
        assert_eq!(
            StepId::new(Phase::Verify, None),
            Err(StepIdError::MissingService { phase: "verify" })
        );
        assert_eq!(
            StepId::new(Phase::TfInfra, Some(&name("web"))),
            Err(StepIdError::UnexpectedService { phase: "tf:infra" })
        );
    }

    /// The names derived from an id are the ones NixMox used before the type existed
    /// (`terraform::workspace_slug`, the runner's and `drift`'s log names, the renderer's
    /// paths), so existing `.nixmox/terraform/` directories and logs are found again.
    #[test]
    fn derived_names_match_the_existing_layout() {
        fn slug(step_id: &str) -> String {
            // `terraform::workspace_slug` as it was.
            let id = step_id.strip_prefix("tf:").unwrap_or(step_id);
            let mut slug = String::new();
            for c in id.chars() {
                match c {
                    ':' => slug.push_str("--"),
                    c if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') => slug.push(c),
                    _ => slug.push('_'),
                }
            }
            if slug.is_empty() || slug.chars().all(|c| c == '.') {
                slug.insert(0, '_');
            }
            slug
        }
        for phase in Phase::ALL {
            let ids: Vec<StepId> = if phase.is_project_wide() {
                vec![StepId::project_wide(phase).unwrap()]
            } else {
                AWKWARD
                    .iter()
                    .map(|s| StepId::of_service(phase, &name(s)).unwrap())
                    .collect()
            };
            for id in ids {
                let text = id.as_str();
                assert_eq!(
                    id.log_file_name(),
                    format!("{}.log", text.replace(':', "_"))
                );
                assert_eq!(id.terraform_data_dir().is_some(), phase.is_terraform());
                assert_eq!(id.terraform_config_dir().is_some(), phase.is_terraform());
                if phase.is_terraform() {
                    assert_eq!(id.terraform_data_dir().unwrap(), slug(text), "{text}");
                }
            }
        }
        let id = |s: &str| s.parse::<StepId>().unwrap();
        assert_eq!(
            id("tf:service-infra:app").terraform_data_dir().as_deref(),
            Some("service-infra--app")
        );
        assert_eq!(
            id("tf:infra").terraform_data_dir().as_deref(),
            Some("infra")
        );
        assert_eq!(
            id("tf:infra").terraform_config_dir().as_deref(),
            Some("terraform/infra")
        );
        assert_eq!(
            id("tf:auth-core").terraform_config_dir().as_deref(),
            Some("terraform/auth-core")
        );
        assert_eq!(
            id("tf:service-infra:app").terraform_config_dir().as_deref(),
            Some("terraform/services/app/infra")
        );
        assert_eq!(
            id("tf:service-config:app")
                .terraform_config_dir()
                .as_deref(),
            Some("terraform/services/app/config")
        );
        assert_eq!(id("nix:core:dns").log_file_name(), "nix_core_dns.log");
        assert_eq!(id("verify:app").terraform_data_dir(), None);
    }

    /// The state store may hold ids whose service is no valid name today: they read back as
    /// written (the planner shows such an orphan, escaped), and what is derived from them
    /// stays a plain file name.
    #[test]
    fn recorded_ids_keep_their_service_as_written() {
        let id = id_of("nix:service-config:x\u{1b}[2J\nerror: forged");
        assert_eq!(id.phase(), Phase::NixServiceConfig);
        assert_eq!(id.service(), Some("x\u{1b}[2J\nerror: forged"));
        let id = id_of("tf:service-infra:a:b/../c");
        assert_eq!(id.service(), Some("a:b/../c"));
        assert_eq!(
            id.terraform_data_dir().as_deref(),
            Some("service-infra--a--b_.._c")
        );
        assert_eq!(id_of("verify:Web").service(), Some("Web"));
    }

    #[test]
    fn display_pads_like_a_string() {
        assert_eq!(format!("{:<10}|", id_of("tf:infra")), "tf:infra  |");
    }

    #[test]
    fn a_map_keyed_by_ids_is_read_with_their_text() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(id_of("verify:web"), 1);
        m.insert(id_of("tf:infra"), 2);
        assert_eq!(m.get("verify:web"), Some(&1));
        assert_eq!(
            m.keys().map(StepId::as_str).collect::<Vec<_>>(),
            ["tf:infra", "verify:web"]
        );
    }

    fn id_of(s: &str) -> StepId {
        s.parse().unwrap()
    }
}
