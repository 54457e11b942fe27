//! Engines move batches of packets between a TUN queue and a UDP socket.
//!
//! They differ only in how they wait and batch; every forwarding decision
//! comes from [`crate::forward::Forwarder`], so they behave the same. An engine
//! runs one worker per TUN queue and stops when its [`Shutdown`] fires.

pub mod poll;
#[cfg(target_os = "linux")]
pub mod uring;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Context, Result};

/// A shutdown flag that also wakes sleeping workers: a pipe whose read end
/// every worker polls, and to which `trigger` writes one byte.
#[derive(Debug)]
pub struct Shutdown {
    flag: AtomicBool,
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
}

impl Shutdown {
    pub fn new() -> Result<Shutdown> {
        let (wake_rx, wake_tx) =
            crate::platform::nonblocking_pipe().context(|| "create shutdown pipe")?;
        Ok(Shutdown {
            flag: AtomicBool::new(false),
            wake_rx,
            wake_tx,
        })
    }

    /// Asks every worker to stop and wakes those asleep. Idempotent.
    pub fn trigger(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            // Nobody reads the pipe: one byte keeps it readable for all
            // pollers (level-triggered). A full pipe is already readable.
            let _ = nix::unistd::write(&self.wake_tx, &[1]);
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The descriptor that becomes readable on `trigger`.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake_rx.as_fd()
    }
}

/// The address to pass to `send_to` on a socket bound to `local`: an IPv4
/// peer is reached from an IPv6 (dual-stack) socket as `::ffff:a.b.c.d`.
pub fn send_addr(local: SocketAddr, peer: SocketAddr) -> SocketAddr {
    match (local.ip(), peer.ip()) {
        (IpAddr::V6(_), IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), peer.port()),
        _ => peer,
    }
}

pub use crate::device::is_fatal_error as is_fatal_tun_error;

/// The error that ends a worker whose TUN queue failed (`op`: "read from",
/// "write to"): names the queue and, for the errors that mean the device
/// is gone, says so.
pub fn tun_failure(op: &str, label: &str, e: std::io::Error) -> crate::error::Error {
    let gone = is_fatal_tun_error(&e);
    let err = crate::error::Error::io(format!("{op} {label}"), e);
    if gone {
        err.with_hint("the device was deleted or its queue detached")
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_v4_peer_for_v6_socket() {
        let local = "[::]:5000".parse().unwrap();
        let peer = "198.18.0.2:5000".parse().unwrap();
        assert_eq!(
            send_addr(local, peer),
            "[::ffff:198.18.0.2]:5000".parse().unwrap()
        );
        let local4 = "0.0.0.0:5000".parse().unwrap();
        assert_eq!(send_addr(local4, peer), peer);
    }

    #[test]
    fn shutdown_wakes_poll() {
        let s = Shutdown::new().unwrap();
        assert!(!s.is_triggered());
        s.trigger();
        s.trigger();
        assert!(s.is_triggered());
        let mut fds = [nix::poll::PollFd::new(
            s.wake_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap();
        assert_eq!(n, 1);
    }
}
