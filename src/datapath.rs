//! The datapath both engines share: what a TUN read or a UDP receive
//! becomes, what every I/O result means, and all the counting. No I/O, no
//! syscalls, no allocation per packet: engines read into their buffers,
//! call in, move the bytes they are told to move, and report the results.
//!
//! # TUN to peer
//! [`Datapath::handle_tun_read`] turns one read (a plain packet, or with
//! offload a virtio-net header and a super-packet) into a [`TxPlan`]: the
//! datagrams to send, all the same size but the last: one packet where it
//! was read, or a super-packet's datagrams as a gather list of headers
//! written into the split buffer and payload slices of the read buffer
//! ([`TxPlan::pieces`]). [`Datapath::next_send`] cuts the plan into sends (one UDP GSO send
//! of up to 64 datagrams, or one datagram when GSO is off or the plan is one
//! packet), in order; [`Datapath::on_send`] takes each send's result.
//!
//! # Peer to TUN
//! [`Datapath::handle_receive`] checks one receive (one datagram, or with
//! UDP GRO several of one flow) and says which bytes to write to the TUN
//! device: the datagram in place, or (offload) the [`Coalescer`]'s writes,
//! where consecutive TCP segments became one super-packet, each write a
//! gather list of rewritten headers and payload slices of the receive
//! buffer (which must stay untouched until the writes are done).
//! [`Datapath::on_tun_write`] takes each write's result.
//!
//! # The rules, the same for both engines
//! - **Nothing is dropped for lack of room.** A send or TUN write that meets
//!   `EAGAIN` is retried once its destination has room ([`After::Retry`]);
//!   later sends of the same direction wait behind it, so order is kept.
//! - **GSO refused** (`EIO`, `EINVAL`, `EOPNOTSUPP`, `ENOPROTOOPT` on a
//!   segmented send): GSO is turned off for the worker, said in one line,
//!   and the same datagrams are sent one by one. Nothing is lost.
//! - **Send errors** other than those (peer unreachable, no route, a full
//!   device queue): the datagrams of that send are lost and counted as
//!   `send_failed`; the worker goes on.
//! - **TUN write errors**: the device is gone (`EBADFD`, `EBADF`, ...): the
//!   worker stops with an error naming the queue. Any other error (e.g.
//!   `EIO` while the link is down, `EINVAL` for a packet the kernel refuses):
//!   that write's packets are lost and counted as `tun_write_failed`.
//! - **UDP receive errors** ([`Datapath::on_receive_error`]): errors that
//!   report an earlier ICMP error or a passing shortage (`ECONNREFUSED`,
//!   `EHOSTUNREACH`, `ENOBUFS`, `ENOMEM`, ...) are counted as `io_errors`
//!   and the worker goes on; anything else means the socket is broken, and
//!   the worker stops with an error naming it.
//! - **Coalescing verifies first**: a TCP segment whose checksums fail is
//!   dropped as `bad_checksum`, never merged into a super-packet that the
//!   kernel would take as verified.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use nix::errno::Errno;

use crate::device::tun_failure;
use crate::error::{Error, Result};
use crate::forward::{Forwarder, PeerVerdict, TunVerdict};
use crate::packet::offload::{self, Coalescer};
use crate::packet::virtio::{self, VirtioNetHdr};
use crate::peers::{PeerId, SharedPeers};
use crate::stats::{DirectionStats, WorkerStats};
use crate::types::DropReason;

pub use crate::packet::offload::{GSO_MAX_BYTES, GSO_MAX_SEGMENTS, gso_segments_per_send};

/// Bytes of the largest TUN read with offload: a virtio-net header and a
/// 64 KiB super-packet.
pub const OFFLOAD_READ_LEN: usize = 65536 + virtio::LEN;
/// Room for the per-datagram headers of one super-packet (the split
/// buffer): up to 2,000 datagrams of 64-byte headers, or fewer larger ones.
pub const SPLIT_LEN: usize = 2 * 65536;

/// Which buffer a [`TxPlan`]'s datagrams are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxBuf {
    /// The buffer the TUN read landed in (headroom included).
    Read,
    /// Offload: datagram `i` is its headers in the split buffer
    /// (`g.headers(i)`) followed by its payload in the read buffer
    /// (`READ_PAYLOAD_OFFSET + g.payload(i)`): sent as a gather list, the
    /// payload never copied. See [`TxPlan::pieces`].
    Gather(offload::GatherSegments),
}

/// Where an offload read's packet starts in the read buffer: behind the
/// virtio-net header.
pub const READ_PAYLOAD_OFFSET: usize = virtio::LEN;

/// Most datagrams one send carries, so most pieces (header and payload per
/// datagram) of a gather send: engines size their iovec arrays with it.
pub const MAX_GATHER_PIECES: usize = 2 * GSO_MAX_SEGMENTS;

/// The datagrams one TUN read became: bytes `start..end` of `buf`, cut every
/// `seg` bytes (the last datagram may be shorter), all to `dest`. `sent`
/// bytes have been dealt with (sent, or lost and counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPlan {
    pub buf: TxBuf,
    /// Where every datagram of the plan goes (one peer: the segments of a
    /// super-packet share a destination), as the socket takes it.
    pub dest: SocketAddr,
    peer: PeerId,
    start: usize,
    end: usize,
    seg: usize,
    sent: usize,
}

impl TxPlan {
    /// Datagrams not yet sent, and their bytes.
    fn remaining(&self) -> (u64, u64) {
        let left = self.end - (self.start + self.sent).min(self.end);
        (left.div_ceil(self.seg) as u64, left as u64)
    }

    /// True once every datagram was sent or counted as lost.
    pub fn is_done(&self) -> bool {
        self.start + self.sent >= self.end
    }

    /// Datagrams in the plan.
    pub fn datagrams(&self) -> usize {
        (self.end - self.start).div_ceil(self.seg)
    }

    /// A gather plan's pieces of `send`, in order, one pair per datagram:
    /// its headers (a range of the split buffer) and its payload (a range
    /// of the read buffer). Empty for a plan that is one contiguous range.
    pub fn pieces(
        &self,
        send: &TxSend,
    ) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + use<> {
        let (g, first, last) = match self.buf {
            TxBuf::Gather(g) => (
                Some(g),
                send.range.start / self.seg,
                send.range.end.div_ceil(self.seg),
            ),
            TxBuf::Read => (None, 0, 0),
        };
        (first..last).filter_map(move |i| {
            let g = g?;
            let p = g.payload(i);
            Some((
                g.headers(i),
                READ_PAYLOAD_OFFSET + p.start..READ_PAYLOAD_OFFSET + p.end,
            ))
        })
    }
}

/// One send of a plan: bytes `range` of the plan's buffer; with `gso_size`,
/// one UDP GSO send of datagrams of that many bytes, else one datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxSend {
    pub range: Range<usize>,
    pub gso_size: Option<u16>,
}

impl TxSend {
    fn datagrams(&self) -> usize {
        match self.gso_size {
            Some(g) => self.range.len().div_ceil(usize::from(g).max(1)),
            None => 1,
        }
    }
}

/// What a TUN read becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum TunAction {
    /// Send these datagrams to the peer.
    Send(TxPlan),
    /// Reflect mode: write these bytes of the read buffer back into the TUN
    /// device (the answer, rewritten in place).
    Reflect(Range<usize>),
    /// Dropped and counted.
    Dropped,
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
    /// The payload did not fit the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// When the kernel queued it (`SO_TIMESTAMPNS`, ns since the Unix
    /// epoch), if it said.
    pub arrived_ns: Option<u64>,
}

/// What a receive becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum RxAction {
    /// Write these bytes of the receive buffer to the TUN device (one
    /// packet, its encapsulation header stripped).
    Write(Range<usize>),
    /// Offload: write the coalescer's writes, in order.
    Coalesced,
    /// Everything was dropped and counted.
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

/// What the engine does after an I/O result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Done with it: go on (for a plan, ask [`Datapath::next_send`]).
    Next,
    /// The destination was full or the call interrupted: do the same again,
    /// once the destination has room.
    Retry,
}

