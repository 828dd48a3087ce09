//! Test support shared by the integration tests.
//!
//! `prog_test_run.rs` (loading the eBPF object without pins, `BPF_PROG_TEST_RUN` on the TCX
//! programs, packet building and checksum verification) is included by `tcx_packets.rs`
//! and `tcx_fuzz.rs` on their own (`#[path]`), so those tests do not compile the API stand-in.

#![allow(dead_code)] // each test binary uses a different part of the support code

pub mod apiserver;
