//! Linux: sched_setaffinity, SO_*BUFFORCE, UDP_SEGMENT / UDP_GRO,
//! PR_SET_PDEATHSIG, pipe2.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::socket::{MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt};

use super::control;

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

/// SO_MARK (WireGuard's fwmark, 0 for none): policy routing can then tell
/// the tunnel's own datagrams apart. Needs CAP_NET_ADMIN.
pub fn set_mark(sock: &UdpSocket, mark: u32) -> io::Result<()> {
    setsockopt(sock, sockopt::Mark, &mark).map_err(Into::into)
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

/// Makes the `SO_REUSEPORT` group of `sock` (`sockets` sockets, bound in
/// queue order) hand each datagram to the socket of its inner flow
/// ([`crate::packet::steer`]).
pub fn steer_by_inner_flow(sock: &UdpSocket, sockets: usize) -> io::Result<()> {
    use std::os::fd::AsFd;
    let n = u32::try_from(sockets).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    crate::sys::attach_reuseport_cbpf(sock.as_fd(), &crate::packet::steer::inner_flow_program(n))
}

/// Sends the bytes of `iov`, gathered, to `to`: one datagram, or with
/// `gso_size` one UDP GSO send of datagrams of that many bytes; the outer
/// header's TOS byte (or traffic class) is `tos`.
pub fn send_gather(
    sock: &UdpSocket,
    iov: &[io::IoSlice<'_>],
    gso_size: Option<u16>,
    tos: u8,
    to: SocketAddr,
) -> nix::Result<usize> {
    let addr = SockaddrStorage::from(to);
    let c = control::SendControl::new(gso_size, tos, &to);
    let mut bytes = [0u8; control::SEND_CONTROL_MAX];
    for (chunk, word) in bytes.chunks_mut(8).zip(c.words()) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    crate::sys::sendmsg_gather(sock.as_fd(), iov, &bytes[..c.len()], &addr)
}

/// Room for the control messages `recv_segments` reads (UDP GRO size and
/// arrival time).
pub fn segments_cmsg_space() -> Vec<u8> {
    vec![0; control::control_len(true, true)]
}

/// Receives one datagram or, with UDP GRO on, several of the same size;
/// the address and control data are read by [`control`], the codec the
/// io_uring engine uses too.
pub fn recv_segments(
    sock: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> nix::Result<super::RecvInfo> {
    let mut name = [0u8; control::SOCKADDR_LEN];
    let r = crate::sys::recvmsg_into(sock.as_fd(), buf, &mut name, cmsg)?;
    let c = control::parse_control(&cmsg[..r.control_len]);
    Ok(super::RecvInfo {
        len: r.len.min(buf.len()),
        src: control::parse_sockaddr(&name[..r.name_len]),
        gro_size: c.gro_size,
        arrived_ns: c.arrived_ns,
        tos: c.tos,
        truncated: r.truncated,
    })
}

/// Asks the kernel to stamp each received datagram with its arrival time
/// (`SO_TIMESTAMPNS`), read by [`recv_segments`].
pub fn enable_rx_timestamps(sock: &UdpSocket) -> io::Result<()> {
    setsockopt(sock, sockopt::ReceiveTimestampns, &true).map_err(Into::into)
}

/// Asks the kernel for each datagram's outer TOS byte (IPv4, `IP_RECVTOS`)
/// or traffic class (IPv6, `IPV6_RECVTCLASS`; an IPv6 socket asks for
/// both, as IPv4 peers reach it too), read by [`recv_segments`].
pub fn enable_rx_tos(sock: &UdpSocket) -> io::Result<()> {
    setsockopt(sock, sockopt::IpRecvTos, &true)?;
    if sock.local_addr()?.is_ipv6() {
        setsockopt(sock, sockopt::Ipv6RecvTClass, &true)?;
    }
    Ok(())
}

/// Asks the kernel to send SIGTERM when the parent process dies.
pub fn set_parent_death_signal() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(Into::into)
}

/// A close-on-exec, blocking pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Into::into)
}

/// A close-on-exec, nonblocking pipe: (read end, write end).
pub fn nonblocking_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(Into::into)
}