/// Headroom an engine leaves in front of every TUN read: room for the
/// encapsulation header, written in place (none with offload, whose
/// datagrams get their headers in the split buffer).
pub fn read_headroom(fwd: &Forwarder, offload: bool) -> usize {
    if offload { 0 } else { fwd.encap_len() }
}

/// Bytes a TUN read may return: the largest frame, or with offload a
/// virtio-net header and a 64 KiB super-packet.
pub fn max_read_len(fwd: &Forwarder, offload: bool) -> usize {
    if offload {
        OFFLOAD_READ_LEN
    } else {
        fwd.max_frame_len()
    }
}

/// Bytes a receive buffer needs: the largest datagram the peer may send,
/// plus one so that an oversize datagram is told by its length; with GRO, a
/// 64 KiB batch.
pub fn max_receive_len(fwd: &Forwarder, offload: bool) -> usize {
    if offload {
        65536
    } else {
        fwd.max_datagram_len() + 1
    }
}

/// The shared datapath of one worker: policy, offload state and counters.
#[derive(Debug)]
pub struct Datapath {
    fwd: Forwarder,
    stats: Arc<WorkerStats>,
    /// The TUN device carries virtio-net headers; the socket does GSO/GRO.
    offload: bool,
    /// Segmented sends with UDP GSO (off once the kernel refused it).
    gso: bool,
    /// "TUN queue 0 of tun0", for the few log lines and errors.
    label: String,
    /// CoDel over the time datagrams waited in the socket's receive queue.
    aqm: Option<crate::aqm::Codel>,
    /// A CoDel signal not yet carried out: the next packet that carries
    /// data gets it (TCP control packets, which free no room and cannot
    /// carry a mark, pass).
    aqm_pending: bool,
    /// What one visit to a direction may take.
    limits: VisitLimits,
    /// Flow queueing with CoDel of TUN reads (`--aqm fq-codel`): its
    /// parameters, and the queues once the engine said how many buffers
    /// it has ([`Datapath::attach_tx_buffers`]).
    fq_params: Option<crate::aqm::CodelParams>,
    fq_in_flight: usize,
    txq: Option<FlowQueue>,
    /// The same for receives from the peer (their clock is the wall
    /// clock of the kernel's arrival timestamps).
    rxq: Option<FlowQueue>,
    /// The flow queues' clock: ns since this instant.
    epoch: std::time::Instant,
    /// The TUN device's name, its drop counter as last read (and when),
    /// and when the engine was last told to read it.
    device: String,
    ring_drops: Option<(u64, u64)>,
    ring_checked_ns: u64,
    /// The peer table as reloads publish it, and the generation the
    /// forwarder has.
    shared_peers: Option<Arc<SharedPeers>>,
    peers_generation: u64,
    /// Count per peer (a table with prefixes).
    per_peer: bool,
}

/// Overload lasts this long after the kernel last dropped at the TUN
/// device's full ring: while it does, a read that finds no free buffer
/// drops the fattest flow's head to make room.
pub const OVERLOAD_HOLD_NS: u64 = 100_000_000;

/// How often the engine reads the device's drop counter
/// ([`Datapath::ring_check_due`]).
pub const RING_CHECK_NS: u64 = 10_000_000;

/// One side's flow queues (see [`crate::fq`]) over the engine's buffers
/// of that side, with what is in flight and the overload state.
#[derive(Debug)]
struct FlowQueue {
    q: crate::fq::FlowQueues,
    keys: std::collections::hash_map::RandomState,
    /// Buffers dequeued that the engine has not handed back, and the most
    /// that may be: half the pool, so that the other half can hold queued
    /// packets (and a backlog can be dropped from) while sends are slow.
    in_flight_buffers: usize,
    max_in_flight_buffers: usize,
    /// Bytes dequeued that the engine has not handed back, and
    /// the most bytes that may be (a fixed BQL: enough to keep the
    /// destination busy; the rest waits here, where a sparse flow can pass
    /// it).
    in_flight: usize,
    in_flight_limit: usize,
    /// Overload: when the kernel last dropped at the queue in front of
    /// this side (the TUN device's ring overflowed), as the engine found
    /// by reading the device's drop counter.
    ring_dropped_ns: Option<u64>,
}

impl FlowQueue {
    fn new(buffers: usize, p: crate::aqm::CodelParams, in_flight_limit: usize) -> FlowQueue {
        FlowQueue {
            q: crate::fq::FlowQueues::new(buffers, p),
            keys: Default::default(),
            in_flight: 0,
            in_flight_limit,
            in_flight_buffers: 0,
            max_in_flight_buffers: (buffers / 2).max(1),
            ring_dropped_ns: None,
        }
    }

    /// Queues buffer `id`, `len` bytes whose (first) IP packet is `pkt`,
    /// arrived at `at_ns`.
    fn enqueue(&mut self, id: u32, pkt: &[u8], len: usize, at_ns: u64, stats: &DirectionStats) {
        let hash = crate::fq::flow_hash(&self.keys, pkt);
        let can_signal = !crate::aqm::is_tcp_without_data(pkt);
        self.q.enqueue(id, hash, len, can_signal, at_ns);
        stats.queue_max.record(self.q.len() as u64);
        stats.queued.set(self.q.len() as u64);
    }

    /// Publishes what is queued and in flight (gauges for the metrics).
    #[inline]
    fn publish(&self, stats: &DirectionStats) {
        stats.queued.set(self.q.len() as u64);
        stats.in_flight_buffers.set(self.in_flight_buffers as u64);
        stats.in_flight_bytes.set(self.in_flight as u64);
    }

    fn next(&mut self, now_ns: u64, stats: &DirectionStats) -> Option<crate::fq::Dequeued> {
        if self.in_flight >= self.in_flight_limit
            || self.in_flight_buffers >= self.max_in_flight_buffers
        {
            return None;
        }
        let d = self.q.dequeue(now_ns)?;
        self.in_flight += d.bytes;
        self.in_flight_buffers += 1;
        stats.queue_delay.record(d.sojourn_ns);
        self.publish(stats);
        Some(d)
    }

    fn done(&mut self, d: &crate::fq::Dequeued, stats: &DirectionStats) {
        self.in_flight = self.in_flight.saturating_sub(d.bytes);
        self.in_flight_buffers = self.in_flight_buffers.saturating_sub(1);
        self.publish(stats);
    }

    fn make_room(&mut self, now_ns: u64, stats: &DirectionStats) -> Option<u32> {
        let t = self.ring_dropped_ns?;
        if now_ns.saturating_sub(t) >= OVERLOAD_HOLD_NS {
            return None;
        }
        let id = self.q.drop_fattest()?;
        stats.drop(DropReason::Overload);
        self.publish(stats);
        Some(id)
    }
}

/// Which way work moves packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    TunToPeer,
    PeerToTun,
}

/// How much one visit to a direction may take before the engine turns to
/// the other: `packets` reads or receives, and `bytes` of them (0: no byte
/// bound). The byte bound is what keeps one direction's super-packets
/// (64 KiB each with offload) from making the other wait for megabytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisitLimits {
    pub packets: usize,
    pub bytes: usize,
}

impl Default for VisitLimits {
    fn default() -> Self {
        VisitLimits {
            packets: 64,
            bytes: 0,
        }
    }
}

/// One visit of an engine to one direction: what it took so far, against
/// the limits, and when it began. Ended with [`Datapath::end_visit`].
#[derive(Debug)]
pub struct Visit {
    dir: Direction,
    began: std::time::Instant,
    packets: usize,
    bytes: usize,
    limits: VisitLimits,
}

impl Visit {
    /// One read or receive of `bytes` was taken.
    #[inline]
    pub fn took(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes;
    }

    /// True while the visit may take another read or receive.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.packets < self.limits.packets
            && (self.limits.bytes == 0 || self.bytes < self.limits.bytes)
    }

    /// True if it took anything.
    pub fn took_any(&self) -> bool {
        self.packets > 0
    }
}

impl Datapath {
    pub fn new(label: String, fwd: Forwarder, stats: Arc<WorkerStats>, offload: bool) -> Self {
        Datapath {
            fwd,
            stats,
            offload,
            gso: offload,
            label,
            aqm: None,
            aqm_pending: false,
            limits: VisitLimits::default(),
            fq_params: None,
            fq_in_flight: crate::config::DEFAULT_AQM_INFLIGHT_BYTES,
            txq: None,
            rxq: None,
            epoch: std::time::Instant::now(),
            device: String::new(),
            ring_drops: None,
            ring_checked_ns: 0,
            shared_peers: None,
            peers_generation: 0,
            per_peer: false,
        }
    }

