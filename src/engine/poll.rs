//! The portable engine: `poll(2)` over a nonblocking TUN queue and UDP socket.
//!
//! Each wakeup drains up to `batch` packets per direction. When a destination
//! is full (`EAGAIN`), the packet in hand is kept, reading from that direction's
//! source stops, and the worker waits for the destination to become writable:
//! nothing is dropped for lack of room. Packets are read straight into the
//! buffer they are sent from: no copy between the two endpoints.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::engine::{Shutdown, is_fatal_tun_error, send_addr, tun_failure};
use crate::error::{Error, Result};
use crate::forward::{Decision, DropReason, Forwarder};
use crate::packet::offload::{self, Coalescer};
use crate::packet::virtio::{self, VirtioNetHdr};
use crate::stats::WorkerStats;

/// Largest read: the largest IP packet plus a virtio-net header.
const BUF_LEN: usize = 65536 + virtio::LEN;
/// Room for a super-packet cut into segments (headers repeated).
const SPLIT_LEN: usize = 2 * 65536;

/// One worker: a TUN queue, a UDP socket, and the policy between them.
pub struct PollWorker {
    /// Name used in error messages: "TUN queue 0 of tun0".
    pub label: String,
    pub tun: crate::device::TunQueue,
    pub udp: UdpSocket,
    pub forwarder: Forwarder,
    /// Max packets per direction per wakeup.
    pub batch: usize,
    /// Never sleep in poll(2): spin with a zero timeout.
    pub busy_poll: bool,
    pub stats: Arc<WorkerStats>,
    pub shutdown: Arc<Shutdown>,
    /// Set when the TUN queue carries virtio-net headers (`--offload`).
    pub offload: Option<PollOffload>,
}

/// Offload state of a poll worker.
#[derive(Debug)]
pub struct PollOffload {
    /// Send segmented super-packets with UDP GSO; cleared (once, said in a
    /// log line) if the kernel refuses it.
    pub gso: std::cell::Cell<bool>,
    /// The socket has UDP_GRO on: receives may hold several datagrams.
    pub gro: bool,
}

/// Datagrams waiting for room in the socket: bytes `start..len` of the
/// buffer, cut every `seg`.
#[derive(Clone, Copy, Debug)]
struct Held {
    start: usize,
    len: usize,
    seg: usize,
}

