//! Peer to TUN: one receive checked, opened and coalesced
//! ([`Datapath::handle_receive`]), CoDel on the receive side, the flow
//! queues' receive side, and the results of TUN writes.

use super::*;

/// The receive side's own state.
#[derive(Debug)]
pub(super) struct RxState {
    /// CoDel over the time datagrams waited in the socket's receive queue.
    pub(super) aqm: Option<crate::aqm::Codel>,
    /// A CoDel signal not yet carried out: the next packet that carries
    /// data gets it (TCP control packets, which free no room and cannot
    /// carry a mark, pass).
    pub(super) aqm_pending: bool,
}

/// One receive from the UDP socket, as the engine got it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The sender; None if its address family is not IP.
    pub src: Option<SocketAddr>,
    /// Where the payload lies in the receive buffer.
    pub payload: Range<usize>,
    /// UDP GRO: the payload holds datagrams of this size (the last may be
    /// shorter). None: one datagram.
    pub gro_size: Option<usize>,
    /// The kernel cut the payload to the buffer (`MSG_TRUNC`). Whether the
    /// receive counts as truncated is the datapath's rule
    /// ([`Datapath::is_truncated`]), the same for every engine.
    pub truncated: bool,
    /// When the kernel queued it (`SO_TIMESTAMPNS`, ns since the Unix
    /// epoch), if it said.
    pub arrived_ns: Option<u64>,
    /// The outer header's TOS byte or traffic class, if the kernel said
    /// (WireGuard asks: the ECN bits go into the packet).
    pub tos: Option<u8>,
}

/// What a receive becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum RxAction {
    /// Write these bytes of the receive buffer to the TUN device (one
    /// packet, its encapsulation header stripped).
    Write(Range<usize>),
    /// Offload: write the coalescer's writes, in order.
    Coalesced,
    /// Nothing to write: dropped and counted, or (WireGuard) a handshake
    /// message handed on or a keepalive, counted as such.
    Dropped,
}

/// What one TUN write carries, for counting its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteInfo {
    /// Packets as they arrived (a coalesced write carries several).
    pub packets: usize,
    /// Their bytes as they arrived.
    pub bytes: usize,
    /// Written with a virtio-net header (offload).
    pub vnet: bool,
}

impl WriteInfo {
    /// A single packet of `len` bytes.
    pub fn plain(len: usize) -> WriteInfo {
        WriteInfo {
            packets: 1,
            bytes: len,
            vnet: false,
        }
    }

    /// One of a coalescer's writes.
    pub fn coalesced(w: &offload::TunWrite) -> WriteInfo {
        WriteInfo {
            packets: w.packets,
            bytes: w.bytes,
            vnet: true,
        }
    }
}

/// The counters of a receive's peer, where the table counts per peer.
pub(super) struct PeerCount<'a>(pub(super) Option<&'a crate::peers::PeerCounters>);

impl PeerCount<'_> {
    /// A packet of `len` bytes from the peer was accepted.
    pub(super) fn accepted(&self, len: usize) {
        if let Some(c) = self.0 {
            c.rx_packets.add(1);
            c.rx_bytes.add(len as u64);
        }
    }

    /// A packet from the peer was dropped for `reason`.
    pub(super) fn dropped(&self, reason: DropReason) {
        if let Some(c) = self.0 {
            c.drop(reason);
        }
    }
}

impl Datapath {
    /// A receive `rx` landed in buffer `id` (`buf`) and was taken at
    /// `now_ns` (wall clock, as [`Datapath::handle_receive`]): queue it by
    /// the flow of its first packet, as of its arrival in the socket. The
    /// buffer is the queue's until [`Datapath::rx_next`] hands it back.
    pub fn rx_enqueue(&mut self, id: u32, rx: &Received, buf: &[u8], now_ns: u64) {
        let Some(q) = &mut self.queues.rxq else {
            return;
        };
        let first = rx.payload.start
            + rx.gro_size
                .unwrap_or(rx.payload.len())
                .min(rx.payload.len());
        let inner = buf
            .get(rx.payload.start + self.fwd.encap_len()..first.min(buf.len()))
            .unwrap_or(&[]);
        let at = rx.arrived_ns.unwrap_or(now_ns).min(now_ns);
        let len = rx.payload.len();
        q.enqueue(id, inner, len, at, &self.stats.peer_to_tun);
    }

    /// The next queued receive to handle at `now_ns` (wall clock), unless
    /// the in-flight limit of TUN writes is reached. Its
    /// buffer is handed back with [`Datapath::rx_done`].
    pub fn rx_next(&mut self, now_ns: u64) -> Option<crate::fq::Dequeued> {
        self.queues
            .rxq
            .as_mut()?
            .next(now_ns, &self.stats.peer_to_tun)
    }

    /// The buffer of a dequeued receive is free again.
    pub fn rx_done(&mut self, d: &crate::fq::Dequeued) {
        if let Some(q) = &mut self.queues.rxq {
            q.done(d, &self.stats.peer_to_tun);
        }
    }