    /// Takes the peer table from `shared`, and the new one at the start of
    /// the first visit after each reload ([`SharedPeers::store`]).
    pub fn with_shared_peers(mut self, shared: Arc<SharedPeers>) -> Self {
        let (generation, table) = shared.load();
        self.per_peer = !table.is_single();
        self.fwd.set_peers(table);
        self.peers_generation = generation;
        self.shared_peers = Some(shared);
        self
    }

    /// Takes a reloaded peer table, if there is one: one atomic load
    /// when there is not. Packets in flight keep their destination.
    #[inline]
    fn refresh_peers(&mut self) {
        let Some(shared) = &self.shared_peers else {
            return;
        };
        if shared.generation() == self.peers_generation {
            return;
        }
        let (generation, table) = shared.load();
        self.per_peer = !table.is_single();
        self.fwd.set_peers(table);
        self.peers_generation = generation;
    }

    /// Worker `queue`'s counters of peer `id` (in the current table).
    #[inline]
    fn peer_counters(&self, id: PeerId) -> &crate::peers::PeerCounters {
        self.fwd.peers().peer(id).stats.worker(self.fwd.queue())
    }

    /// Counts a plan's datagrams for its peer.
    #[inline]
    fn count_peer_tx(&self, action: &TunAction) {
        if let (true, TunAction::Send(plan)) = (self.per_peer, action) {
            let (packets, bytes) = plan.remaining();
            let c = self.peer_counters(plan.peer);
            c.tx_packets.add(packets);
            c.tx_bytes.add(bytes);
        }
    }

    /// Bounds each visit to a direction (see [`VisitLimits`]).
    pub fn with_visit_limits(mut self, limits: VisitLimits) -> Self {
        self.limits = VisitLimits {
            packets: limits.packets.max(1),
            ..limits
        };
        self
    }

    /// What each visit to a direction may take.
    pub fn visit_limits(&self) -> VisitLimits {
        self.limits
    }

    /// Starts a visit to `dir` (with the current peer table).
    pub fn begin_visit(&mut self, dir: Direction) -> Visit {
        self.refresh_peers();
        Visit {
            dir,
            began: std::time::Instant::now(),
            packets: 0,
            bytes: 0,
            limits: self.limits,
        }
    }

    /// Ends a visit: one that took anything is counted with its duration.
    pub fn end_visit(&self, v: Visit) {
        if !v.took_any() {
            return;
        }
        let ns = v.began.elapsed().as_nanos() as u64;
        match v.dir {
            Direction::TunToPeer => self.stats.tun_to_peer.visits.record(ns),
            Direction::PeerToTun => self.stats.peer_to_tun.visits.record(ns),
        }
    }

    /// Applies CoDel with `params` to datagrams from the peer, using the
    /// kernel's arrival timestamps (TUN mode: the packets must be IP to
    /// carry a mark).
    pub fn with_aqm(mut self, params: Option<crate::aqm::CodelParams>) -> Self {
        self.aqm = params
            .filter(|_| self.fwd.carries_ip())
            .map(crate::aqm::Codel::new);
        self
    }

    /// Queues TUN reads and receives per flow with CoDel `params` (TUN
    /// mode only: the packets must be IP to be told apart and marked),
    /// handing out at most `in_flight` bytes per side not yet sent or
    /// written, once the engine attaches its buffers.
    pub fn with_flow_queues(
        mut self,
        params: Option<crate::aqm::CodelParams>,
        in_flight: usize,
    ) -> Self {
        self.fq_params = params.filter(|_| self.fwd.carries_ip());
        self.fq_in_flight = in_flight.max(1);
        self
    }

    /// True if flow queueing was asked for (the engine then sizes its TUN
    /// side's buffers for the queues and attaches them).
    pub fn flow_queueing_requested(&self) -> bool {
        self.fq_params.is_some()
    }

    /// The engine reads the TUN device into `buffers` buffers, numbered
    /// from 0: with flow queueing on, they are what the queues hold.
    pub fn attach_tx_buffers(&mut self, buffers: usize) {
        let limit = self.fq_in_flight;
        self.txq = self.fq_params.map(|p| FlowQueue::new(buffers, p, limit));
    }

    /// The engine receives from the socket into `buffers` buffers,
    /// numbered from 0: with flow queueing on (and the kernel's arrival
    /// timestamps, which the queues' clock is), they are what the receive
    /// side's flow queues hold.
    pub fn attach_rx_buffers(&mut self, buffers: usize) {
        let limit = self.fq_in_flight;
        self.rxq = self
            .fq_params
            .filter(|_| self.aqm.is_some())
            .map(|p| FlowQueue::new(buffers, p, limit));
    }

    /// True if receives go through flow queues: the engine queues each
    /// ([`Datapath::rx_enqueue`]) and handles what [`Datapath::rx_next`]
    /// hands out ([`Datapath::handle_dequeued_receive`]).
    pub fn rx_flow_queueing(&self) -> bool {
        self.rxq.is_some()
    }

    /// Receives in the flow queues.
    pub fn rx_queued(&self) -> usize {
        self.rxq.as_ref().map_or(0, |q| q.q.len())
    }

    /// A receive `rx` landed in buffer `id` (`buf`) and was taken at
    /// `now_ns` (wall clock, as [`Datapath::handle_receive`]): queue it by
    /// the flow of its first packet, as of its arrival in the socket. The
    /// buffer is the queue's until [`Datapath::rx_next`] hands it back.
    pub fn rx_enqueue(&mut self, id: u32, rx: &Received, buf: &[u8], now_ns: u64) {
        let Some(q) = &mut self.rxq else { return };
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
        self.rxq.as_mut()?.next(now_ns, &self.stats.peer_to_tun)
    }

    /// The buffer of a dequeued receive is free again.
    pub fn rx_done(&mut self, d: &crate::fq::Dequeued) {
        if let Some(q) = &mut self.rxq {
            q.done(d, &self.stats.peer_to_tun);
        }
    }

    /// Names the TUN device whose drop counter the engine reads for
    /// overload ([`Datapath::ring_check_due`]).
    pub fn with_device(mut self, name: &str) -> Self {
        self.device = name.to_string();
        self
    }

    /// The device to watch.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// True every [`RING_CHECK_NS`] with flow queueing on: the engine then
    /// reads the device's drop counter (`crate::platform::device_tx_drops`)
    /// and reports it with [`Datapath::tx_ring_drops`].
    pub fn ring_check_due(&mut self, now_ns: u64) -> bool {
        if self.txq.is_none() || self.device.is_empty() {
            return false;
        }
        if now_ns.saturating_sub(self.ring_checked_ns) < RING_CHECK_NS {
            return false;
        }
        self.ring_checked_ns = now_ns;
        true
    }

    /// The device's transmit drop counter was `count` at `now_ns` (None:
    /// unreadable): an increase is the ring overflowing, which starts (or
    /// continues) overload.
    pub fn tx_ring_drops(&mut self, count: Option<u64>, now_ns: u64) {
        let Some(count) = count else { return };
        let before = self.ring_drops.replace((count, now_ns));
        // Only an increase since a recent reading is current: after a
        // quiet spell (no visits, no readings) it may be long past.
        let rose = before
            .is_some_and(|(b, at)| count > b && now_ns.saturating_sub(at) <= 2 * RING_CHECK_NS);
        if let (true, Some(q)) = (rose, self.txq.as_mut()) {
            q.ring_dropped_ns = Some(now_ns);
        }
    }

    /// The flow queues' clock (monotonic ns).
    pub fn clock_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// True if TUN reads go through the flow queues: the engine queues
    /// each read ([`Datapath::tx_enqueue`]) and sends what
    /// [`Datapath::tx_next`] hands out ([`Datapath::handle_dequeued`]).
    pub fn flow_queueing(&self) -> bool {
        self.txq.is_some()
    }

