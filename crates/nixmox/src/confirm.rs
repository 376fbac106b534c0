//! Asking before destroying: prints what a command would destroy (stderr), then takes the
//! operator's confirmation on a terminal, `--yes`, or refuses.

use std::io::{BufRead, IsTerminal, Write};

use nixmox_core::teardown::{self, Confirmation, Teardown};

use crate::error::{Error, Result};
use crate::output;

/// Prints `list` and returns when what it names may be destroyed: nothing to destroy, `yes`
/// (`--yes`), or the right answer typed on a terminal. Otherwise a usage error (exit 2) saying
/// how to accept; nothing has been done.
pub fn destroy(list: &Teardown, yes: bool) -> Result<()> {
    output::note(list.render().trim_end());
    take(&list.confirmation(), yes, "destroy", "destroyed")
}

/// Prints `what` (an action that loses data, like rolling a container back to a snapshot)
/// and takes a `y` on a terminal, or `--yes`; otherwise a usage error (exit 2), nothing done.
/// `verb` names the action in the prompt and the refusal (`roll back`).
pub fn ask(what: &str, verb: &str, yes: bool) -> Result<()> {
    output::note(what.trim_end());
    take(&Confirmation::Yes, yes, verb, "changed")
}

fn take(confirmation: &Confirmation, yes: bool, verb: &str, done: &str) -> Result<()> {
    let confirmation = confirmation.clone();
    if confirmation == Confirmation::NotNeeded || yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::Usage(if verb == "destroy" {
            "refusing to destroy without confirmation: stdin is not a terminal; pass --yes to \
                 destroy what is listed above (--dry-run only lists it)"
                .to_string()
        } else {
            format!(
                "refusing to {verb} without confirmation: stdin is not a terminal; pass --yes to \
                     {verb} as said above"
            )
        }));
    }
    {
        let mut err = std::io::stderr().lock();
        let prompt = if verb == "destroy" {
            teardown::prompt(&confirmation)
        } else {
            format!("{verb}? [y/N] ")
        };
        let _ = err.write_all(prompt.as_bytes());
        let _ = err.flush();
    }
    let mut answer = String::new();
    // End of input (Ctrl-D) or an unreadable terminal is a no.
    let read = stdin.lock().read_line(&mut answer);
    if read.is_ok_and(|n| n > 0) && teardown::accepts(&confirmation, &answer) {
        return Ok(());
    }
    let expected = match &confirmation {
        Confirmation::ProjectName(name) => format!("the project's name, `{name}`"),
        _ => "`y`".to_string(),
    };
    Err(Error::Usage(format!(
        "not confirmed (expected {expected}): nothing was {done}"
    )))
}
