//! NixMox's imperative shell: the CLI's commands, the engine that executes plans, and the
//! drivers that touch the world (files, processes, SQLite). The pure computations live in
//! `nixmox-core`. The `nixmox` binary is a thin `main` over this library; tests and benchmarks
//! use it directly.

pub mod cli;
pub mod commands;
pub mod complete;
pub mod confirm;
pub mod engine;
pub mod error;
pub mod exec;
pub mod flake;
pub mod health;
pub mod output;
pub mod pki;
pub mod project_fs;
pub mod proxmox;
pub mod remote;
pub mod root;
pub mod secrets;
pub mod state;
pub mod step_status;
pub mod terraform;
