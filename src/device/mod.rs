//! TUN devices: open and configure, one file per platform.
//!
//! A device is a name plus one nonblocking [`TunQueue`] per queue; reads and
//! writes on a queue move exactly one raw IP packet (no packet-information
//! header: on Linux the kernel adds none, on macOS the utun 4-byte
//! address-family header is added and stripped inside [`TunQueue`]).
//! Configuration (MTU, addresses, txqueuelen, link up) is done from Rust with
//! ioctls: the product never runs `ip` or `ifconfig`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{
    DEFAULT_NAME, TunDevice, TunOffloads, check_name, configure_link, interface_index,
    is_fatal_error,
};

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::{DEFAULT_NAME, TunDevice, check_name, is_fatal_error};

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("tunfwd has TUN device support for Linux and macOS only");

/// How to open a TUN device.
#[derive(Clone, Debug)]
pub struct TunOptions<'a> {
    /// Interface name, or a template with `%d` for the kernel to number.
    pub name: &'a str,
    /// Number of queue files to open (1 or more).
    pub queues: usize,
    /// Require that the device exists already (a persistent device made with
    /// `ip tuntap add ... multi_queue`); never create one.
    pub attach: bool,
    /// Open with `IFF_VNET_HDR`: every packet carries a virtio-net header.
    pub vnet_hdr: bool,
    /// A TAP device (Ethernet frames) instead of TUN (IP packets).
    pub tap: bool,
}

/// One queue of a TUN device: `read` and `write` move one raw IP packet
/// (one Ethernet frame in TAP mode), nonblocking.
#[derive(Debug)]
pub struct TunQueue {
    file: File,
}

impl TunQueue {
    /// The underlying descriptor, for engines that do their own I/O
    /// (io_uring) and know the platform's framing.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Any nonblocking packet-oriented file works as a queue (tests use a
/// `SOCK_SEQPACKET` socket pair as a fake device).
impl From<File> for TunQueue {
    fn from(file: File) -> TunQueue {
        TunQueue { file }
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The error that ends a worker whose TUN queue failed (`op`: "read from",
/// "write to"; `label`: which queue of which device): for the errors that
/// mean the device is gone, says so.
pub fn tun_failure(op: &str, label: &str, e: std::io::Error) -> crate::error::Error {
    let gone = is_fatal_error(&e);
    let err = crate::error::Error::io(format!("{op} {label}"), e);
    if gone {
        err.with_hint("the device was deleted or its queue detached")
    } else {
        err
    }
}
