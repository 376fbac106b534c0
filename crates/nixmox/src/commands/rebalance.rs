//! `nixmox rebalance`: every service placed afresh on the cluster's nodes (pins and spread
//! groups obeyed, offline nodes avoided), the moves that differ from `nixmox.lock` listed on
//! stdout; with `--yes`, the new placement recorded and the moved services brought `up`, which
//! migrates their containers (never re-creates them) and deploys and checks them again.

use nixmox_core::lock::LOCK_FILE;

use super::{load_project_placed, load_sources_in, up, Ask};
use crate::error::Result;
use crate::root::ProjectRoot;
use crate::{output, project_fs};

/// One proposed move.
struct Move {
    service: String,
    vmid: u32,
    from: String,
    to: String,
}

pub fn run(root: &ProjectRoot, yes: bool) -> Result<()> {
    // Loaded (and its warnings printed) once; placed a second time, afresh, on the same
    // cluster, without asking the API again.
    let placed = load_project_placed(root, Ask::Nodes)?;
    let now_p = &placed.valid.project;
    let fresh = load_sources_in(
        root,
        &placed.read,
        &nixmox_core::Cluster {
            fresh: true,
            ..placed.cluster
        },
    );
    let Some(fresh_p) = &fresh.project else {
        // Placing everything afresh can fail where keeping the lock's nodes did not (no
        // room for a service once others moved): those errors, and nothing is moved.
        let errors: Vec<_> = fresh.errors().cloned().collect();
        output::diagnostics(&errors);
        output::note("a fresh placement is not possible: nothing is moved");
        return Err(crate::error::Error::Reported {
            count: errors.len().max(1),
        });
    };
    let moves: Vec<Move> = now_p
        .services
        .iter()
        .zip(&fresh_p.services)
        .filter(|(a, b)| a.host.node != b.host.node)
        .map(|(a, b)| Move {
            service: a.name.to_string(),
            vmid: a.host.vmid.get(),
            from: a.host.node.clone(),
            to: b.host.node.clone(),
        })
        .collect();
    if moves.is_empty() {
        output::note("the placement is balanced: nothing to move");
        return Ok(());
    }
    output::data(
        &moves
            .iter()
            .map(|m| {
                format!(
                    "move {} (CT {}): {} → {}\n",
                    m.service, m.vmid, m.from, m.to
                )
            })
            .collect::<String>(),
    )?;
    if !yes {
        output::note(&format!(
            "{} proposed; `nixmox rebalance --yes` records them in {LOCK_FILE} and migrates the containers",
            super::plural(moves.len(), "move")
        ));
        return Ok(());
    }
    project_fs::write_atomic(&root.join(LOCK_FILE), fresh.lock.render().as_bytes())?;
    output::note(&format!(
        "recorded the new placement in {LOCK_FILE}; migrating {}",
        super::plural(moves.len(), "container")
    ));
    up::run(
        root,
        &crate::cli::UpArgs::redeploy(moves.into_iter().map(|m| m.service).collect()),
    )
}
