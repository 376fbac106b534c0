//! `nixmox completion SHELL` and `nixmox man`: shell completion scripts (clap_complete) and
//! manual pages (clap_mangen), both generated from the argument types in `cli`.
//!
//! Completion is dynamic: the script the shell loads calls `nixmox` back (`COMPLETE=SHELL
//! nixmox -- ARGS`) and `main` answers through `clap_complete::CompleteEnv`, so service names
//! and step ids come from the project at the moment of completion (`crate::complete`). All
//! five shells clap_complete knows support it. `--static` prints a script that needs no
//! callback (subcommands and options only).

use std::path::Path;

use clap::CommandFactory;
use clap_complete::env::EnvCompleter;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::{Error, Result};
use crate::{output, project_fs};

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
        completer.write_registration(
            crate::complete::COMPLETE_VAR,
            "nixmox",
            "nixmox",
            "nixmox",
            &mut buf,
        )
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
