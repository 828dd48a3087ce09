//! Changes to the manifests directory (inotify), which wake the main loop to sync.
//!
//! The events are not parsed: any of them means "read the directory again", which the
//! manifests cache makes cheap (only changed files are parsed). Only events that can change
//! what the directory holds are asked for: a file written and closed, created, removed,
//! renamed in or out, its mode changed (it may become readable), or the directory itself
//! removed or moved. Opens and reads are not, so the agent's own reading of the directory
//! wakes nothing; and a file being written wakes the loop once it is closed, not at its
//! first write. The descriptor is read by a task on the runtime's worker thread, which wakes
//! the loop through its channel (the loop's own thread may be busy with a sync).
//!
//! The watch is on the directory, not its path: once the directory is removed or moved
//! away, it would see nothing of a new one put at the path (`mv manifests manifests.old;
//! mv manifests.new manifests`, as deploy tools swap a directory). So the parent directory
//! is watched too, for a directory created or renamed under the name, and the watch moves
//! to whatever directory is at the path then.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What the directory's watch asks for (see the module's comment).
const DIR_EVENTS: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// What the parent's watch asks for: an entry appearing, of which only the directory's
/// name counts.
const PARENT_EVENTS: WatchMask = WatchMask::CREATE.union(WatchMask::MOVED_TO);

/// A watch on one directory (not recursive), wherever a directory is at its path.
pub struct FileEvents {
    inotify: AsyncFd<Inotify>,
    dir: PathBuf,
    /// The watch on the directory at `dir`; `None` while there is none there.
    on_dir: Option<WatchDescriptor>,
    /// The watch on `dir`'s parent and `dir`'s name in it (`None` for a path without a
    /// name, such as `/`).
    on_parent: Option<(WatchDescriptor, OsString)>,
}

impl FileEvents {
    pub fn watch(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let on_dir = inotify.watches().add(dir, DIR_EVENTS)?;
        let on_parent = match dir.file_name() {
            Some(name) => {
                let parent = dir
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                Some((
                    inotify.watches().add(parent, PARENT_EVENTS)?,
                    name.to_owned(),
                ))
            }
            None => None,
        };
        // SAFETY: the Inotify owns its descriptor until it is dropped, with the AsyncFd
        // that owns it; its `as_raw_fd` always returns that descriptor.
        let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(FileEvents {
            inotify,
            dir: dir.to_owned(),
            on_dir: Some(on_dir),
            on_parent,
        })
    }

    /// Waits for events, then reads all that are queued. A queue that overflowed reports
    /// that as an event of its own (`IN_Q_OVERFLOW`), which counts like any other.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = self.inotify.readable_mut().await?;
            let (mut seen, mut moved) = (false, false);
            loop {
                match ready.get_inner_mut().read_events(&mut buf) {
                    Ok(events) => {
                        for event in events {
                            if self.on_dir.as_ref() == Some(&event.wd) {
                                seen = true;
                                // Gone or moved away (IGNORED: its watch is gone).
                                moved |= event.mask.intersects(
                                    EventMask::DELETE_SELF
                                        | EventMask::MOVE_SELF
                                        | EventMask::IGNORED,
                                );
                            } else if let Some((parent, name)) = &self.on_parent
                                && *parent == event.wd
                            {
                                // A directory put at the path, or an entry beside it.
                                let at_path = event.name == Some(name.as_os_str());
                                seen |= at_path;
                                moved |= at_path;
                            } else if event.mask.contains(EventMask::Q_OVERFLOW) {
                                seen = true;
                                moved = true;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if moved {
                self.follow_path();
            }
            if seen {
                return Ok(());
            }
        }
    }

    /// Moves the directory's watch to the directory at the path now, if there is one.
    fn follow_path(&mut self) {
        let mut watches = self.inotify.get_ref().watches();
        if let Some(old) = self.on_dir.take() {
            // Already gone when the directory was removed.
            let _ = watches.remove(old);
        }
        match watches.add(&self.dir, DIR_EVENTS) {
            Ok(wd) => self.on_dir = Some(wd),
            Err(e) => tracing::warn!(
                "{} cannot be watched ({e}): what it held stays served until a directory is \
                 there again",
                self.dir.display()
            ),
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

    /// A test's parent directory, removed however the test ends.
    struct Parent(std::path::PathBuf);

    impl Drop for Parent {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A `manifests` directory in a parent of its own (`tag`): the watch on the parent
    /// would see other tests' entries in the temporary directory.
    fn manifests_dir(tag: &str) -> (Parent, std::path::PathBuf) {
        let parent = Parent(std::env::temp_dir().join(format!("{tag}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&parent.0);
        let dir = parent.0.join("manifests");
        std::fs::create_dir_all(&dir).unwrap();
        (parent, dir)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_renames_and_removals_wake_it_and_reading_does_not() {
        let (_parent, dir) = manifests_dir("ekp-file-events");
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

    /// A directory swapped for a new one at the same path: the new one is watched, the
    /// old one, wherever it went, no longer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_directory_swapped_at_its_path_is_followed() {
        let (parent, dir) = manifests_dir("ekp-file-swap");
        let mut events = FileEvents::watch(&dir).unwrap();

        let old = parent.0.join("manifests.old");
        std::fs::rename(&dir, &old).unwrap();
        assert!(changed(&mut events).await, "the directory moved away");
        let new = parent.0.join("manifests.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("a.yaml"), "kind: Service\n").unwrap();
        std::fs::rename(&new, &dir).unwrap();
        assert!(
            changed(&mut events).await,
            "a directory renamed to the path"
        );

        std::fs::write(dir.join("b.yaml"), "kind: Service\n").unwrap();
        assert!(
            changed(&mut events).await,
            "a file written in the new directory"
        );
        std::fs::write(old.join("c.yaml"), "kind: Service\n").unwrap();
        assert!(!pending(&mut events), "the old directory is not watched");

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(changed(&mut events).await, "the directory removed");
        std::fs::create_dir(&dir).unwrap();
        assert!(
            changed(&mut events).await,
            "a directory created at the path"
        );
        std::fs::write(dir.join("d.yaml"), "kind: Service\n").unwrap();
        assert!(changed(&mut events).await, "a file written in it");
    }
}
