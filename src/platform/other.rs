//! macOS and other BSD-like systems: no thread pinning, no forced buffer
//! sizes, no UDP segmentation offload. Each function either does the
//! portable equivalent or says it is unavailable; `config::validate`
//! rejects the Linux-only flags before any of this runs.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{SockaddrStorage, recvfrom, setsockopt, sockopt};

fn linux_only(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{what} needs Linux"))
}

/// The CPUs this process may run on: unknown here, so none are listed and
/// workers are left to the scheduler.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    Ok(Vec::new())
}

/// Thread pinning is Linux-only (`--cpus`).
pub fn pin_current_thread(_cpu: usize) -> io::Result<()> {
    Err(linux_only("pinning threads to CPUs (--cpus)"))
}

/// SO_SNDBUF, within the system's maximum.
pub fn set_sndbuf(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    setsockopt(sock, sockopt::SndBuf, &bytes).map_err(Into::into)
}

/// SO_MARK is Linux-only.
pub fn set_mark(_sock: &UdpSocket, _mark: u32) -> io::Result<()> {
    Err(linux_only("FwMark"))
}

/// SO_RCVBUF, within the system's maximum.
pub fn set_rcvbuf(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    setsockopt(sock, sockopt::RcvBuf, &bytes).map_err(Into::into)
}

/// UDP GRO is Linux-only.
pub fn enable_udp_gro(_sock: &UdpSocket) -> io::Result<()> {
    Err(linux_only("UDP GRO"))
}

/// Receive steering by inner flow is Linux-only (classic BPF on a
/// `SO_REUSEPORT` group).
pub fn steer_by_inner_flow(_sock: &UdpSocket, _sockets: usize) -> io::Result<()> {
    Err(linux_only("steering receives by inner flow"))
}

/// Sends the bytes of `iov`, gathered, as one datagram to `to` (no UDP
/// GSO here: a `gso_size` is refused; the outer TOS byte stays 0, so
/// WireGuard's outer ECN bits are Linux-only).
pub fn send_gather(
    sock: &UdpSocket,
    iov: &[io::IoSlice<'_>],
    gso_size: Option<u16>,
    _tos: u8,
    to: SocketAddr,
) -> nix::Result<usize> {
    use std::os::fd::AsRawFd;
    if gso_size.is_some() {
        return Err(Errno::EOPNOTSUPP);
    }
    let addr = SockaddrStorage::from(to);
    nix::sys::socket::sendmsg(
        sock.as_raw_fd(),
        iov,
        &[],
        nix::sys::socket::MsgFlags::empty(),
        Some(&addr),
    )
}

/// No control message is read here.
pub fn segments_cmsg_space() -> Vec<u8> {
    Vec::new()
}

/// Receives one datagram (no GRO, no arrival time here).
pub fn recv_segments(
    sock: &UdpSocket,
    buf: &mut [u8],
    _cmsg: &mut [u8],
) -> nix::Result<super::RecvInfo> {
    use std::os::fd::AsRawFd;
    let (n, src) = recvfrom::<SockaddrStorage>(sock.as_raw_fd(), buf)?;
    Ok(super::RecvInfo {
        len: n,
        src: src.as_ref().and_then(socket_addr),
        gro_size: None,
        arrived_ns: None,
        tos: None,
        truncated: false,
    })
}

/// The outer TOS byte is not read here (Linux-only).
pub fn enable_rx_tos(_sock: &UdpSocket) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// No receive timestamps here: the AQM stays off.
pub fn enable_rx_timestamps(_sock: &UdpSocket) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// The parent-death signal is Linux-only (used by `tunfwd bench`).
pub fn set_parent_death_signal() -> io::Result<()> {
    Err(linux_only("a parent-death signal"))
}

/// A close-on-exec, nonblocking pipe: (read end, write end).
pub fn nonblocking_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe()?;
    for fd in [&rx, &tx] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    Ok((rx, tx))
}

/// A close-on-exec, blocking pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe()?;
    for fd in [&rx, &tx] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    Ok((rx, tx))
}

/// `--user` is Linux-only here (config validation rejects it first).
pub fn drop_privileges(_spec: &crate::types::UserSpec) -> crate::error::Result<()> {
    Err(crate::error::Error::config("--user needs Linux"))
}

/// No `/proc/net/udp` here.
pub fn socket_inode(_sock: &UdpSocket) -> Option<u64> {
    None
}

/// Device drop counters are not readable here.
pub fn device_tx_drops(_name: &str) -> Option<u64> {
    None
}

/// Kernel socket drops are not readable here.
pub fn udp_socket_drops(_inodes: &[u64]) -> Option<u64> {
    None
}

/// No error queue here: ICMP errors are not reported for unconnected
/// sockets.
pub fn enable_recverr(_sock: &UdpSocket) -> io::Result<()> {
    Ok(())
}

/// Nothing is queued without `enable_recverr`.
pub fn drain_error_queue(_sock: &UdpSocket) -> u64 {
    0
}

/// A received datagram's source as a `SocketAddr` (None for other families).
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        })
}

/// No RLIMIT_NICE here: raising a priority needs the privilege itself.
pub fn allow_nice(_nice: i32) {}
