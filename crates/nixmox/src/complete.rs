//! Dynamic shell completion: the candidates for service and step arguments, read from the
//! project of the command line being completed. `cli` names these completers; `main` answers
//! the shell through clap_complete's `CompleteEnv`; `commands::completion` prints the scripts.
//! Below `cli` and `commands`: it reads the project through `project_fs` and the core only.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap_complete::engine::CompletionCandidate;
use nixmox_core::plan::{self, PlanInput, Selection};

use crate::project_fs;

/// The environment variable the registration scripts set when they call `nixmox` back.
pub const COMPLETE_VAR: &str = "COMPLETE";

/// Service names of the project being completed, starting with `current`.
pub fn services(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(project) = completion_project() else {
        return Vec::new();
    };
    let names = project.services.iter().map(|s| s.name.to_string());
    candidates(names, current)
}

/// Step ids of the project's full plan, starting with `current`.
pub fn steps(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(project) = completion_project() else {
        return Vec::new();
    };
    let plan = plan::plan(&project, &Selection::default(), &PlanInput::default());
    candidates(plan.steps.into_iter().map(|s| s.id.to_string()), current)
}

fn candidates(words: impl Iterator<Item = String>, current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    words
        .filter(|w| w.starts_with(current.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// The project a completion is for: loaded quietly (a shell's prompt is no place for
/// diagnostics); nothing when it does not load.
fn completion_project() -> Option<nixmox_core::Project> {
    let dir = project_dir(std::env::args_os());
    let root = crate::root::ProjectRoot::discover(&dir).ok()?;
    let root = root.as_path();
    let read = project_fs::read_project(root).ok()?;
    let probe = project_fs::probe_in(root);
    nixmox_core::load_probed(&read.sources, &probe).project
}

/// The `-C DIR` / `--project DIR` / `--project=DIR` of the command line being completed (the
/// words after `--` in `nixmox -- nixmox -C DIR up …`), or the current directory.
pub fn project_dir(args: impl IntoIterator<Item = OsString>) -> PathBuf {
    let args: Vec<OsString> = args.into_iter().collect();
    let words = match args.iter().position(|a| a == "--") {
        Some(i) => &args[i + 1..],
        None => &args[..],
    };
    let mut dir = PathBuf::from(".");
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let text = w.to_string_lossy();
        if text == "-C" || text == "--project" {
            if let Some(next) = it.next() {
                dir = PathBuf::from(next);
            }
        } else if let Some(rest) = text.strip_prefix("--project=") {
            dir = PathBuf::from(rest);
        } else if let Some(rest) = text.strip_prefix("-C").filter(|r| !r.is_empty()) {
            dir = PathBuf::from(rest);
        }
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_of_the_line_being_completed() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            project_dir(os(&["nixmox", "--", "nixmox", "-C", "lab", "up", ""])),
            PathBuf::from("lab")
        );
        assert_eq!(
            project_dir(os(&["nixmox", "--", "nixmox", "--project=x/y", "logs"])),
            PathBuf::from("x/y")
        );
        assert_eq!(
            project_dir(os(&["nixmox", "--", "nixmox", "-Cz", "plan"])),
            PathBuf::from("z")
        );
        assert_eq!(
            project_dir(os(&["nixmox", "--", "nixmox", "up"])),
            PathBuf::from(".")
        );
    }
}
