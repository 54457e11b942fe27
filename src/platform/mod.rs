//! Operating-system services other than the TUN device itself, one file per
//! platform with the same functions: CPU pinning, socket buffer sizes, UDP
//! segmentation offload, the parent-death signal, the shutdown pipe.
//!
//! Linux has all of them. Elsewhere (macOS) the functions that have no
//! equivalent say so with an error that names the flag, or report "not
//! available" so the caller takes the portable path.

#[cfg(target_os = "linux")]
pub mod control;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
pub use other::*;

use std::net::SocketAddr;

use nix::errno::Errno;

/// What one receive returned ([`recv_segments`]).
#[derive(Clone, Copy, Debug)]
pub struct RecvInfo {
    pub len: usize,
    pub src: Option<SocketAddr>,
    /// UDP GRO: the size of each datagram, if more than one came.
    pub gro_size: Option<usize>,
    /// When the kernel queued it (ns since the Unix epoch), with
    /// `SO_TIMESTAMPNS` on (Linux).
    pub arrived_ns: Option<u64>,
    /// The outer header's TOS byte or traffic class, with
    /// [`enable_rx_tos`] on (Linux).
    pub tos: Option<u8>,
    /// The kernel cut the payload to the buffer (`MSG_TRUNC`; Linux).
    pub truncated: bool,
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`, so that each worker
/// of a tunnel whose peers know one port (WireGuard) binds that same port
/// and the kernel spreads incoming datagrams over them by flow.
pub fn bind_udp_shared(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    #[cfg(target_os = "linux")]
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    #[cfg(not(target_os = "linux"))]
    let fd = {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let fd = socket(family, SockType::Datagram, SockFlag::empty(), None)?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        fd
    };
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Socket errors that report a past ICMP error (peer port unreachable, ...)
/// rather than a broken socket: the socket stays usable.
pub fn is_transient_socket_errno(e: Errno) -> bool {
    matches!(
        e,
        Errno::ECONNREFUSED
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::EHOSTDOWN
            | Errno::ENETDOWN
            | Errno::EPROTO
    )
}

/// `ADDR:PORT`, or a link-local IPv6 address with its interface by name,
/// `[fe80::2%eth0]:5000` (the name is looked up here, hence in this layer).
pub fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    crate::types::addr::parse_endpoint_with(s, |scope| {
        nix::net::if_::if_nametoindex(scope).map_err(|e| {
            format!("no interface {scope:?} here ({e}); with --netns, give its index instead")
        })
    })
}
