//! The agent's binary: its allocator, then `cli::main`.

/// mimalloc rather than glibc's malloc. A sync from empty, and the periodic full one,
/// allocate and free hundreds of thousands of small objects. glibc leaves the freed chunks
/// in its unsorted bin, and the next syncs' allocations sort through them, up to 10000 per
/// call. At 30000 Services the first endpoint changes after programming took 5-11 ms, most
/// of it in `_int_malloc` (a CPU profile), against 1-3 ms once drained; and a change right
/// after a periodic full sync spent 8-38 ms reading and 6-11 ms translating, against
/// 0.2-0.3 and 0.1-0.2 ms with mimalloc, which keeps freed blocks in pages of their size.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the pinned mimalloc's `mimalloc.h` (v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed memory stays mapped, as glibc keeps it. With mimalloc's default (returned to
    // the kernel 10 ms after it is freed), one endpoint change at 10000 Services took over
    // 5 ms in three of six bench runs (up to 10.7 ms); kept, 1.0-4.5 ms over 30 changes.
    // The resident size stays near its high-water mark, as with glibc (the bench's
    // "controller RSS"). Transparent huge pages are off (`no_thp`): with them, zeroing
    // 2 MiB pages (a CPU profile) made programming 10000 Services 60 % slower.
    // SAFETY: setting an option is allowed at any time; this one is read when purging.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    proxy_userspace::cli::main()
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    /// mimalloc reads each option from its `MIMALLOC_*` variable the first time it is asked
    /// for: a child of this test, started with `MIMALLOC_PURGE_DELAY` set, reads that value
    /// back through our number only if the number is the purge delay's.
    #[test]
    fn the_option_number_is_the_purge_delay() {
        const CHILD: &str = "EKP_TEST_READ_PURGE_DELAY";
        if std::env::var_os(CHILD).is_some() {
            // SAFETY: reading an option is allowed at any time.
            let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            println!("purge_delay={value}");
            return;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "tests::the_option_number_is_the_purge_delay",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .output()
            .expect("running the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("purge_delay=4321"), "{stdout}");
    }
}