    /// CoDel's verdict on a receive leaving the socket's queue at `now_ns`:
    /// true if one of its packets is to be marked or dropped.
    pub(super) fn aqm_signal(&mut self, rx: &Received, now_ns: u64) -> bool {
        let Some(at) = rx.arrived_ns else {
            return false;
        };
        let sojourn = now_ns.saturating_sub(at);
        self.stats.peer_to_tun.queue_delay.record(sojourn);
        match &mut self.rx.aqm {
            Some(codel) => codel.on_dequeue(now_ns, sojourn),
            None => false,
        }
    }

    /// Carries out a pending CoDel signal on an accepted packet: a CE mark
    /// if it is ECN-capable, else a counted drop. Returns false if the
    /// packet is to be dropped. A TCP segment without data passes and leaves
    /// the signal for the next packet: dropping it would free no room, and
    /// an ECN-capable flow's SYNs, FINs and ACKs cannot carry a mark.
    pub(super) fn aqm_apply(pending: &mut bool, stats: &WorkerStats, pkt: &mut [u8]) -> bool {
        if !*pending || crate::aqm::is_tcp_without_data(pkt) {
            return true;
        }
        *pending = false;
        if crate::packet::ecn::mark_ce(pkt) {
            stats.aqm_marks.add(1);
            true
        } else {
            stats.peer_to_tun.drop(DropReason::Aqm);
            false
        }
    }

    /// A receive (`rx`, whose payload lies in `buf`), taken from the socket
    /// at `now_ns` (ns since the Unix epoch, the clock of `rx.arrived_ns`).
    /// Plain: says which bytes to write. Offload: fills `coalescer`
    /// (cleared first). With AQM, a packet found in a standing queue is
    /// CE-marked in place or dropped.
    pub fn handle_receive(
        &mut self,
        rx: &Received,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        now_ns: u64,
    ) -> RxAction {
        let Some(src) = rx.src else {
            self.stats.peer_to_tun.drop(DropReason::NotFromPeer);
            return RxAction::Dropped;
        };
        if self.wg.is_some() {
            // Its peer is known once it is opened.
            if self.is_truncated(rx) {
                self.stats.peer_to_tun.drop(DropReason::OverMtu);
                return RxAction::Dropped;
            }
            return self.receive_wg(rx, src, buf, coalescer, now_ns);
        }
        let peer = self.fwd.source_peer(src);
        if self.is_truncated(rx) {
            // Longer than the buffer: over the MTU, unless a stranger sent it.
            let reason = match peer {
                Some(p) => {
                    self.count_peer_rx_drop(p, DropReason::OverMtu, now_ns);
                    DropReason::OverMtu
                }
                None => DropReason::NotFromPeer,
            };
            self.stats.peer_to_tun.drop(reason);
            return RxAction::Dropped;
        }
        if peer.is_some() && self.aqm_signal(rx, now_ns) {
            self.rx.aqm_pending = true;
        }
        self.receive(rx, peer, buf, coalescer, now_ns)
    }

    /// The one truncation rule: a receive is truncated if the kernel cut it
    /// (`MSG_TRUNC`) or, for one datagram (no GRO), if it is as long as a
    /// receive buffer needs to be ([`Datapath::max_receive_len`]): those
    /// are one byte longer than the largest datagram a peer may send, so a
    /// datagram that long is over the MTU, whatever room the engine's
    /// buffer had beyond it.
    pub fn is_truncated(&self, rx: &Received) -> bool {
        rx.truncated || (rx.gro_size.is_none() && rx.payload.len() >= self.max_receive_len())
    }

    /// A datagram from peer `p` dropped for `reason` at `now_ns`.
    pub(super) fn count_peer_rx_drop(&self, p: PeerId, reason: DropReason, now_ns: u64) {
        if self.peers.per_peer {
            let c = self.peer_counters(p);
            c.drop(reason);
            c.last_rx_ns.record(now_ns);
        }
    }

    /// A receive that the flow queues handed out (`d`) at `now_ns`: as
    /// [`Datapath::handle_receive`], with the queues' CoDel verdict (on the
    /// time since it arrived in the socket) instead of the single queue's.
    pub fn handle_dequeued_receive(
        &mut self,
        rx: &Received,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        d: &crate::fq::Dequeued,
        now_ns: u64,
    ) -> RxAction {
        let Some(src) = rx.src.filter(|_| !self.is_truncated(rx)) else {
            return self.handle_receive(rx, buf, coalescer, now_ns);
        };
        let peer = self.fwd.source_peer(src);
        if peer.is_some() && d.signal {
            self.rx.aqm_pending = true;
        }
        self.receive(rx, peer, buf, coalescer, now_ns)
    }

