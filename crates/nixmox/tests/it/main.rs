//! The integration tests of the `nixmox` binary, as one test binary: one link of the crate
//! instead of one per file, and one harness (`common`) that every module shares.
//!
//! Each module tests one area through the real binary and real tools where they run here
//! (Terraform, nix-instantiate, PostgreSQL, Caddy, Unbound, OpenSSH, sops, age, fakepve). The
//! one double is the NixOS deployer (`tests/fixtures/bin/deploy-test`): nothing can activate
//! NixOS in an LXC on a Proxmox host on this machine.

mod common;

mod cli;
mod destroy_guard;
mod down_drift;
mod engine;
mod health;
mod proxmox;
mod render_real;
mod render_tools;
mod secrets;
mod untrusted_files;