/// Switches the whole process (every thread: glibc broadcasts set*id) to
/// `spec`'s user and group, with no supplementary groups, and checks that
/// root cannot be regained.
pub fn drop_privileges(spec: &crate::types::UserSpec) -> crate::error::Result<()> {
    use nix::unistd::{Gid, Group, Uid, User, getegid, geteuid, setgid, setgroups, setuid};

    use crate::error::{Context, Error};

    let what = || format!("switch to user {spec}");
    let lookup_err = |e: nix::Error| Error::io(what(), e.into());
    let user = User::from_name(&spec.user).map_err(lookup_err)?;
    let uid = match (&user, spec.user.parse::<u32>()) {
        (Some(u), _) => u.uid,
        (None, Ok(n)) => Uid::from_raw(n),
        (None, Err(_)) => {
            return Err(Error::config(format!("{}: no such user", what())));
        }
    };
    let gid = match &spec.group {
        Some(g) => match (Group::from_name(g).map_err(lookup_err)?, g.parse::<u32>()) {
            (Some(grp), _) => grp.gid,
            (None, Ok(n)) => Gid::from_raw(n),
            (None, Err(_)) => {
                return Err(Error::config(format!("{}: no such group {g}", what())));
            }
        },
        None => match &user {
            Some(u) => u.gid,
            None => {
                return Err(Error::config(format!(
                    "{}: uid {uid} has no passwd entry: give the group as USER:GROUP",
                    what()
                )));
            }
        },
    };
    let hint = "switching user needs root (CAP_SETUID and CAP_SETGID)";
    setgroups(&[gid])
        .map_err(io::Error::from)
        .context(|| format!("{}: set supplementary groups", what()))
        .map_err(|e| e.with_hint(hint))?;
    setgid(gid)
        .map_err(io::Error::from)
        .context(|| format!("{}: set group {gid}", what()))
        .map_err(|e| e.with_hint(hint))?;
    setuid(uid)
        .map_err(io::Error::from)
        .context(|| format!("{}: set user {uid}", what()))
        .map_err(|e| e.with_hint(hint))?;
    if geteuid() != uid || getegid() != gid || (!uid.is_root() && setuid(Uid::from_raw(0)).is_ok())
    {
        return Err(Error::config(format!(
            "{}: the switch did not take",
            what()
        )));
    }
    crate::info!("running as uid {uid}, gid {gid}");
    Ok(())
}

/// The inode number that identifies `sock` in `/proc/net/udp`.
pub fn socket_inode(sock: &UdpSocket) -> Option<u64> {
    nix::sys::stat::fstat(sock).ok().map(|st| st.st_ino)
}

/// Datagrams the kernel dropped at these sockets (full receive buffer,
/// bad checksum): the `drops` column of `/proc/net/udp` and `udp6` in the
/// calling thread's namespace. None if unreadable.
pub fn udp_socket_drops(inodes: &[u64]) -> Option<u64> {
    let mut total = 0;
    let mut found = false;
    for table in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(inode), Some(drops)) = (cols.get(9), cols.get(12)) else {
                continue;
            };
            if inode.parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                total += drops.parse::<u64>().unwrap_or(0);
                found = true;
            }
        }
    }
    found.then_some(total)
}

/// Packets the kernel dropped on their way into device `name` (for a TUN
/// device: its queue to tunfwd was full): the transmit `drop` column of
/// `/proc/net/dev` in the calling thread's namespace. None if unreadable.
pub fn device_tx_drops(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    text.lines().skip(2).find_map(|line| {
        let (dev, counters) = line.split_once(':')?;
        if dev.trim() != name {
            return None;
        }
        // 8 receive counters, then transmit bytes, packets, errs, drop.
        counters.split_whitespace().nth(11)?.parse().ok()
    })
}

/// Asks the kernel to report ICMP errors (peer port or host unreachable)
/// for datagrams sent from this unconnected socket: `IP_RECVERR`, and
/// `IPV6_RECVERR` on an IPv6 socket. They arrive on the socket's error
/// queue, which [`drain_error_queue`] empties and counts.
pub fn enable_recverr(sock: &UdpSocket) -> io::Result<()> {
    let v6 = sock.local_addr()?.is_ipv6();
    if v6 {
        setsockopt(sock, sockopt::Ipv6RecvErr, &true)?;
    }
    // On an IPv6 socket this covers IPv4-mapped peers; on IPv4 it is the
    // only one.
    match setsockopt(sock, sockopt::Ipv4RecvErr, &true) {
        Err(e) if v6 => {
            let _ = e;
            Ok(())
        }
        r => r.map_err(Into::into),
    }
}

