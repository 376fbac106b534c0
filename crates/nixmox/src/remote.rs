//! Commands NixMox runs itself on one of the project's hosts over SSH (`down --purge-data`'s
//! drop statements, a backup's database dumps): the ssh program, options, user, known hosts and
//! connection redirects are the health checks' (`health::Context`), so what reaches a host for
//! a probe reaches it for these.

use std::net::Ipv4Addr;
use std::path::Path;

use nixmox_core::model::Service;
use nixmox_core::Project;

use crate::error::{Error, Result};
use crate::exec::{Cmd, RunOpts};
use crate::root::Paths;

/// A way to run commands on one host.
pub struct HostShell {
    program: String,
    options: Vec<String>,
    user: nixmox_core::ids::SshUser,
    ip: Ipv4Addr,
    /// The host's name, for messages.
    pub hostname: String,
}

impl HostShell {
    /// The shell of `s`'s host, reached as the health checks reach it.
    pub fn of(project: &Project, root: &Path, paths: &Paths, s: &Service) -> Result<HostShell> {
        let ctx =
            crate::health::Context::for_project(project, root, &paths.ssh, &paths.known_hosts)
                .map_err(Error::Usage)?;
        let to = ctx.route(s.host.ip, 22);
        let mut options = ctx.ssh.options.clone();
        if to.port() != 22 {
            options.push("-p".into());
            options.push(to.port().to_string());
        }
        Ok(HostShell {
            program: ctx.ssh.program.clone(),
            options,
            user: ctx.ssh.user.clone(),
            ip: *to.ip(),
            hostname: s.host.hostname.to_string(),
        })
    }

    /// Runs `remote` (one argv, each word quoted for the remote shell) on the host. A command
    /// that cannot start is `Error::Exec`; one that exits non-zero is `Error::RemoteFailed`,
    /// whose message is "{doing} on {host} failed (exit …): {stderr}".
    pub fn run(&self, remote: &[String], opts: &RunOpts, doing: &str) -> Result<()> {
        let mut argv = nixmox_core::deploy::ssh_argv(&self.options, &self.user, self.ip, remote);
        argv[0] = self.program.clone();
        let fin =
            crate::exec::run(&Cmd::new(&argv[0]).args(&argv[1..]), opts).map_err(|source| {
                Error::Exec {
                    doing: doing.to_string(),
                    source,
                }
            })?;
        if fin.success() {
            return Ok(());
        }
        Err(Error::RemoteFailed {
            doing: doing.to_string(),
            host: self.hostname.clone(),
            code: fin.code,
            stderr: fin.stderr.trim().to_string(),
        })
    }
}
