//! `nixmox completion SHELL` and `nixmox man`: shell completion scripts (clap_complete) and
//! manual pages (clap_mangen), both generated from the argument types in `cli`.
//!
//! Completion is dynamic: the script the shell loads calls `nixmox` back (`COMPLETE=SHELL
//! nixmox -- ARGS`) and `main` answers through `clap_complete::CompleteEnv`, so service names
//! and step ids come from the project named by `-C` (or the current directory) at the moment
//! of completion. All five shells clap_complete knows support it. `--static` prints a script
//! that needs no callback (subcommands and options only).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::engine::CompletionCandidate;
use clap_complete::env::EnvCompleter;
use clap_complete::Shell;
use nixmox_core::plan::{self, PlanInput, Selection};

use crate::cli::Cli;
use crate::error::{Error, Result};
use crate::{output, project_fs};

/// The environment variable the registration scripts set when they call `nixmox` back.
pub const COMPLETE_VAR: &str = "COMPLETE";

pub fn run(shell: Shell, static_script: bool) -> Result<()> {
    let mut buf = Vec::new();
    let mut cmd = Cli::command();
    let written = if static_script {
        clap_complete::generate(shell, &mut cmd, "nixmox", &mut buf);
        Ok(())
    } else {
        let completer: &dyn EnvCompleter = match shell {
            Shell::Bash => &clap_complete::env::Bash,
            Shell::Elvish => &clap_complete::env::Elvish,
            Shell::Fish => &clap_complete::env::Fish,
            Shell::PowerShell => &clap_complete::env::Powershell,
            Shell::Zsh => &clap_complete::env::Zsh,
            other => {
                return Err(Error::Usage(format!(
                    "no dynamic completion for {other}; try `--static`"
                )))
            }
        };
        completer.write_registration(COMPLETE_VAR, "nixmox", "nixmox", "nixmox", &mut buf)
    };
    written.map_err(|source| Error::Write {
        path: "<completion script>".into(),
        source,
    })?;
    output::data(&String::from_utf8_lossy(&buf))
}

/// `nixmox man`: the page of `nixmox` on stdout, or one page per command into `out`
/// (`nixmox.1`, `nixmox-up.1`, `nixmox-secrets-set.1`, …).
pub fn man(out: Option<&Path>) -> Result<()> {
    let cmd = Cli::command();
    let Some(dir) = out else {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|source| Error::Write {
                path: "<man page>".into(),
                source,
            })?;
        return output::data(&String::from_utf8_lossy(&buf));
    };
    let mut pages = Vec::new();
    collect_pages(cmd.disable_help_subcommand(true), &mut pages);
    for (name, page) in &pages {
        project_fs::write_atomic(&dir.join(name), page)?;
    }
    output::note(&format!(
        "wrote {} manual pages into `{}`",
        pages.len(),
        dir.display()
    ));
    Ok(())
}

/// Every command's page as (file name, roff). A built command names its subcommands
/// `nixmox-up`, `nixmox-secrets-set`, …, which is what clap_mangen names the files after.
fn collect_pages(mut cmd: clap::Command, pages: &mut Vec<(String, Vec<u8>)>) {
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect_pages(sub.clone(), pages);
    }
    let man = clap_mangen::Man::new(cmd);
    let mut page = Vec::new();
    // Rendering into memory cannot fail.
    let _ = man.render(&mut page);
    pages.push((man.get_filename(), page));
}

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
    candidates(plan.steps.into_iter().map(|s| s.id), current)
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
    let root = dir.canonicalize().ok()?;
    let read = project_fs::read_project(&root).ok()?;
    super::load_sources(&root, &read.sources).project
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