/// Most datagrams one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS
/// on older kernels), and most bytes (one UDP payload).
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65507;

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
        let offloading = self.offload.is_some();
        let mut split_buf = vec![0u8; if offloading { SPLIT_LEN } else { 0 }];
        let mut coalescer = Coalescer::new();
        // Data held because its destination was full: datagrams in
        // to_peer_buf (or split_buf when offloading); a packet in to_tun_buf
        // (or, offloading, the index of the next coalesced TUN write).
        let mut to_peer_pending: Option<Held> = None;
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
            if fds[1]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLERR))
            {
                // ICMP errors for our sends (IP_RECVERR): count and clear,
                // or POLLERR would stay set.
                stats
                    .peer_unreachable
                    .add(crate::platform::drain_error_queue(&self.udp));
            }
            if fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLNVAL))
            {
                return Err(Error::config(format!("{} was closed", self.label)));
            }

            // Retry what the destinations refused last time.
            if let (Some(held), true) = (to_peer_pending, udp_out) {
                let data = if offloading {
                    &split_buf[held.start..held.len]
                } else {
                    &to_peer_buf[held.start..held.len]
                };
                to_peer_pending = match self.push_datagrams(data, held.seg, peer) {
                    (Push::Done, _) => None,
                    (Push::Full, sent) => Some(Held {
                        start: held.start + sent,
                        ..held
                    }),
                };
            }
            if let (Some(at), true) = (to_tun_pending, tun_out) {
                to_tun_pending = if offloading {
                    self.flush_tun_writes(&mut coalescer, at)?
                } else if let Push::Done =
                    self.push_to_tun(&to_tun_buf[self.forwarder.encap_len()..at])?
                {
                    None
                } else {
                    Some(at)
                };
            }

            if tun_in && to_peer_pending.is_none() {
                to_peer_pending = if offloading {
                    self.drain_tun_offload(&mut to_peer_buf, &mut split_buf, peer)?
                } else {
                    self.drain_tun(&mut to_peer_buf, peer)?.map(|len| Held {
                        start: 0,
                        len,
                        seg: len,
                    })
                };
            }
            if udp_in && to_tun_pending.is_none() {
                to_tun_pending = if offloading {
                    self.drain_udp_gro(&mut to_tun_buf, &mut coalescer)?
                } else {
                    self.drain_udp(&mut to_tun_buf)?
                };
            }
        }
        Ok(())
    }

    /// Reads up to `batch` packets from the TUN queue and sends each to the
    /// peer. Returns the length of a packet left in `buf` if the socket filled.
    fn drain_tun(&self, buf: &mut [u8], peer: SocketAddr) -> Result<Option<usize>> {
        let stats = &self.stats;
        // Headroom for the encapsulation header (VXLAN in TAP mode): the
        // frame is read behind it and sent with it, without a copy.
        let head = self.forwarder.encap_len();
        for _ in 0..self.batch {
            stats.syscalls.add(1);
            let len = match self.tun.read(&mut buf[head..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(tun_failure("read from", &self.label, e));
                }
            };
            match self
                .forwarder
                .handle_from_tun_mut(&mut buf[head..head + len])
            {
                Decision::ToPeer => {
                    self.forwarder.write_encap(&mut buf[..head]);
                    if let Push::Full = self.push_to_peer(&buf[..head + len], peer) {
                        stats.tun_to_peer.backpressure.add(1);
                        return Ok(Some(head + len));
                    }
                }
                Decision::Drop(reason) => stats.tun_to_peer.drop(reason),
                // A hairpin (the core answering on the same side): no waiting
                // for room here, a full TUN queue loses the packet.
                Decision::ToTun => {
                    if let Push::Full = self.push_to_tun(&buf[head..head + len])? {
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
                    let head = self.forwarder.encap_len();
                    if let Push::Full = self.push_to_tun(&buf[head..len])? {
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

    /// Offload mode: reads up to `batch` packets (each with a virtio-net
    /// header) and sends them, super-packets cut into segments and sent with
    /// one UDP GSO send. Returns what is held if the socket filled.
    fn drain_tun_offload(
        &self,
        buf: &mut [u8],
        split_buf: &mut [u8],
        peer: SocketAddr,
    ) -> Result<Option<Held>> {
        let stats = &self.stats;
        for _ in 0..self.batch {
            stats.syscalls.add(1);
            let n = match self.tun.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(tun_failure("read from", &self.label, e)),
            };
            let Some(hdr) = VirtioNetHdr::parse(&buf[..n]) else {
                stats.tun_to_peer.drop(DropReason::Truncated);
                continue;
            };
            let pkt = &buf[virtio::LEN..n];
            let segs = match offload::split(&hdr, pkt, self.forwarder.mtu(), split_buf) {
                Ok(s) => s,
                Err(_) => {
                    stats.tun_to_peer.drop(DropReason::BadOffload);
                    continue;
                }
            };
            let data = &split_buf[..segs.total_len()];
            if segs.count == 1 {
                // An ordinary packet: the same checks as without offload.
                if let Decision::Drop(r) = self.forwarder.handle_from_tun(data) {
                    stats.tun_to_peer.drop(r);
                    continue;
                }
            }
            if let (Push::Full, sent) = self.push_datagrams(data, segs.seg_len, peer) {
                stats.tun_to_peer.backpressure.add(1);
                return Ok(Some(Held {
                    start: sent,
                    len: segs.total_len(),
                    seg: segs.seg_len,
                }));
            }
        }
        Ok(None)
    }

    /// Sends `data` as datagrams of `seg` bytes (the last may be shorter):
    /// plain sends, UDP GSO sends of up to 64 datagrams, or, if the kernel
    /// refused GSO, one send per datagram. Returns Full and the bytes already
    /// sent if the socket filled up.
    fn push_datagrams(&self, data: &[u8], seg: usize, peer: SocketAddr) -> (Push, usize) {
        let stats = &self.stats;
        let seg = seg.max(1);
        let per_send = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / seg).max(1) * seg;
        let mut sent = 0;
        while sent < data.len() {
            let gso = self.offload.as_ref().is_some_and(|o| o.gso.get());
            let chunk_len = if gso { per_send } else { seg };
            let chunk = &data[sent..data.len().min(sent + chunk_len)];
            let r = if chunk.len() <= seg {
                self.push_to_peer(chunk, peer)
            } else {
                match self.send_gso(chunk, seg, peer) {
                    Some(p) => p,
                    None => continue, // GSO just turned off: resend this chunk plainly
                }
            };
            match r {
                Push::Done => sent += chunk.len(),
                Push::Full => return (Push::Full, sent),
            }
        }
        let _ = stats;
        (Push::Done, sent)
    }

    /// One UDP GSO send of `chunk` (datagrams of `seg` bytes). None if the
    /// kernel refused GSO: it is then off for this worker (one log line).
    fn send_gso(&self, chunk: &[u8], seg: usize, peer: SocketAddr) -> Option<Push> {
        let stats = &self.stats;
        let count = chunk.len().div_ceil(seg);
        loop {
            stats.syscalls.add(1);
            let r = crate::platform::send_segments(&self.udp, chunk, seg as u16, peer);
            return match r {
                Ok(_) => {
                    stats.gso_sends.add(1);
                    stats.gso_segments.add(count as u64);
                    stats.tun_to_peer.packets.add(count as u64);
                    stats.tun_to_peer.bytes.add(chunk.len() as u64);
                    Some(Push::Done)
                }
                Err(Errno::EAGAIN) => Some(Push::Full),
                Err(Errno::EINTR) => continue,
                // The kernel or device refuses segmentation offload.
                Err(e @ (Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)) => {
                    if let Some(o) = &self.offload {
                        o.gso.set(false);
                    }
                    crate::info!(
                        "{}: UDP GSO refused ({e}): sending datagrams one by one",
                        self.label
                    );
                    None
                }
                // Unreachable peer and the like: these datagrams are lost.
                Err(_) => {
                    for _ in 0..count {
                        stats.tun_to_peer.drop(DropReason::SendFailed);
                    }
                    Some(Push::Done)
                }
            };
        }
    }

    /// Offload mode: receives up to `batch` times (with GRO, each receive
    /// may hold many datagrams), coalesces accepted TCP segments and writes
    /// them to the TUN queue with virtio-net headers. Returns the index of
    /// the next write if the TUN queue was full.
    fn drain_udp_gro(&self, buf: &mut [u8], coalescer: &mut Coalescer) -> Result<Option<usize>> {
        let stats = &self.stats;
        let mut cmsg = crate::platform::segments_cmsg_space();
        for _ in 0..self.batch {
            stats.syscalls.add(1);
            let (n, src, seg) = match crate::platform::recv_segments(&self.udp, buf, &mut cmsg) {
                Ok(r) => r,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) if crate::platform::is_transient_socket_errno(e) => {
                    stats.io_errors.add(1);
                    continue;
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("receive on UDP socket of {}", self.label),
                        e.into(),
                    ));
                }
            };
            let Some(src) = src else {
                stats.peer_to_tun.drop(DropReason::NotFromPeer);
                continue;
            };
            let seg = seg.unwrap_or(n).max(1);
            if seg < n {
                stats.gro_receives.add(1);
                stats.gro_datagrams.add(n.div_ceil(seg) as u64);
            }
            coalescer.clear();
            let data = &buf[..n];
            if n == 0 {
                // Empty from the peer, or a stranger's: the core decides.
                if let Decision::Drop(r) = self.forwarder.handle_from_peer(src, &[]) {
                    stats.peer_to_tun.drop(r);
                }
                continue;
            }
            for chunk in data.chunks(seg) {
                match self.forwarder.handle_from_peer(src, chunk) {
                    Decision::ToTun => coalescer.push(chunk),
                    Decision::Drop(r) => stats.peer_to_tun.drop(r),
                    Decision::ToPeer => stats.peer_to_tun.drop(DropReason::SendFailed),
                }
            }
            if let Some(at) = self.flush_tun_writes(coalescer, 0)? {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Writes the coalescer's TUN writes from index `from`; returns the
    /// index to resume at if the TUN queue is full.
    fn flush_tun_writes(&self, coalescer: &mut Coalescer, from: usize) -> Result<Option<usize>> {
        let stats = &self.stats;
        let (bytes, writes) = coalescer.finish();
        for (i, w) in writes.iter().enumerate().skip(from) {
            let frame = &bytes[w.start..w.end];
            match self.write_tun(frame)? {
                TunWrite::Written => {
                    stats.vnet_writes.add(1);
                    stats.vnet_write_packets.add(w.packets as u64);
                    // Count the packets as they arrived: the super-packet
                    // plus the headers its segments each had.
                    let hdr = VirtioNetHdr::parse(frame).unwrap_or_default();
                    let ip_len = frame.len() - virtio::LEN;
                    let extra = (w.packets - 1) * usize::from(hdr.hdr_len);
                    stats.peer_to_tun.packets.add(w.packets as u64);
                    stats.peer_to_tun.bytes.add((ip_len + extra) as u64);
                }
                TunWrite::Full => {
                    stats.peer_to_tun.backpressure.add(1);
                    return Ok(Some(i));
                }
                TunWrite::Failed => {
                    for _ in 0..w.packets {
                        stats.peer_to_tun.drop(DropReason::TunWriteFailed);
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
        match self.write_tun(packet)? {
            TunWrite::Written => {
                self.stats.peer_to_tun.delivered(packet.len());
                Ok(Push::Done)
            }
            TunWrite::Full => Ok(Push::Full),
            TunWrite::Failed => {
                self.stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                Ok(Push::Done)
            }
        }
    }

    /// One write to the TUN queue. Fatal device errors end the worker.
    fn write_tun(&self, frame: &[u8]) -> Result<TunWrite> {
        loop {
            self.stats.syscalls.add(1);
            match self.tun.write(frame) {
                Ok(_) => return Ok(TunWrite::Written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(TunWrite::Full),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fatal_tun_error(&e) => {
                    return Err(tun_failure("write to", &self.label, e));
                }
                // E.g. EIO while the link is down, EINVAL for a packet the
                // kernel refuses: lose this one.
                Err(_) => return Ok(TunWrite::Failed),
            }
        }
    }
}

/// Outcome of one TUN write.
enum TunWrite {
    Written,
    Full,
    Failed,
}

/// Socket errors that report a past ICMP error rather than a broken socket.
fn is_transient_socket_error(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|n| crate::platform::is_transient_socket_errno(Errno::from_raw(n)))
}
