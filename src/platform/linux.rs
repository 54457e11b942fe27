//! Linux: sched_setaffinity, SO_*BUFFORCE, UDP_SEGMENT / UDP_GRO,
//! PR_SET_PDEATHSIG, pipe2.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt,
    sockopt,
};

/// The CPUs this process may run on.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// SO_SNDBUF; as root (CAP_NET_ADMIN) beyond the sysctl maximum.
pub fn set_sndbuf(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    setsockopt(sock, sockopt::SndBufForce, &bytes)
        .or_else(|_| setsockopt(sock, sockopt::SndBuf, &bytes))
        .map_err(Into::into)
}

/// SO_RCVBUF; as root (CAP_NET_ADMIN) beyond the sysctl maximum.
pub fn set_rcvbuf(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    setsockopt(sock, sockopt::RcvBufForce, &bytes)
        .or_else(|_| setsockopt(sock, sockopt::RcvBuf, &bytes))
        .map_err(Into::into)
}

/// Turns on UDP GRO: one receive may then return several datagrams.
pub fn enable_udp_gro(sock: &UdpSocket) -> io::Result<()> {
    setsockopt(sock, sockopt::UdpGroSegment, &true).map_err(Into::into)
}

/// Sends `chunk` as datagrams of `seg` bytes in one UDP GSO send.
pub fn send_segments(
    sock: &UdpSocket,
    chunk: &[u8],
    seg: u16,
    to: SocketAddr,
) -> nix::Result<usize> {
    let addr = SockaddrStorage::from(to);
    sendmsg(
        sock.as_raw_fd(),
        &[io::IoSlice::new(chunk)],
        &[ControlMessage::UdpGsoSegments(&seg)],
        MsgFlags::empty(),
        Some(&addr),
    )
}

/// Room for the control message `recv_segments` reads.
pub fn segments_cmsg_space() -> Vec<u8> {
    nix::cmsg_space!(i32)
}

/// Receives one datagram or, with UDP GRO on, several of the same size:
/// (bytes, source, segment size if more than one datagram came).
pub fn recv_segments(
    sock: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> nix::Result<(usize, Option<SocketAddr>, Option<usize>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let m = recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())?;
    let seg = m.cmsgs().ok().and_then(|mut c| {
        c.find_map(|c| match c {
            ControlMessageOwned::UdpGroSegments(s) => Some(s as usize),
            _ => None,
        })
    });
    let src = m.address.as_ref().and_then(super::socket_addr);
    Ok((m.bytes, src, seg))
}

/// Asks the kernel to send SIGTERM when the parent process dies.
pub fn set_parent_death_signal() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(Into::into)
}

/// A close-on-exec, nonblocking pipe: (read end, write end).
pub fn nonblocking_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(Into::into)
}
