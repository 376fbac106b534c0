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
    let confirmation = list.confirmation();
    if confirmation == Confirmation::NotNeeded || yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::Usage(
            "refusing to destroy without confirmation: stdin is not a terminal; pass --yes to \
             destroy what is listed above (--dry-run only lists it)"
                .into(),
        ));
    }
    {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(teardown::prompt(&confirmation).as_bytes());
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
        "not confirmed (expected {expected}): nothing was destroyed"
    )))
}
