//! NixMox's pure core: manifest text in; validated model, plan and rendered files out.
//!
//! Architecture invariant: nothing in this crate touches the file system, spawns a process,
//! opens a socket or reads a clock. The shell (`crates/nixmox`) does all of that.

pub mod config;
pub mod config_out;
pub mod decode;
pub mod deploy;
pub mod diag;
pub mod flake_lock;
pub mod graph;
pub mod ids;
pub mod load;
pub mod lock;
pub mod manifest;
pub mod model;
pub mod nixexpr;
pub mod par;
pub mod placement;
pub mod plan;
pub mod plan_out;
pub mod providers;
pub mod record;
pub mod render;
pub mod scaffold;
pub mod schema;
pub mod snapshot;
pub mod step_id;
pub mod syntax;
pub mod teardown;
pub mod url;
pub mod yaml_out;

pub use diag::{Diagnostic, Severity};
pub use load::{
    load, load_in, load_probed, Cluster, ClusterNode, Loaded, PathKind, SourceFile, Sources,
};
pub use model::Project;

/// A file produced by the core (rendered configuration, scaffolding); the shell writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    /// Relative to the directory it is written into, `/`-separated.
    pub path: String,
    pub contents: String,
}
