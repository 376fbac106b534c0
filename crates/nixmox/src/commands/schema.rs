//! `nixmox schema`: JSON Schema (2020-12) for editors and CI.

use std::path::Path;

use nixmox_core::schema;

use crate::cli::SchemaKind;
use crate::error::Result;
use crate::{output, project_fs};

pub fn run(kind: SchemaKind, out: Option<&Path>) -> Result<()> {
    if let Some(dir) = out {
        for (file, value) in schema::files() {
            project_fs::write_atomic(&dir.join(file), schema::to_text(&value).as_bytes())?;
        }
        output::note(&format!("wrote the schemas into `{}`", dir.display()));
        return Ok(());
    }
    let value = match kind {
        SchemaKind::Project => schema::project(),
        SchemaKind::Manifest => schema::manifest(),
    };
    output::data(&schema::to_text(&value))
}