/// Reads every queued ICMP error off `sock` (`MSG_ERRQUEUE`) and returns
/// how many there were. Nonblocking; the queue holds kernel memory charged
/// to the socket's receive buffer, so it must not be left to fill.
pub fn drain_error_queue(sock: &UdpSocket) -> u64 {
    let mut n = 0;
    let mut data = [0u8; 64];
    let mut cmsg = nix::cmsg_space!([u8; 64]);
    loop {
        let mut iov = [io::IoSliceMut::new(&mut data)];
        let r = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        );
        match r {
            Ok(_) => n += 1,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    // A pending error that did not fit on the queue (receive buffer full)
    // still raises POLLERR: reading SO_ERROR clears it.
    match nix::sys::socket::getsockopt(sock, sockopt::SocketError) {
        Ok(0) | Err(_) => n,
        Ok(_) => n.max(1),
    }
}

/// Lets this process raise its threads' priority to `nice` later without
/// CAP_SYS_NICE (which `--user` gives up): RLIMIT_NICE of `20 - nice`, if
/// it is lower now. Needs CAP_SYS_RESOURCE to raise the hard limit; a
/// refusal is left for the first raise to report.
pub fn allow_nice(nice: i32) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = (20 - nice.clamp(-20, 19)) as u64;
    match getrlimit(Resource::RLIMIT_NICE) {
        Ok((soft, hard)) if soft < want => {
            let _ = setrlimit(Resource::RLIMIT_NICE, want, hard.max(want));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The poll engine's receive and send, through the shared codec, on
    /// loopback: the sender's address, a GSO send arriving as datagrams of
    /// its segment size, the outer TOS byte both ways (IPv4, IPv6, and
    /// IPv4-mapped through a dual-stack socket), the arrival time, and the
    /// kernel's MSG_TRUNC.
    #[test]
    fn receive_and_send_through_the_codec_on_loopback() {
        // (receiver binds, sender binds, the receiver as the sender names it)
        type Name = fn(SocketAddr) -> SocketAddr;
        let cases: [(&str, &str, Name); 3] = [
            ("127.0.0.1:0", "127.0.0.1:0", |a| a),
            ("[::1]:0", "[::1]:0", |a| a),
            ("[::]:0", "[::]:0", |a| {
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), a.port()))
            }),
        ];
        for (rx_at, tx_at, name) in cases {
            let bind = |at: &str| UdpSocket::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"));
            let (rx, tx) = (bind(rx_at), bind(tx_at));
            rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            enable_rx_timestamps(&rx).unwrap();
            enable_rx_tos(&rx).unwrap();
            let to = name(rx.local_addr().unwrap());
            let before = crate::engine::now_ns();
            // One GSO send of three 100-byte datagrams (ECT(0)), then one
            // of 300 (ECT(1)).
            let data = [7u8; 300];
            let iov = [io::IoSlice::new(&data)];
            assert_eq!(send_gather(&tx, &iov, Some(100), 2, to), Ok(300));
            assert_eq!(send_gather(&tx, &iov, None, 1, to), Ok(300));
            let mut cmsg = segments_cmsg_space();
            let mut buf = [0u8; 200];
            for _ in 0..3 {
                let r = recv_segments(&rx, &mut buf, &mut cmsg).unwrap();
                assert_eq!((r.len, r.truncated), (100, false), "{rx_at}");
                let from = r.src.expect("a sender");
                assert_eq!(from.port(), tx.local_addr().unwrap().port(), "{rx_at}");
                assert_eq!(r.tos, Some(2), "{rx_at}: ECT(0) outside");
                let at = r.arrived_ns.expect("an arrival time");
                assert!(at >= before && at <= crate::engine::now_ns(), "{rx_at}");
            }
            let r = recv_segments(&rx, &mut buf, &mut cmsg).unwrap();
            assert_eq!(
                (r.len, r.truncated, r.tos),
                (200, true, Some(1)),
                "{rx_at}: cut to the buffer, ECT(1) outside"
            );
        }
    }
}