    /// The checks and the coalescing of a receive from `peer` (None: from
    /// no peer), taken at `now_ns`.
    pub(super) fn receive(
        &mut self,
        rx: &Received,
        peer: Option<PeerId>,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        now_ns: u64,
    ) -> RxAction {
        let pending = &mut self.rx.aqm_pending;
        let stats = &self.stats;
        let count = PeerCount(match (self.peers.per_peer, peer) {
            (true, Some(p)) => {
                let c = self.fwd.peers().peer(p).stats.worker(self.fwd.queue());
                c.last_rx_ns.record(now_ns);
                Some(c)
            }
            _ => None,
        });
        let payload = &mut buf[rx.payload.clone()];
        if !self.offload {
            let verdict = match self.fwd.handle_from(peer, payload) {
                PeerVerdict::ToTun if !Self::aqm_apply(pending, stats, payload) => {
                    PeerVerdict::Drop(DropReason::Aqm)
                }
                v => v,
            };
            return match verdict {
                PeerVerdict::ToTun => {
                    count.accepted(payload.len());
                    RxAction::Write(rx.payload.start + self.fwd.encap_len()..rx.payload.end)
                }
                PeerVerdict::Drop(r) => {
                    if r != DropReason::Aqm {
                        // (aqm_apply counted its own drop.)
                        stats.peer_to_tun.drop(r);
                    }
                    count.dropped(r);
                    RxAction::Dropped
                }
            };
        }
        coalescer.clear();
        if payload.is_empty() {
            // No datagrams to walk: the empty one is still counted (empty
            // from the peer, not_from_peer from a stranger).
            if let PeerVerdict::Drop(r) = self.fwd.handle_from(peer, payload) {
                stats.peer_to_tun.drop(r);
                count.dropped(r);
            }
            return RxAction::Dropped;
        }
        let seg = rx.gro_size.unwrap_or(payload.len()).max(1);
        if seg < payload.len() {
            stats.gro_receives.add(1);
            stats.gro_datagrams.add(payload.len().div_ceil(seg) as u64);
        }
        let mut at = rx.payload.start;
        while at < rx.payload.end {
            let datagram = at..(at + seg).min(rx.payload.end);
            at = datagram.end;
            match self.fwd.handle_from(peer, &buf[datagram.clone()]) {
                PeerVerdict::ToTun => {
                    // The first accepted packet with data carries a signal
                    // (a mark, or its loss).
                    if !Self::aqm_apply(pending, stats, &mut buf[datagram.clone()]) {
                        count.dropped(DropReason::Aqm);
                        continue;
                    }
                    let len = datagram.len();
                    if coalescer.push(buf, datagram).is_err() {
                        stats.peer_to_tun.drop(DropReason::BadChecksum);
                        count.dropped(DropReason::BadChecksum);
                    } else {
                        count.accepted(len);
                    }
                }
                PeerVerdict::Drop(r) => {
                    stats.peer_to_tun.drop(r);
                    count.dropped(r);
                }
            }
        }
        if coalescer.finish(buf).is_empty() {
            RxAction::Dropped
        } else {
            RxAction::Coalesced
        }
    }

    /// A receive whose layout could not be read (a multishot receive whose
    /// header does not fit its buffer): dropped as truncated.
    pub fn on_unreadable_receive(&self) {
        self.stats.peer_to_tun.drop(DropReason::Truncated);
    }

    /// The result of a UDP receive that failed with `e`: Ok(Retry) to try
    /// again (after waiting), Ok(Next) counted and go on, Err to stop the
    /// worker.
    pub fn on_receive_error(&self, e: Errno) -> Result<After> {
        match e {
            Errno::EAGAIN | Errno::EINTR | Errno::ECANCELED => Ok(After::Retry),
            e if crate::platform::is_transient_socket_errno(e)
                || matches!(e, Errno::ENOBUFS | Errno::ENOMEM) =>
            {
                self.stats.io_errors.add(1);
                Ok(After::Next)
            }
            e => Err(Error::io(
                format!("receive on UDP socket of {}", self.label),
                e.into(),
            )),
        }
    }

    /// The result of a TUN write of `w`. Err if the device is gone.
    /// `Errno::ECANCELED` (an engine shutting down) counts nothing.
    pub fn on_tun_write(
        &self,
        w: &WriteInfo,
        res: std::result::Result<usize, Errno>,
    ) -> Result<After> {
        let stats = &self.stats;
        match res {
            Ok(_) => {
                if w.vnet {
                    stats.vnet_writes.add(1);
                    stats.vnet_write_packets.add(w.packets as u64);
                }
                stats.peer_to_tun.packets.add(w.packets as u64);
                stats.peer_to_tun.bytes.add(w.bytes as u64);
            }
            Err(Errno::EAGAIN) => {
                stats.peer_to_tun.backpressure.add(1);
                return Ok(After::Retry);
            }
            Err(Errno::EINTR) => return Ok(After::Retry),
            Err(Errno::ECANCELED) => {}
            Err(e) => {
                let e = std::io::Error::from(e);
                if crate::device::is_fatal_error(&e) {
                    return Err(tun_failure("write to", &self.label, e));
                }
                for _ in 0..w.packets {
                    stats.peer_to_tun.drop(DropReason::TunWriteFailed);
                }
            }
        }
        Ok(After::Next)
    }
}
