//! The tests of the pure crate, as one test binary: the fixtures and their snapshotted
//! diagnostics, the graph, the planner's properties, rendering snapshots, the Terraform
//! contracts and the mutation property test.

mod common;

mod fixtures;
mod graph;
mod plan;
mod proptest_mutations;
mod render;
mod terraform_contract;
