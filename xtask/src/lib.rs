//! Developer and CI tasks, and the network-namespace fixture shared by the demo and the
//! privileged tests.

pub mod chart;
pub mod cmd;
pub mod demo;
pub mod ebpf;
pub mod netns;
pub mod toolchain;