    /// Packets in the flow queues.
    pub fn tx_queued(&self) -> usize {
        self.txq.as_ref().map_or(0, |t| t.q.len())
    }

    /// Where a TUN read of `len` bytes (behind the headroom) has its IP
    /// packet: behind the virtio-net header with offload.
    fn read_packet_range(&self, len: usize) -> Range<usize> {
        let head = self.read_headroom();
        let off = if self.offload { READ_PAYLOAD_OFFSET } else { 0 };
        (head + off).min(head + len)..head + len
    }

    /// A TUN read of `len` bytes landed in buffer `id` (`read`, headroom
    /// included) at `now_ns`: queue it by flow. The buffer is the queue's
    /// until [`Datapath::tx_next`] or [`Datapath::tx_make_room`] hands it
    /// back.
    pub fn tx_enqueue(&mut self, id: u32, read: &[u8], len: usize, now_ns: u64) {
        let len = len.min(read.len().saturating_sub(self.read_headroom()));
        let pkt = &read[self.read_packet_range(len)];
        let Some(t) = &mut self.txq else { return };
        t.enqueue(id, pkt, len, now_ns, &self.stats.tun_to_peer);
    }

    /// The next queued read to send at `now_ns` (new flows first, by
    /// bytes), unless the in-flight limit (`--aqm-inflight-bytes`) is reached.
    /// Hand its buffer and the [`crate::fq::Dequeued`] to
    /// [`Datapath::handle_dequeued`], and call [`Datapath::tx_done`] once
    /// the buffer is free again.
    pub fn tx_next(&mut self, now_ns: u64) -> Option<crate::fq::Dequeued> {
        self.txq.as_mut()?.next(now_ns, &self.stats.tun_to_peer)
    }

    /// The buffer of a dequeued read is free again (sent, or dropped).
    pub fn tx_done(&mut self, d: &crate::fq::Dequeued) {
        if let Some(t) = &mut self.txq {
            t.done(d, &self.stats.tun_to_peer);
        }
    }

    /// No buffer is free for the next TUN read at `now_ns`. Normally None:
    /// the device's ring holds the rest until buffers come back (a burst).
    /// In overload (the ring overflowed within [`OVERLOAD_HOLD_NS`]: the
    /// sender does not answer CoDel, and a ping waits behind a full FIFO
    /// ring or is dropped there): drops the head of the flow with the most
    /// bytes queued, counted as `overload`, and returns its buffer for the
    /// next read, so the device is read promptly, the flood loses what it
    /// must in tunfwd's queue instead of everyone in the ring, and no work
    /// is spent on what is dropped.
    pub fn tx_make_room(&mut self, now_ns: u64) -> Option<u32> {
        self.txq
            .as_mut()?
            .make_room(now_ns, &self.stats.tun_to_peer)
    }

    /// What a dequeued read (`d`, in `read`) becomes: as
    /// [`Datapath::handle_tun_read`], with CoDel's signal carried out. An
    /// ECN-capable packet is marked CE (a super-packet before it is cut, so
    /// every datagram carries the mark). Otherwise one datagram is dropped
    /// and counted as `aqm`: a lone packet, or the first datagram of a
    /// super-packet while the rest goes, so the sender loses one segment
    /// (one retransmit) rather than the 45 of a whole 64 KiB super-packet.
    pub fn handle_dequeued(
        &mut self,
        read: &mut [u8],
        d: &crate::fq::Dequeued,
        split: &mut [u8],
    ) -> TunAction {
        let marked = d.signal && {
            let r = self.read_packet_range(d.bytes);
            crate::aqm::mark_ce(&mut read[r])
        };
        if marked {
            self.stats.aqm_marks.add(1);
        }
        let action = self.plan_tun_read(read, d.bytes, split);
        let action = if !d.signal || marked {
            action
        } else {
            match action {
                TunAction::Send(mut plan) => {
                    self.stats.tun_to_peer.drop(DropReason::Aqm);
                    if self.per_peer {
                        self.peer_counters(plan.peer).drop(DropReason::Aqm);
                    }
                    if plan.datagrams() > 1 {
                        plan.sent = plan.seg;
                        TunAction::Send(plan)
                    } else {
                        TunAction::Dropped
                    }
                }
                // Dropped and counted for its own reason, or reflected.
                other => other,
            }
        };
        self.count_peer_tx(&action);
        action
    }

    /// Turns the AQM off (the kernel gives no arrival timestamps).
    pub fn disable_aqm(&mut self) {
        self.aqm = None;
    }

    /// True if the engine should ask the kernel for arrival timestamps.
    pub fn wants_timestamps(&self) -> bool {
        self.aqm.is_some()
    }

    /// CoDel's verdict on a receive leaving the socket's queue at `now_ns`:
    /// true if one of its packets is to be marked or dropped.
    fn aqm_signal(&mut self, rx: &Received, now_ns: u64) -> bool {
        let Some(at) = rx.arrived_ns else {
            return false;
        };
        let sojourn = now_ns.saturating_sub(at);
        self.stats.peer_to_tun.queue_delay.record(sojourn);
        match &mut self.aqm {
            Some(codel) => codel.on_dequeue(now_ns, sojourn),
            None => false,
        }
    }

