//! The few places that call libc directly.
//!
//! Everything here is a thin, typed wrapper around one system call whose
//! arguments the safe standard library or nix do not cover (interface ioctls).
//! Each `unsafe` block names the invariant it relies on.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;

/// Forks: Ok(None) in the child, Ok(Some(child)) in the parent. Only for a
/// process that has started no thread (the child would hold a copy of
/// memory whose locks other threads might have held): refused otherwise,
/// where the thread count can be read (Linux).
#[allow(unsafe_code)]
pub fn fork_before_threads() -> std::io::Result<Option<nix::unistd::Pid>> {
    #[cfg(target_os = "linux")]
    {
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads != 1 {
            return Err(std::io::Error::other(format!(
                "fork with {threads} threads running"
            )));
        }
    }
    // SAFETY: the process has one thread (checked above on Linux; on other
    // systems the one caller, `tunfwd-wg`, forks as its first step), so the
    // child's copy of memory holds no lock of a thread it lacks.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// The calling thread's nice value (Linux: per thread; elsewhere the
/// process's).
#[allow(unsafe_code)]
pub fn thread_nice() -> std::io::Result<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers and touches no memory of
    // ours; -1 is a valid nice value, so errno (cleared above) tells an
    // error apart.
    let v = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if v == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Sets the calling thread's nice value (Linux: this thread only, as `who`
/// 0 means the caller; elsewhere the process). A lower value than the
/// current one needs CAP_SYS_NICE or an RLIMIT_NICE that allows it.
#[allow(unsafe_code)]
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
