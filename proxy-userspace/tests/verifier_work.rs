//! Privileged: how many instructions the kernel's verifier walks for each program (issue 6).
//! Verifying is most of an agent's start when the Services are few, and as long as reading
//! and translating them at 10000; it grows with every path the verifier cannot prune, and
//! inlined code is walked again for every state a program reaches it in. The searches that
//! are global functions for that reason (`lb::ekp_find_backend`, `nat::ekp_allocate_port`,
//! docs/decisions.md) took `ekp_connect4` from 71128 instructions to 26749 and `ekp_tcx_in`
//! from 196726 to 119300 on Linux 6.18; log records of a fixed layout written by a third
//! (`log::ekp_log`, in place of aya-log's formatting at each log point), and
//! `sticky_backend`'s search through the first, took them to 11807 and 62355. The budgets
//! below sit between the last two counts (which are the kernel's and move a little between
//! kernel versions), so that code which brings the repeated walks back fails here rather
//! than in a slower start. The SNAT port search's judgement of a backend's TIME_WAIT at
//! each of its 16 tries (`time_wait`) took `ekp_tcx_in` to 129882 inline and to 72574 as
//! one global function whose answer each try branches on once; reading the SYN's stamp
//! only for such a judgement (`time_wait::ekp_read_stamp`), 70259.

use aya::Ebpf;
use aya::programs::Program;
use proxy_userspace::dataplane;

/// (program, the most verified instructions it may take).
const BUDGETS: [(&str, u32); 12] = [
    ("ekp_tcx_in", 90_000),
    ("ekp_tcx_out", 20_000),
    ("ekp_pod_in", 90_000),
    ("ekp_pod_out", 20_000),
    ("ekp_connect4", 20_000),
    ("ekp_sendmsg4", 20_000),
    ("ekp_connect6", 20_000),
    ("ekp_recvmsg4", 2_000),
    ("ekp_getpeer4", 2_000),
    ("ekp_recvmsg6", 2_000),
    ("ekp_getpeer6", 2_000),
    ("ekp_sock_release", 2_000),
];

#[test]
fn every_program_verifies_within_its_budget_of_instructions() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test loads the eBPF programs, which needs root (CAP_BPF); run it as root");
    }
    let mut ebpf = Ebpf::load(dataplane::object()).expect("loading the embedded eBPF object");
    let mut over = Vec::new();
    for (name, budget) in BUDGETS {
        let program = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing from the object"));
        match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => panic!("{name}: not a program type the agent loads"),
        }
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        let verified = program
            .info()
            .expect("the program's info")
            .verified_instruction_count()
            .unwrap_or_else(|| {
                panic!("the kernel reports no verified instruction count (Linux 5.16+ does)")
            });
        println!("{name}: {verified} verified instructions (budget {budget})");
        if verified > budget {
            over.push(format!("{name}: {verified} > {budget}"));
        }
    }
    assert!(over.is_empty(), "over budget: {over:?}");
    assert_eq!(
        ebpf.programs().count(),
        BUDGETS.len(),
        "a program of the object has no budget here"
    );
}