    /// Carries out a pending CoDel signal on an accepted packet: a CE mark
    /// if it is ECN-capable, else a counted drop. Returns false if the
    /// packet is to be dropped. A TCP segment without data passes and leaves
    /// the signal for the next packet: dropping it would free no room, and
    /// an ECN-capable flow's SYNs, FINs and ACKs cannot carry a mark.
    fn aqm_apply(pending: &mut bool, stats: &WorkerStats, pkt: &mut [u8]) -> bool {
        if !*pending || crate::aqm::is_tcp_without_data(pkt) {
            return true;
        }
        *pending = false;
        if crate::aqm::mark_ce(pkt) {
            stats.aqm_marks.add(1);
            true
        } else {
            stats.peer_to_tun.drop(DropReason::Aqm);
            false
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    pub fn forwarder(&self) -> &Forwarder {
        &self.fwd
    }

    /// The engine's UDP socket is bound to `local`: destinations take its
    /// family's form.
    pub fn use_socket(&mut self, local: SocketAddr) {
        self.fwd.set_socket(local);
    }

    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Headroom the engine leaves in front of every TUN read.
    pub fn read_headroom(&self) -> usize {
        read_headroom(&self.fwd, self.offload)
    }

    /// Bytes a TUN read may return.
    pub fn max_read_len(&self) -> usize {
        max_read_len(&self.fwd, self.offload)
    }

    /// Bytes a receive buffer needs.
    pub fn max_receive_len(&self) -> usize {
        max_receive_len(&self.fwd, self.offload)
    }

    /// A TUN read of `len` bytes at `read[head..]`, where `head` is
    /// [`Datapath::read_headroom`]. Offload cuts a super-packet into
    /// `split` (at least [`SPLIT_LEN`] bytes).
    pub fn handle_tun_read(&mut self, read: &mut [u8], len: usize, split: &mut [u8]) -> TunAction {
        let action = self.plan_tun_read(read, len, split);
        self.count_peer_tx(&action);
        action
    }

    /// [`Datapath::handle_tun_read`] without the per-peer count.
    fn plan_tun_read(&mut self, read: &mut [u8], len: usize, split: &mut [u8]) -> TunAction {
        if self.offload {
            return self.handle_offload_read(&mut read[..len], split);
        }
        let head = self.read_headroom();
        let (encap, pkt) = read[..head + len].split_at_mut(head);
        match self.fwd.handle_from_tun_mut(pkt) {
            TunVerdict::ToPeer => {
                let Some(peer) = self.route(pkt) else {
                    return TunAction::Dropped;
                };
                self.fwd.write_encap(encap);
                TunAction::Send(TxPlan {
                    buf: TxBuf::Read,
                    dest: self.fwd.peer_addr(peer),
                    peer,
                    start: 0,
                    end: head + len,
                    seg: (head + len).max(1),
                    sent: 0,
                })
            }
            TunVerdict::Reflect => TunAction::Reflect(head..head + len),
            TunVerdict::Drop(r) => {
                self.stats.tun_to_peer.drop(r);
                TunAction::Dropped
            }
        }
    }

    /// The peer for a packet read from the TUN device; None: no route,
    /// dropped and counted.
    #[inline]
    fn route(&self, pkt: &[u8]) -> Option<PeerId> {
        match self.fwd.route(pkt) {
            Ok(p) => Some(p),
            Err(r) => {
                self.stats.tun_to_peer.drop(r);
                None
            }
        }
    }

    fn handle_offload_read(&mut self, frame: &mut [u8], split: &mut [u8]) -> TunAction {
        let Some(hdr) = VirtioNetHdr::parse(frame) else {
            self.stats.tun_to_peer.drop(DropReason::Truncated);
            return TunAction::Dropped;
        };
        let frame_len = frame.len();
        let pkt = &mut frame[READ_PAYLOAD_OFFSET..];
        let gathered = match offload::split_gather(&hdr, pkt, self.fwd.mtu(), split) {
            Ok(g) => g,
            Err(_) => {
                self.stats.tun_to_peer.drop(DropReason::BadOffload);
                return TunAction::Dropped;
            }
        };
        match gathered {
            // One packet gets the same checks as without offload, and goes
            // out from where it was read.
            offload::Gathered::Single => match self.fwd.handle_from_tun(pkt) {
                TunVerdict::Drop(r) => {
                    self.stats.tun_to_peer.drop(r);
                    TunAction::Dropped
                }
                _ => match self.route(pkt) {
                    None => TunAction::Dropped,
                    Some(peer) => TunAction::Send(TxPlan {
                        buf: TxBuf::Read,
                        dest: self.fwd.peer_addr(peer),
                        peer,
                        start: READ_PAYLOAD_OFFSET,
                        end: frame_len,
                        seg: pkt.len().max(1),
                        sent: 0,
                    }),
                },
            },
            // Split made every segment valid and within the MTU; they all
            // go to the peer of the super-packet's destination.
            offload::Gathered::Segments(g) => match self.route(pkt) {
                None => TunAction::Dropped,
                Some(peer) => TunAction::Send(TxPlan {
                    buf: TxBuf::Gather(g),
                    dest: self.fwd.peer_addr(peer),
                    peer,
                    start: 0,
                    end: g.total_len(),
                    seg: g.seg_len().max(1),
                    sent: 0,
                }),
            },
        }
    }

    /// The next send of `plan`, or None when it is done.
    pub fn next_send(&self, plan: &TxPlan) -> Option<TxSend> {
        if plan.is_done() {
            return None;
        }
        let at = plan.start + plan.sent;
        let left = plan.end - at;
        let seg = plan.seg;
        if self.gso && left > seg {
            let per_send = gso_segments_per_send(seg) * seg;
            let len = left.min(per_send);
            if len > seg {
                return Some(TxSend {
                    range: at..at + len,
                    gso_size: Some(seg as u16),
                });
            }
        }
        Some(TxSend {
            range: at..at + left.min(seg),
            gso_size: None,
        })
    }

    /// The result of `send` (from [`Datapath::next_send`] on `plan`): bytes
    /// sent, or the error. Counts, and advances the plan unless the send
    /// must be retried. `Errno::ECANCELED` (an engine shutting down) counts
    /// nothing and abandons the plan.
    pub fn on_send(
        &mut self,
        plan: &mut TxPlan,
        send: &TxSend,
        res: std::result::Result<usize, Errno>,
    ) -> After {
        let stats = &self.stats;
        let datagrams = send.datagrams() as u64;
        match res {
            Ok(n) if n == send.range.len() => {
                if send.gso_size.is_some() {
                    stats.gso_sends.add(1);
                    stats.gso_segments.add(datagrams);
                }
                stats.tun_to_peer.packets.add(datagrams);
                stats.tun_to_peer.bytes.add(n as u64);
            }
            Err(Errno::EAGAIN) => {
                stats.tun_to_peer.backpressure.add(1);
                return After::Retry;
            }
            Err(Errno::EINTR) => return After::Retry,
            Err(Errno::ECANCELED) => {
                plan.sent = plan.end - plan.start;
                return After::Next;
            }
            Err(e @ (Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT))
                if send.gso_size.is_some() =>
            {
                // Send the same datagrams again, one by one.
                self.gso = false;
                crate::info!(
                    "{}: UDP GSO refused ({e}): sending datagrams one by one",
                    self.label
                );
                return After::Next;
            }
            // A short send (never seen for UDP) or an error: lost.
            Ok(_) | Err(_) => {
                for _ in 0..datagrams {
                    stats.tun_to_peer.drop(DropReason::SendFailed);
                }
            }
        }
        plan.sent += send.range.len();
        After::Next
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
        let peer = self.fwd.source_peer(src);
        if rx.truncated {
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
            self.aqm_pending = true;
        }
        self.receive(rx, peer, buf, coalescer, now_ns)
    }

    /// A datagram from peer `p` dropped for `reason` at `now_ns`.
    fn count_peer_rx_drop(&self, p: PeerId, reason: DropReason, now_ns: u64) {
        if self.per_peer {
            let c = self.peer_counters(p);
            c.drop(reason);
            c.last_rx_ns.record(now_ns);
        }
    }

    /// A receive that the flow queues handed out (`d`): as
    /// [`Datapath::handle_receive`], with the queues' CoDel verdict (on the
    /// time since it arrived in the socket) instead of the single queue's.
    pub fn handle_dequeued_receive(
        &mut self,
        rx: &Received,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        d: &crate::fq::Dequeued,
    ) -> RxAction {
        let now_ns = rx.arrived_ns.unwrap_or(0);
        let Some(src) = rx.src.filter(|_| !rx.truncated) else {
            return self.handle_receive(rx, buf, coalescer, now_ns);
        };
        let peer = self.fwd.source_peer(src);
        if peer.is_some() && d.signal {
            self.aqm_pending = true;
        }
        self.receive(rx, peer, buf, coalescer, now_ns)
    }

    /// The checks and the coalescing of a receive from `peer` (None: from
    /// no peer), taken at `now_ns`.
    fn receive(
        &mut self,
        rx: &Received,
        peer: Option<PeerId>,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        now_ns: u64,
    ) -> RxAction {
        let pending = &mut self.aqm_pending;
        let stats = &self.stats;
        let counters = match (self.per_peer, peer) {
            (true, Some(p)) => {
                let c = self.fwd.peers().peer(p).stats.worker(self.fwd.queue());
                c.last_rx_ns.record(now_ns);
                Some(c)
            }
            _ => None,
        };
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
                    if let Some(c) = counters {
                        c.rx_packets.add(1);
                        c.rx_bytes.add(payload.len() as u64);
                    }
                    RxAction::Write(rx.payload.start + self.fwd.encap_len()..rx.payload.end)
                }
                PeerVerdict::Drop(r) => {
                    if r != DropReason::Aqm {
                        // (aqm_apply counted its own drop.)
                        stats.peer_to_tun.drop(r);
                    }
                    if let Some(c) = counters {
                        c.drop(r);
                    }
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
                if let Some(c) = counters {
                    c.drop(r);
                }
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
                        if let Some(c) = counters {
                            c.drop(DropReason::Aqm);
                        }
                        continue;
                    }
                    let len = datagram.len();
                    if coalescer.push(buf, datagram).is_err() {
                        stats.peer_to_tun.drop(DropReason::BadChecksum);
                        if let Some(c) = counters {
                            c.drop(DropReason::BadChecksum);
                        }
                    } else if let Some(c) = counters {
                        c.rx_packets.add(1);
                        c.rx_bytes.add(len as u64);
                    }
                }
                PeerVerdict::Drop(r) => {
                    stats.peer_to_tun.drop(r);
                    if let Some(c) = counters {
                        c.drop(r);
                    }
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

    /// The result of a TUN read that failed with `e`: Ok(()) to read again
    /// once readable; Err if the device failed (a TUN read has no error a
    /// worker can go on from).
    pub fn on_tun_read_error(&self, e: Errno) -> Result<()> {
        match e {
            Errno::EAGAIN | Errno::EINTR | Errno::ECANCELED => Ok(()),
            e => Err(tun_failure("read from", &self.label, e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::offload::tests::{refresh_tcp_checksums, tcp_packet};

    const PEER: &str = "198.18.0.2:5000";

    /// One datagram of `len` bytes from `src`, queued at `arrived_ns`.
    fn datagram(src: SocketAddr, len: usize, arrived_ns: Option<u64>) -> Received {
        Received {
            src: Some(src),
            payload: 0..len,
            gro_size: None,
            truncated: false,
            arrived_ns,
        }
    }

    fn dp(offload: bool) -> Datapath {
        let fwd = Forwarder::new(1500, PEER.parse().unwrap());
        Datapath::new(
            "test".into(),
            fwd,
            Arc::new(WorkerStats::default()),
            offload,
        )
    }

    /// A TSO super-packet as the TUN device hands it over.
    fn tso_read(payload_len: usize, mss: u16) -> Vec<u8> {
        let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
        let mut p = tcp_packet(false, 1, 0x10, &[], &payload);
        // The checksum field holds the pseudo-header sum (NEEDS_CSUM).
        let partial =
            crate::packet::checksum::fold_partial(crate::packet::checksum::pseudo_header_sum(
                [198, 19, 0, 1].into(),
                [198, 19, 0, 2].into(),
                6,
                p.len() - 20,
            ));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: virtio::GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut read = vec![0u8; virtio::LEN];
        hdr.write(&mut read);
        read.extend_from_slice(&p);
        read
    }

    /// The plan of a TSO read of `payload_len` bytes cut at MSS 1400.
    fn offload_plan(d: &mut Datapath, payload_len: usize) -> TxPlan {
        let mut read = tso_read(payload_len, 1400);
        let len = read.len();
        let mut split = vec![0u8; SPLIT_LEN];
        plan_of(d.handle_tun_read(&mut read, len, &mut split))
    }

    fn plan_of(a: TunAction) -> TxPlan {
        match a {
            TunAction::Send(p) => p,
            other => panic!("not a send: {other:?}"),
        }
    }

    #[test]
    fn a_hub_routes_each_read_to_its_peer_counts_per_peer_and_takes_reloads() {
        use crate::peers::{PeerSpec, PeerTable, SharedPeers};
        let specs =
            |l: &[&str]| -> Vec<PeerSpec> { l.iter().map(|s| s.parse().unwrap()).collect() };
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let first = PeerTable::build(
            &specs(&[
                "198.18.0.11:5000=198.19.0.2/32",
                "198.18.0.12:5000=198.19.0.1/32",
            ]),
            1,
            false,
            None,
        )
        .unwrap();
        let shared = Arc::new(SharedPeers::new(Arc::new(first)));
        let mut d = dp(true).with_shared_peers(shared.clone());
        let peer = |d: &Datapath, i| d.forwarder().peers().peer(i).stats.snapshot();
        // A super-packet to 198.19.0.2: every datagram to spoke 11, one plan.
        let plan = offload_plan(&mut d, 20 * 1400);
        assert_eq!(plan.dest, addr("198.18.0.11:5000"));
        assert_eq!(plan.datagrams(), 20);
        assert_eq!(peer(&d, 0).tx_packets, 20);
        assert_eq!(peer(&d, 1).tx_packets, 0);
        // From spoke 12, which owns the packet's source 198.19.0.1:
        // accepted; the same from spoke 11: source_not_allowed.
        let pkt = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
        let mut c = Coalescer::new();
        let from = |src: &str| datagram(addr(src), pkt.len(), None);
        let a = d.handle_receive(&from("198.18.0.12:5000"), &mut pkt.clone(), &mut c, 5);
        assert_eq!(a, RxAction::Coalesced);
        let a = d.handle_receive(&from("198.18.0.11:5000"), &mut pkt.clone(), &mut c, 7);
        assert_eq!(a, RxAction::Dropped);
        let a = d.handle_receive(&from("198.18.0.13:5000"), &mut pkt.clone(), &mut c, 9);
        assert_eq!(a, RxAction::Dropped);
        assert_eq!((peer(&d, 1).rx_packets, peer(&d, 1).last_rx_ns), (1, 5));
        assert_eq!(peer(&d, 1).rx_bytes, pkt.len() as u64);
        assert_eq!(peer(&d, 0).drops_for(DropReason::SourceNotAllowed), 1);
        assert_eq!(peer(&d, 0).last_rx_ns, 7);
        let s = d.stats().snapshot().peer_to_tun;
        assert_eq!(s.drops_for(DropReason::SourceNotAllowed), 1);
        assert_eq!(s.drops_for(DropReason::NotFromPeer), 1);
        // A reload: spoke 11 goes, spoke 13 takes 198.19.0.0/24. The
        // worker takes it at its next visit; spoke 12 keeps its counters.
        let old = shared.load().1;
        let next = specs(&[
            "198.18.0.13:5000=198.19.0.0/24",
            "198.18.0.12:5000=198.19.0.1/32",
        ]);
        shared.store(Arc::new(
            PeerTable::build(&next, 1, false, Some(&old)).unwrap(),
        ));
        assert_eq!(offload_plan(&mut d, 2800).dest, addr("198.18.0.11:5000"));
        let v = d.begin_visit(Direction::TunToPeer);
        d.end_visit(v);
        assert_eq!(offload_plan(&mut d, 2800).dest, addr("198.18.0.13:5000"));
        assert_eq!(peer(&d, 1).rx_packets, 1);
        assert_eq!(peer(&d, 0).tx_packets, 2);
        let a = d.handle_receive(&from("198.18.0.11:5000"), &mut pkt.clone(), &mut c, 11);
        assert_eq!(a, RxAction::Dropped);
        assert_eq!(
            d.stats()
                .snapshot()
                .peer_to_tun
                .drops_for(DropReason::NotFromPeer),
            2
        );
        // A destination in no prefix: no_route, nothing sent.
        let mut d = dp(false).with_shared_peers(shared);
        let mut read = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
        read[16..20].copy_from_slice(&[198, 19, 1, 9]);
        let len = read.len();
        assert_eq!(
            d.handle_tun_read(&mut read, len, &mut []),
            TunAction::Dropped
        );
        assert_eq!(
            d.stats()
                .snapshot()
                .tun_to_peer
                .drops_for(DropReason::NoRoute),
            1
        );
    }

    #[test]
    fn plain_read_is_one_datagram_in_place() {
        let mut d = dp(false);
        let pkt = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
        let mut read = pkt.clone();
        let mut plan = plan_of(d.handle_tun_read(&mut read, pkt.len(), &mut []));
        assert_eq!(plan.buf, TxBuf::Read);
        let send = d.next_send(&plan).unwrap();
        assert_eq!(
            send,
            TxSend {
                range: 0..pkt.len(),
                gso_size: None
            }
        );
        assert_eq!(d.on_send(&mut plan, &send, Ok(pkt.len())), After::Next);
        assert!(d.next_send(&plan).is_none());
        let s = d.stats().snapshot();
        assert_eq!(
            (s.tun_to_peer.packets, s.tun_to_peer.bytes),
            (1, pkt.len() as u64)
        );
    }

    #[test]
    fn super_packet_is_cut_into_gso_sends_in_order() {
        let mut d = dp(true);
        // 46 segments of 1400: more than one GSO send may carry (65507 B).
        let mut plan = offload_plan(&mut d, 46 * 1400);
        assert!(
            matches!(plan.buf, TxBuf::Gather(_)),
            "a super-packet is sent as a gather list"
        );
        assert_eq!(plan.datagrams(), 46);
        let mut sends = Vec::new();
        while let Some(s) = d.next_send(&plan) {
            assert_eq!(d.on_send(&mut plan, &s, Ok(s.range.len())), After::Next);
            sends.push(s);
        }
        // In order, back to back: 45 datagrams of 1440 bytes fill one GSO
        // send (65507 bytes hold no more), the last goes alone.
        assert_eq!(sends.len(), 2);
        assert_eq!(sends[0].range, 0..45 * 1440);
        assert_eq!(sends[0].gso_size, Some(1440));
        assert_eq!(sends[1].range, 45 * 1440..46 * 1440);
        assert_eq!(sends[1].gso_size, None);
        let st = d.stats().snapshot();
        assert_eq!(st.tun_to_peer.packets, 46);
        assert_eq!(st.gso_sends, 1);
        assert_eq!(st.gso_segments, 45);
    }

    #[test]
    fn gso_refused_resends_the_same_datagrams_one_by_one() {
        let mut d = dp(true);
        let mut plan = offload_plan(&mut d, 10 * 1400);
        let first = d.next_send(&plan).unwrap();
        assert!(first.gso_size.is_some());
        assert_eq!(d.on_send(&mut plan, &first, Err(Errno::EIO)), After::Next);
        let mut n = 0;
        let mut at = 0;
        while let Some(s) = d.next_send(&plan) {
            assert_eq!(s.gso_size, None);
            assert_eq!(s.range.start, at, "nothing skipped");
            at = s.range.end;
            d.on_send(&mut plan, &s, Ok(s.range.len()));
            n += 1;
        }
        assert_eq!(n, 10);
        let st = d.stats().snapshot();
        assert_eq!(st.tun_to_peer.packets, 10);
        assert_eq!(st.tun_to_peer.dropped(), 0);
        // GSO stays off for the next read.
        let plan = offload_plan(&mut d, 3 * 1400);
        assert_eq!(d.next_send(&plan).unwrap().gso_size, None);
    }

    #[test]
    fn full_socket_retries_the_same_send_and_errors_count_losses() {
        let mut d = dp(true);
        let mut plan = offload_plan(&mut d, 4 * 1400);
        let s = d.next_send(&plan).unwrap();
        assert_eq!(d.on_send(&mut plan, &s, Err(Errno::EAGAIN)), After::Retry);
        assert_eq!(d.next_send(&plan).unwrap(), s, "the same send again");
        assert_eq!(
            d.on_send(&mut plan, &s, Err(Errno::ECONNREFUSED)),
            After::Next
        );
        assert!(plan.is_done());
        let st = d.stats().snapshot();
        assert_eq!(st.tun_to_peer.backpressure, 1);
        assert_eq!(st.tun_to_peer.drops_for(DropReason::SendFailed), 4);
    }

    #[test]
    fn receive_with_gro_coalesces_and_drops_bad_checksums() {
        let mut d = dp(true);
        let peer: SocketAddr = PEER.parse().unwrap();
        let seg = |seq: u32| tcp_packet(false, seq, 0x10, &[], &[seq as u8; 100]);
        let mut bad = seg(100);
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        let mut buf = Vec::new();
        for p in [seg(0), bad, seg(100), seg(200)] {
            buf.extend_from_slice(&p);
        }
        let rx = Received {
            src: Some(peer),
            payload: 0..buf.len(),
            gro_size: Some(n),
            truncated: false,
            arrived_ns: None,
        };
        let mut c = Coalescer::new();
        assert_eq!(
            d.handle_receive(&rx, &mut buf, &mut c, 0),
            RxAction::Coalesced
        );
        let writes = c.writes();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].packets, 3);
        let info = WriteInfo::coalesced(&writes[0]);
        assert_eq!(d.on_tun_write(&info, Ok(10)).unwrap(), After::Next);
        let st = d.stats().snapshot();
        assert_eq!(st.peer_to_tun.drops_for(DropReason::BadChecksum), 1);
        assert_eq!(st.peer_to_tun.packets, 3);
        assert_eq!(st.peer_to_tun.bytes, 3 * n as u64);
        assert_eq!((st.gro_receives, st.gro_datagrams), (1, 4));
        assert_eq!((st.vnet_writes, st.vnet_write_packets), (1, 3));
    }

    #[test]
    fn receive_checks_source_truncation_and_strips_encapsulation() {
        let peer: SocketAddr = PEER.parse().unwrap();
        let stranger: SocketAddr = "198.18.0.9:5000".parse().unwrap();
        let mut pkt = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
        refresh_tcp_checksums(&mut pkt);
        let rx = |src, truncated| Received {
            src,
            payload: 0..pkt.len(),
            gro_size: None,
            truncated,
            arrived_ns: None,
        };
        for offload in [false, true] {
            let mut d = dp(offload);
            let mut c = Coalescer::new();
            let want = if offload {
                RxAction::Coalesced
            } else {
                RxAction::Write(0..pkt.len())
            };
            assert_eq!(
                d.handle_receive(&rx(Some(peer), false), &mut pkt.clone(), &mut c, 0),
                want
            );
            for (src, trunc, reason) in [
                (None, false, DropReason::NotFromPeer),
                (Some(stranger), false, DropReason::NotFromPeer),
                (Some(peer), true, DropReason::OverMtu),
                (Some(stranger), true, DropReason::NotFromPeer),
            ] {
                let before = d.stats().snapshot().peer_to_tun.drops_for(reason);
                assert_eq!(
                    d.handle_receive(&rx(src, trunc), &mut pkt.clone(), &mut c, 0),
                    RxAction::Dropped
                );
                assert_eq!(
                    d.stats().snapshot().peer_to_tun.drops_for(reason),
                    before + 1
                );
            }
        }
        // TAP mode: the VXLAN header stays out of the TUN write.
        let fwd = Forwarder::vxlan(1450, peer, 42);
        let mut d = Datapath::new("t".into(), fwd, Arc::new(WorkerStats::default()), false);
        let mut dgram = vec![0u8; 8];
        crate::packet::vxlan::write_header(&mut dgram, 42);
        dgram.extend_from_slice(&[0xaa; 60]);
        let rx = datagram(peer, dgram.len(), None);
        assert_eq!(
            d.handle_receive(&rx, &mut dgram, &mut Coalescer::new(), 0),
            RxAction::Write(8..68)
        );
    }

    #[test]
    fn codel_marks_ect_packets_and_drops_others_in_a_standing_queue() {
        let peer: SocketAddr = PEER.parse().unwrap();
        for offload in [false, true] {
            let mut d = dp(offload).with_aqm(Some(crate::aqm::CodelParams::default()));
            assert!(d.wants_timestamps());
            let mut c = Coalescer::new();
            // ECT(0) TCP segments, each having waited 2 ms in the socket
            // (target 500 us, interval 10 ms): one every 100 us.
            let mut marked_at = None;
            for i in 0..300u64 {
                let mut p = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
                p[1] = 0x02;
                refresh_tcp_checksums(&mut p);
                let now = 1_000_000_000 + i * 100_000;
                let rx = datagram(peer, p.len(), Some(now - 2_000_000));
                let action = d.handle_receive(&rx, &mut p, &mut c, now);
                assert_ne!(
                    action,
                    RxAction::Dropped,
                    "an ECT packet is marked, never dropped"
                );
                if p[1] & 0b11 == 0b11 {
                    marked_at.get_or_insert(i);
                    // The mark keeps the IPv4 header valid.
                    assert_eq!(crate::packet::checksum::checksum(&p[..20]), 0);
                }
            }
            // The first signal one interval (10 ms = 100 packets) after
            // the queue went above target.
            assert_eq!(marked_at, Some(100), "offload {offload}");
            // Then at 100 + 100/sqrt(1) and + 100/sqrt(2) packets: 3 marks.
            let s = d.stats().snapshot();
            assert_eq!(s.aqm_marks, 3, "{s}");
            assert_eq!(s.peer_to_tun.dropped(), 0);

            // Not ECN-capable: the signal is a drop, counted as aqm.
            let mut p = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
            let mut dropped = 0;
            for i in 0..200u64 {
                let now = 2_000_000_000 + i * 100_000;
                let rx = datagram(peer, p.len(), Some(now - 2_000_000));
                if d.handle_receive(&rx, &mut p, &mut c, now) == RxAction::Dropped {
                    dropped += 1;
                }
            }
            let s = d.stats().snapshot();
            // A new episode (the last one ended 97 intervals ago, so the
            // count starts over): the first signal one interval after the
            // queue went above target (packet 100), the next one interval
            // later (packet 200), past these 200 packets: exactly one.
            assert_eq!(dropped, 1, "offload {offload}");
            assert_eq!(s.peer_to_tun.drops_for(DropReason::Aqm), dropped);
        }
    }

    #[test]
    fn flow_queued_super_packet_marked_whole_or_loses_one_datagram() {
        let params = crate::aqm::CodelParams {
            target: std::time::Duration::from_micros(1),
            interval: std::time::Duration::from_micros(10),
        };
        for ect in [false, true] {
            let mut d = dp(true).with_flow_queues(Some(params), 1 << 20);
            d.attach_tx_buffers(1);
            let mut read = tso_read(14_000, 1400);
            if ect {
                // ECT(0), header checksum left to the split (it rewrites it).
                read[virtio::LEN + 1] = 0x02;
            }
            let len = read.len();
            let mut split = vec![0u8; SPLIT_LEN];
            // Queued long enough ago that CoDel signals on dequeue: first
            // an interval above target, then the signal.
            let mut signalled = None;
            for t in 0..100u64 {
                d.tx_enqueue(0, &read, len, t * 1_000);
                let q = d.tx_next(t * 1_000 + 50_000).expect("queued");
                if q.signal {
                    signalled = Some(q);
                    break;
                }
                d.tx_done(&q);
            }
            let q = signalled.expect("CoDel signalled");
            let plan = plan_of(d.handle_dequeued(&mut read, &q, &mut split));
            let s = d.stats().snapshot();
            if ect {
                assert_eq!(s.aqm_marks, 1);
                assert_eq!(s.tun_to_peer.dropped(), 0);
                assert_eq!(plan.datagrams(), 10);
                assert!(!plan.is_done());
                assert_eq!(plan.sent, 0, "all ten go, marked");
                let send = d.next_send(&plan).expect("a send");
                for (h, _) in plan.pieces(&send) {
                    let ip = &split[h];
                    assert_eq!(ip[1] & 0b11, 0b11, "CE in every datagram");
                    assert_eq!(crate::packet::checksum::checksum(&ip[..20]), 0);
                }
            } else {
                assert_eq!(s.aqm_marks, 0);
                assert_eq!(s.tun_to_peer.drops_for(DropReason::Aqm), 1);
                assert_eq!(plan.sent, plan.seg, "the first datagram is the one dropped");
                let first = d.next_send(&plan).expect("nine left");
                assert_eq!(first.range.start, plan.seg);
                assert_eq!(first.range.len(), 9 * 1440);
            }
        }
    }

    #[test]
    fn overload_is_the_rings_drop_counter_rising_recently() {
        let mut d = dp(false)
            .with_device("tun9")
            .with_flow_queues(Some(crate::aqm::CodelParams::default()), 1 << 20);
        d.attach_tx_buffers(4);
        let pkt = crate::packet::offload::tests::tcp_packet(false, 1, 0x10, &[], &[7; 100]);
        for id in 0..4 {
            d.tx_enqueue(id, &pkt, pkt.len(), 0);
        }
        let ms = 1_000_000;
        assert!(d.ring_check_due(0) || d.ring_check_due(RING_CHECK_NS));
        d.tx_ring_drops(Some(100), RING_CHECK_NS);
        // No increase: a full pool is a burst, the ring holds the rest.
        assert_eq!(d.tx_make_room(RING_CHECK_NS), None);
        // An increase since a reading 10 ms ago: overload, the fattest
        // flow's head makes room, counted.
        d.tx_ring_drops(Some(150), 2 * RING_CHECK_NS);
        assert_eq!(d.tx_make_room(2 * RING_CHECK_NS + ms), Some(0));
        assert_eq!(
            d.stats()
                .snapshot()
                .tun_to_peer
                .drops_for(DropReason::Overload),
            1
        );
        // It holds for OVERLOAD_HOLD_NS, then ends.
        let later = 2 * RING_CHECK_NS + OVERLOAD_HOLD_NS;
        assert_eq!(d.tx_make_room(later), None);
        // An increase found after a long quiet spell is not current.
        d.tx_ring_drops(Some(900), later + 50 * ms);
        assert_eq!(d.tx_make_room(later + 51 * ms), None);
        // Not due more often than every RING_CHECK_NS.
        assert!(d.ring_check_due(later + 60 * ms));
        assert!(!d.ring_check_due(later + 61 * ms));
    }

    #[test]
    fn visits_stop_at_their_packet_or_byte_bound_and_are_timed() {
        let take_all = |d: &mut Datapath, dir, bytes| {
            let mut v = d.begin_visit(dir);
            let mut n = 0;
            while v.has_room() {
                v.took(bytes);
                n += 1;
            }
            d.end_visit(v);
            n
        };
        let mut d = dp(true).with_visit_limits(VisitLimits {
            packets: 64,
            bytes: 256 << 10,
        });
        // Four 64 KiB super-packets, or 64 small packets.
        assert_eq!(take_all(&mut d, Direction::TunToPeer, 65536), 4);
        assert_eq!(take_all(&mut d, Direction::PeerToTun, 1400), 64);
        // No byte bound: only packets.
        let mut d2 = dp(true).with_visit_limits(VisitLimits {
            packets: 8,
            bytes: 0,
        });
        assert_eq!(take_all(&mut d2, Direction::TunToPeer, 65536), 8);
        // A visit that took nothing is not counted.
        let v = d.begin_visit(Direction::PeerToTun);
        d.end_visit(v);
        let s = d.stats().snapshot();
        assert_eq!(s.tun_to_peer.visits.count, 1);
        assert_eq!(s.peer_to_tun.visits.count, 1);
        // One visit: its time is the total and the longest.
        assert_eq!(s.tun_to_peer.visits.max_ns, s.tun_to_peer.visits.total_ns);
    }

    #[test]
    fn queue_delay_is_measured_from_arrival_timestamps() {
        let peer: SocketAddr = PEER.parse().unwrap();
        let mut d = dp(false).with_aqm(Some(crate::aqm::CodelParams::default()));
        for (i, waited_us) in [100u64, 300, 200].into_iter().enumerate() {
            let mut p = tcp_packet(false, i as u32, 0x10, &[], &[1; 10]);
            refresh_tcp_checksums(&mut p);
            let now = 1_000_000_000 + i as u64 * 1_000_000;
            let rx = datagram(peer, p.len(), Some(now - waited_us * 1000));
            d.handle_receive(&rx, &mut p, &mut Coalescer::new(), now);
        }
        let q = d.stats().snapshot().peer_to_tun.queue_delay;
        assert_eq!((q.count, q.total_ns, q.max_ns), (3, 600_000, 300_000));
        assert_eq!(q.avg_us(), 200.0);
    }

    #[test]
    fn write_and_receive_error_policy() {
        let d = dp(false);
        let w = WriteInfo::plain(100);
        assert_eq!(
            d.on_tun_write(&w, Err(Errno::EAGAIN)).unwrap(),
            After::Retry
        );
        assert_eq!(d.on_tun_write(&w, Err(Errno::EIO)).unwrap(), After::Next);
        assert!(d.on_tun_write(&w, Err(Errno::ENODEV)).is_err());
        assert_eq!(d.on_receive_error(Errno::EAGAIN).unwrap(), After::Retry);
        assert_eq!(
            d.on_receive_error(Errno::ECONNREFUSED).unwrap(),
            After::Next
        );
        assert_eq!(d.on_receive_error(Errno::ENOBUFS).unwrap(), After::Next);
        assert!(d.on_receive_error(Errno::EBADF).is_err());
        assert!(d.on_tun_read_error(Errno::EAGAIN).is_ok());
        assert!(d.on_tun_read_error(Errno::ENODEV).is_err());
        let s = d.stats().snapshot();
        assert_eq!(s.peer_to_tun.drops_for(DropReason::TunWriteFailed), 1);
        assert_eq!(s.peer_to_tun.backpressure, 1);
        assert_eq!(s.io_errors, 2);
    }

    #[test]
    fn reflect_answers_in_place() {
        let fwd = Forwarder::reflector(1500, PEER.parse().unwrap());
        let mut d = Datapath::new("t".into(), fwd, Arc::new(WorkerStats::default()), false);
        // An ICMP echo request.
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&[198, 19, 0, 2]);
        p[16..20].copy_from_slice(&[198, 19, 0, 1]);
        p[20] = 8;
        let c = crate::packet::checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let c = crate::packet::checksum::checksum(&p[20..]);
        p[22..24].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            d.handle_tun_read(&mut p, 28, &mut []),
            TunAction::Reflect(0..28)
        );
        assert_eq!(p[20], 0, "an echo reply");
    }
}
