//! The portable engine: `poll(2)` over a nonblocking TUN queue and UDP socket.
//!
//! Each wakeup drains up to `batch` packets per direction. When a destination
//! is full (`EAGAIN`), the packet in hand is kept, reading from that direction's
//! source stops, and the worker waits for the destination to become writable:
//! nothing is dropped for lack of room. Packets are read straight into the
//! buffer they are sent from: no copy between the two endpoints.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::engine::{Shutdown, is_fatal_tun_error, send_addr};
use crate::error::{Error, Result};
use crate::forward::{Decision, DropReason, Forwarder};
use crate::stats::WorkerStats;

/// Largest packet a read may return: the largest IP packet.
const BUF_LEN: usize = 65536;

/// One worker: a TUN queue, a UDP socket, and the policy between them.
pub struct PollWorker {
    /// Name used in error messages: "TUN queue 0 of tun0".
    pub label: String,
    pub tun: File,
    pub udp: UdpSocket,
    pub forwarder: Forwarder,
    /// Max packets per direction per wakeup.
    pub batch: usize,
    /// Never sleep in poll(2): spin with a zero timeout.
    pub busy_poll: bool,
    pub stats: Arc<WorkerStats>,
    pub shutdown: Arc<Shutdown>,
}

/// Outcome of trying to hand one packet to its destination.
enum Push {
    Done,
    /// Destination full: keep the packet and wait for writability.
    Full,
}

