//! Anonymous network namespaces held by file descriptor.
//!
//! A namespace made here has no name in `/run/netns`: it lives exactly as long
//! as its [`NetNs`] (and any process or thread inside it), so it disappears on
//! every exit path, SIGKILL included. Code runs inside it on a thread that
//! called `setns` (network namespaces are per thread); child processes enter
//! it with `tunfwd tunnel --netns PATH`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::thread::{self, JoinHandle};

use nix::sched::{CloneFlags, setns, unshare};

use crate::error::{Context, Error, Result};

/// A network namespace, alive while this value (or anything inside it) is.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// Creates a new, empty network namespace (only a down `lo`).
    pub fn new() -> Result<NetNs> {
        thread::Builder::new()
            .name("tunfwd-netns".into())
            .spawn(|| -> Result<NetNs> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .context(|| "create network namespace (unshare CLONE_NEWNET)")?;
                let fd = File::open("/proc/thread-self/ns/net")
                    .context(|| "open /proc/thread-self/ns/net")?;
                Ok(NetNs { fd: fd.into() })
            })
            .map_err(|e| Error::io("spawn namespace thread", e))?
            .join()
            .map_err(|_| Error::config("namespace thread panicked"))?
    }

    /// Opens an existing namespace, e.g. `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> Result<NetNs> {
        let fd =
            File::open(path).context(|| format!("open network namespace {}", path.display()))?;
        Ok(NetNs { fd: fd.into() })
    }

    /// Moves the calling thread into this namespace. Threads it spawns
    /// afterwards start there too.
    pub fn enter(&self) -> Result<()> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
            .context(|| "enter network namespace (setns)")
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<T, F>(&self, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let ns = self.try_clone()?;
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                ns.enter()?;
                f()
            })
            .map_err(|e| Error::io(format!("spawn thread {name}"), e))
    }

    /// Runs `f` inside this namespace and waits for its result.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        self.spawn("tunfwd-in-netns", f)?
            .join()
            .map_err(|_| Error::config("thread inside namespace panicked"))?
    }

    /// A second handle on the same namespace.
    pub fn try_clone(&self) -> Result<NetNs> {
        let fd = self
            .fd
            .try_clone()
            .context(|| "duplicate namespace descriptor")?;
        Ok(NetNs { fd })
    }

    /// A path another process of ours can open to enter this namespace.
    pub fn proc_path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
