//! Changes to the manifests directory (inotify), which wake the main loop to sync.
//!
//! The events are not parsed: any of them means "read the directory again", which the
//! manifests cache makes cheap (only changed files are parsed). Only events that can change
//! what the directory holds are asked for: a file written and closed, created, removed,
//! renamed in or out, its mode changed (it may become readable), or the directory itself
//! removed or moved. Opens and reads are not, so the agent's own reading of the directory
//! wakes nothing; and a file being written wakes the loop once it is closed, not at its
//! first write. The descriptor is read on the main loop's own thread: a change reaches the
//! sync without a hop through a watcher thread.

use std::io;
use std::path::Path;

use inotify::{Inotify, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A watch on one directory (not recursive).
pub struct FileEvents {
    inotify: AsyncFd<Inotify>,
}

impl FileEvents {
    pub fn watch(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::ATTRIB
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF,
        )?;
        // SAFETY: the Inotify owns its descriptor until it is dropped, with the AsyncFd
        // that owns it; its `as_raw_fd` always returns that descriptor.
        let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(FileEvents { inotify })
    }

    /// Waits for events, then reads all that are queued. A queue that overflowed reports
    /// that as an event of its own (`IN_Q_OVERFLOW`), which counts like any other.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = self.inotify.readable_mut().await?;
            let mut seen = false;
            loop {
                match ready.get_inner_mut().read_events(&mut buf) {
                    Ok(_) => seen = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if seen {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Waits for `changed` at most a few seconds (a hang guard, not a timing).
    async fn changed(events: &mut FileEvents) -> bool {
        tokio::time::timeout(Duration::from_secs(5), events.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether an event is queued, read straight from the descriptor: inotify queues an
    /// operation's events in the syscall that performs it, so this sees them all.
    fn pending(events: &mut FileEvents) -> bool {
        let mut buf = [0u8; 4096];
        match events.inotify.get_mut().read_events(&mut buf) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_renames_and_removals_wake_it_and_reading_does_not() {
        /// Removed however the test ends.
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let guard =
            Dir(std::env::temp_dir().join(format!("ekp-file-events-{}", std::process::id())));
        let dir = guard.0.clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let mut events = FileEvents::watch(&dir).unwrap();
        let file = dir.join("a.yaml");

        std::fs::write(&file, "kind: Service\n").unwrap();
        assert!(changed(&mut events).await, "a file written");
        assert!(
            !pending(&mut events),
            "a write's events are all read at once"
        );

        // What the agent does at every sync: list the directory, read a file.
        for entry in std::fs::read_dir(&dir).unwrap() {
            entry.unwrap();
        }
        std::fs::read_to_string(&file).unwrap();
        assert!(!pending(&mut events), "reading is not a change");

        // An edit in place: no creation, only writes and the close after them.
        std::fs::write(&file, "kind: Service\nmetadata: {}\n").unwrap();
        assert!(changed(&mut events).await, "a file rewritten in place");

        let outside = dir.with_extension("tmp");
        std::fs::write(&outside, "kind: Service\n").unwrap();
        std::fs::rename(&outside, dir.join("b.yaml")).unwrap();
        assert!(changed(&mut events).await, "a file renamed in");

        std::fs::remove_file(&file).unwrap();
        assert!(changed(&mut events).await, "a file removed");

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(changed(&mut events).await, "the directory removed");
    }
}
