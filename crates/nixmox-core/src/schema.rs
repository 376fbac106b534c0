//! JSON Schema (2020-12) of nixmox.yaml and service manifests (being completed by a helper).
use serde_json::{json, Value};
pub fn project() -> Value { json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}) }
pub fn manifest() -> Value { json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}) }
pub fn files() -> Vec<(&'static str, Value)> { vec![("nixmox.schema.json", project()), ("manifest.schema.json", manifest())] }
pub fn to_text(v: &Value) -> String { let mut s = serde_json::to_string_pretty(v).unwrap_or_default(); s.push('\n'); s }