impl PollWorker {
    /// Forwards until shutdown, or until the TUN device fails.
    pub fn run(self) -> Result<()> {
        let mut to_peer_buf = vec![0u8; BUF_LEN];
        let mut to_tun_buf = vec![0u8; BUF_LEN];
        // Length of a packet held in the buffer because its destination was full.
        let mut to_peer_pending: Option<usize> = None;
        let mut to_tun_pending: Option<usize> = None;
        let peer = send_addr(
            self.udp.local_addr().map_err(|e| {
                Error::io(format!("query address of UDP socket for {}", self.label), e)
            })?,
            self.forwarder.peer(),
        );
        let stats = &*self.stats;

        while !self.shutdown.is_triggered() {
            let mut tun_events = PollFlags::empty();
            let mut udp_events = PollFlags::empty();
            if to_peer_pending.is_none() {
                tun_events |= PollFlags::POLLIN;
            } else {
                udp_events |= PollFlags::POLLOUT;
            }
            if to_tun_pending.is_none() {
                udp_events |= PollFlags::POLLIN;
            } else {
                tun_events |= PollFlags::POLLOUT;
            }
            let mut fds = [
                PollFd::new(self.tun.as_fd(), tun_events),
                PollFd::new(self.udp.as_fd(), udp_events),
                PollFd::new(self.shutdown.wake_fd(), PollFlags::POLLIN),
            ];
            stats.syscalls.add(1);
            let timeout = if self.busy_poll {
                PollTimeout::ZERO
            } else {
                stats.waits.add(1);
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(Error::io(format!("poll {}", self.label), e.into()));
                }
            }
            let ready = |fd: &PollFd<'_>, want: PollFlags| {
                fd.revents()
                    .is_some_and(|r| r.intersects(want | PollFlags::POLLERR | PollFlags::POLLHUP))
            };
            let tun_in = ready(&fds[0], PollFlags::POLLIN);
            let tun_out = ready(&fds[0], PollFlags::POLLOUT);
            let udp_in = ready(&fds[1], PollFlags::POLLIN);
            let udp_out = ready(&fds[1], PollFlags::POLLOUT);
            if fds[2].revents().is_some_and(|r| !r.is_empty()) {
                break;
            }
            if fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLNVAL))
            {
                return Err(Error::config(format!("{} was closed", self.label)));
            }

            // Retry what the destinations refused last time.
            if let (Some(len), true) = (to_peer_pending, udp_out) {
                if let Push::Done = self.push_to_peer(&to_peer_buf[..len], peer) {
                    to_peer_pending = None;
                }
            }
            if let (Some(len), true) = (to_tun_pending, tun_out) {
                if let Push::Done = self.push_to_tun(&to_tun_buf[..len])? {
                    to_tun_pending = None;
                }
            }

            if tun_in && to_peer_pending.is_none() {
                to_peer_pending = self.drain_tun(&mut to_peer_buf, peer)?;
            }
            if udp_in && to_tun_pending.is_none() {
                to_tun_pending = self.drain_udp(&mut to_tun_buf)?;
            }
        }
        Ok(())
    }

    /// Reads up to `batch` packets from the TUN queue and sends each to the
    /// peer. Returns the length of a packet left in `buf` if the socket filled.
    fn drain_tun(&self, buf: &mut [u8], peer: SocketAddr) -> Result<Option<usize>> {
        let stats = &self.stats;
        for _ in 0..self.batch {
            stats.syscalls.add(1);
            let len = match (&self.tun).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io(format!("read from {}", self.label), e));
                }
            };
            match self.forwarder.handle_from_tun(&buf[..len]) {
                Decision::ToPeer => {
                    if let Push::Full = self.push_to_peer(&buf[..len], peer) {
                        stats.tun_to_peer.backpressure.add(1);
                        return Ok(Some(len));
                    }
                }
                Decision::Drop(reason) => stats.tun_to_peer.drop(reason),
                // A hairpin (the core answering on the same side): no waiting
                // for room here, a full TUN queue loses the packet.
                Decision::ToTun => {
                    if let Push::Full = self.push_to_tun(&buf[..len])? {
                        stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Receives up to `batch` datagrams and writes each accepted one to the
    /// TUN queue. Returns the length of a packet left in `buf` if the TUN
    /// queue was full.
    fn drain_udp(&self, buf: &mut [u8]) -> Result<Option<usize>> {
        let stats = &self.stats;
        for _ in 0..self.batch {
            stats.syscalls.add(1);
            let (len, src) = match self.udp.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors queued on the socket (peer port unreachable, ...):
                // the socket stays usable.
                Err(e) if is_transient_socket_error(&e) => {
                    stats.io_errors.add(1);
                    continue;
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("receive on UDP socket of {}", self.label),
                        e,
                    ));
                }
            };
            match self.forwarder.handle_from_peer(src, &buf[..len]) {
                Decision::ToTun => {
                    if let Push::Full = self.push_to_tun(&buf[..len])? {
                        stats.peer_to_tun.backpressure.add(1);
                        return Ok(Some(len));
                    }
                }
                Decision::Drop(reason) => stats.peer_to_tun.drop(reason),
                Decision::ToPeer => {
                    if let Push::Full = self.push_to_peer(&buf[..len], self.forwarder.peer()) {
                        stats.tun_to_peer.drop(DropReason::SendFailed);
                    }
                }
            }
        }
        Ok(None)
    }

    fn push_to_peer(&self, packet: &[u8], peer: SocketAddr) -> Push {
        let stats = &self.stats;
        loop {
            stats.syscalls.add(1);
            match self.udp.send_to(packet, peer) {
                Ok(_) => {
                    stats.tun_to_peer.delivered(packet.len());
                    return Push::Done;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Push::Full,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Unreachable peer, no route, full device queue (ENOBUFS),
                // firewall: the datagram is lost, the worker goes on.
                Err(_) => {
                    stats.tun_to_peer.drop(DropReason::SendFailed);
                    return Push::Done;
                }
            }
        }
    }

    fn push_to_tun(&self, packet: &[u8]) -> Result<Push> {
        let stats = &self.stats;
        loop {
            stats.syscalls.add(1);
            match (&self.tun).write(packet) {
                Ok(_) => {
                    stats.peer_to_tun.delivered(packet.len());
                    return Ok(Push::Done);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Push::Full),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fatal_tun_error(&e) => {
                    return Err(Error::io(format!("write to {}", self.label), e));
                }
                // E.g. EIO while the link is down, EINVAL for a packet the
                // kernel refuses: lose this one packet.
                Err(_) => {
                    stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                    return Ok(Push::Done);
                }
            }
        }
    }
}

/// Socket errors that report a past ICMP error rather than a broken socket.
fn is_transient_socket_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::ENETUNREACH)
            | Some(libc::EHOSTDOWN)
            | Some(libc::ENETDOWN)
            | Some(libc::EPROTO)
    )
}
