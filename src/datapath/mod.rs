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
//! # The engine protocol
//! Every engine calls the datapath in this order; the types hold it to
//! the parts they can.
//! 1. **Set-up.** The runtime hands the engine a [`Setup`] (policy, queue
//!    management, limits). The engine sizes its buffers from it
//!    ([`Setup::framing`], [`Setup::offload`],
//!    [`Setup::flow_queueing_requested`]), allocates them, and calls
//!    [`Setup::build`] with how many it has per side and its socket's
//!    address. There is no [`Datapath`] before that call, so no step can be
//!    forgotten or taken out of order. (Timestamps the kernel refuses are
//!    said before: [`Setup::without_timestamps`].)
//! 2. **Time.** The engine reads one clock (`engine::now_ns`, the wall
//!    clock) and passes it to every entry that depends on time; the
//!    datapath reads none.
//! 3. **Visits.** Work on one direction is a [`Visit`]:
//!    [`Datapath::begin_visit`], then reads or receives while
//!    [`Visit::has_room`] (each counted with [`Visit::took`]), then
//!    [`Datapath::end_visit`]. A reloaded peer table is taken at the start
//!    of a visit.
//! 4. **TUN side.** A read lands behind [`Datapath::read_headroom`] bytes.
//!    Without flow queues: [`Datapath::handle_tun_read`] says what it
//!    becomes. With them ([`Datapath::flow_queueing`]):
//!    [`Datapath::tx_enqueue`] gives the buffer to the queues;
//!    [`Datapath::tx_next`] hands one back with a [`crate::fq::Dequeued`]
//!    ([`Datapath::handle_dequeued`] says what it becomes), and
//!    [`Datapath::tx_done`] when the buffer is free again. When reads find
//!    no free buffer, the engine asks [`Datapath::tx_make_room`] until it
//!    says no (overload drops, the same amount in every engine); every
//!    [`RING_CHECK_NS`] while the worker is busy (a backlog in the queues,
//!    or a visit's worth of reads since the last reading;
//!    [`Datapath::ring_check_due`]) it reads the device's drop counter
//!    into [`Datapath::tx_ring_drops`]. A plan's sends come
//!    from [`Datapath::next_send`] in order, each result into
//!    [`Datapath::on_send`]; the read buffer (and the split area) stay
//!    untouched until the plan is done.
//! 5. **UDP side.** A receive is described as the kernel gave it
//!    ([`Received`]: the sender, the payload's place, GRO size, arrival
//!    time, `MSG_TRUNC`, all read with the one codec both engines share);
//!    whether it is truncated is the datapath's rule
//!    ([`Datapath::is_truncated`]). [`Datapath::handle_receive`] (or, with
//!    the receive side's flow queues, [`Datapath::rx_enqueue`],
//!    [`Datapath::rx_next`], [`Datapath::handle_dequeued_receive`],
//!    [`Datapath::rx_done`]) says what to write; each TUN write's result
//!    goes to [`Datapath::on_tun_write`]. The receive buffer stays
//!    untouched until its writes are done.
//! 6. **Errors** of reads and receives go to
//!    [`Datapath::on_tun_read_error`] and [`Datapath::on_receive_error`],
//!    which say whether the worker goes on.
//! 7. **Events.** After each batch the engine takes what the datapath has
//!    to say ([`Datapath::poll_event`]) and logs it: the datapath never
//!    logs.
//!
//! # The rules, the same for both engines
//! - **Nothing is dropped for lack of room.** A send or TUN write that meets
//!   `EAGAIN` is retried once its destination has room ([`After::Retry`]);
//!   later sends of the same direction wait behind it, so order is kept.
//! - **GSO refused** (`EIO`, `EINVAL`, `EOPNOTSUPP`, `ENOPROTOOPT` on a
//!   segmented send): GSO is turned off for the worker, said in one line
//!   (an [`Event`]), and the same datagrams are sent one by one. Nothing is
//!   lost.
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

use std::collections::VecDeque;
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

mod queues;
mod rx;
mod tx;
mod visit;
mod wg;

use queues::FlowQueue;
pub use queues::{OVERLOAD_HOLD_NS, RING_CHECK_NS};
pub use rx::{Received, RxAction, WriteInfo};
pub use tx::{TunAction, TxBuf, TxPlan, TxSend};
pub use visit::{Direction, Visit, VisitLimits};

pub use crate::packet::offload::{GSO_MAX_BYTES, GSO_MAX_SEGMENTS, gso_segments_per_send};

/// Bytes of the largest TUN read with offload: a virtio-net header and a
/// 64 KiB super-packet.
pub const OFFLOAD_READ_LEN: usize = 65536 + virtio::LEN;
/// Room for the per-datagram headers of one super-packet (the split
/// buffer): up to 2,000 datagrams of 64-byte headers, or fewer larger ones.
pub const SPLIT_LEN: usize = 2 * 65536;

/// Where an offload read's packet starts in the read buffer: behind the
/// virtio-net header.
pub const READ_PAYLOAD_OFFSET: usize = virtio::LEN;

/// Most datagrams one send carries, so most pieces (header and payload per
/// datagram) of a gather send: engines size their iovec arrays with it.
pub const MAX_GATHER_PIECES: usize = 2 * GSO_MAX_SEGMENTS;

/// What the engine does after an I/O result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Done with it: go on (for a plan, ask [`Datapath::next_send`]).
    Next,
    /// The destination was full or the call interrupted: do the same again,
    /// once the destination has room.
    Retry,
}

/// What sizes a worker's buffers: how packets are carried and the inner
/// MTU (with offload, the 64 KiB super-packets and GRO batches instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub encap: crate::encap::Encap,
    pub mtu: usize,
}

impl Framing {
    /// The framing of `fwd`'s packets.
    pub fn of(fwd: &Forwarder) -> Framing {
        Framing {
            encap: fwd.encap(),
            mtu: fwd.mtu(),
        }
    }

    /// Bytes kept free in front of a TUN read for the encapsulation
    /// header (none with offload: headers are gathered from elsewhere).
    pub fn read_headroom(&self, offload: bool) -> usize {
        if offload { 0 } else { self.encap.header_len() }
    }

    /// Bytes a read buffer keeps free behind the largest read: room for
    /// what sealing adds there (WireGuard's tag), none without offload's
    /// gather sends or a way that grows a packet.
    pub fn read_tailroom(&self, offload: bool) -> usize {
        if offload {
            0
        } else {
            self.encap.trailer_room(self.mtu)
        }
    }

    /// Bytes a TUN read may return: the largest frame, or with offload a
    /// virtio-net header and a 64 KiB super-packet.
    pub fn max_read_len(&self, offload: bool) -> usize {
        if offload {
            OFFLOAD_READ_LEN
        } else {
            self.encap.max_inner_len(self.mtu)
        }
    }

    /// Bytes a receive buffer needs: the largest datagram the peer may
    /// send, plus one so that an oversize datagram is told by its length;
    /// with GRO, a 64 KiB batch.
    pub fn max_receive_len(&self, offload: bool) -> usize {
        if offload {
            65536
        } else {
            self.encap.max_datagram_len(self.mtu) + 1
        }
    }
}

/// A worker's datapath before its engine has buffers and a socket: what
/// the runtime decides (policy, queueing, limits), and what the engine
/// reads to size its buffers. The engine turns it into the [`Datapath`]
/// with [`Setup::build`], so no set-up step can be left out or taken in
/// the wrong order.
#[derive(Debug)]
pub struct Setup {
    fwd: Forwarder,
    stats: Arc<WorkerStats>,
    offload: bool,
    label: String,
    aqm: Option<crate::aqm::CodelParams>,
    fq_params: Option<crate::aqm::CodelParams>,
    fq_in_flight: usize,
    limits: VisitLimits,
    device: String,
    shared_peers: Option<Arc<SharedPeers>>,
    wg: Option<Arc<crate::wg::Device>>,
}

/// What the engine gives the datapath at [`Setup::build`]: where its UDP
/// socket is bound (destinations take its family's form), and how many
/// buffers it reads the TUN device and receives into, numbered from 0
/// (with flow queueing, they are what each side's queues hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attach {
    pub socket: SocketAddr,
    pub tun_buffers: usize,
    pub udp_buffers: usize,
}

impl Attach {
    /// `buffers` on each side and an unbound IPv4 socket: for harnesses
    /// (tests, fuzzers, benches) that call the datapath without a socket.
    pub fn harness(buffers: usize) -> Attach {
        Attach {
            socket: SocketAddr::from(([0, 0, 0, 0], 0)),
            tun_buffers: buffers,
            udp_buffers: buffers,
        }
    }
}

impl Setup {
    /// The datapath of worker `label`, forwarding with `fwd`, counting into
    /// `stats`; `offload`: the TUN device carries virtio-net headers and
    /// the socket does GSO/GRO.
    pub fn new(label: String, fwd: Forwarder, stats: Arc<WorkerStats>, offload: bool) -> Setup {
        Setup {
            fwd,
            stats,
            offload,
            label,
            aqm: None,
            fq_params: None,
            fq_in_flight: crate::config::DEFAULT_AQM_INFLIGHT_BYTES,
            limits: VisitLimits::default(),
            device: String::new(),
            shared_peers: None,
            wg: None,
        }
    }

    /// WireGuard mode: packets are sealed for and opened from the peers of
    /// `dev` (whose order is the peer table's).
    pub fn with_wireguard(mut self, dev: Arc<crate::wg::Device>) -> Self {
        self.wg = Some(dev);
        self
    }

    /// Takes the peer table from `shared`, and the new one at the start of
    /// the first visit after each reload ([`SharedPeers::store`]).
    pub fn with_shared_peers(mut self, shared: Arc<SharedPeers>) -> Self {
        self.shared_peers = Some(shared);
        self
    }

    /// Applies CoDel with `params` to datagrams from the peer, using the
    /// kernel's arrival timestamps (TUN mode: the packets must be IP to
    /// carry a mark).
    pub fn with_aqm(mut self, params: Option<crate::aqm::CodelParams>) -> Self {
        self.aqm = params.filter(|_| self.fwd.carries_ip());
        self
    }

    /// Queues TUN reads and receives per flow with CoDel `params` (TUN
    /// mode only: the packets must be IP to be told apart and marked),
    /// handing out at most `in_flight` bytes per side not yet sent or
    /// written.
    pub fn with_flow_queues(
        mut self,
        params: Option<crate::aqm::CodelParams>,
        in_flight: usize,
    ) -> Self {
        self.fq_params = params.filter(|_| self.fwd.carries_ip());
        self.fq_in_flight = in_flight.max(1);
        self
    }

    /// Names the TUN device whose drop counter the engine reads for
    /// overload ([`Datapath::ring_check_due`]).
    pub fn with_device(mut self, name: &str) -> Self {
        self.device = name.to_string();
        self
    }

    /// Bounds each visit to a direction (see [`VisitLimits`]).
    pub fn with_visit_limits(mut self, limits: VisitLimits) -> Self {
        self.limits = VisitLimits {
            packets: limits.packets.max(1),
            ..limits
        };
        self
    }

    /// The kernel gives no arrival timestamps: the AQM (and the receive
    /// side's flow queues, whose clock they are) stay off.
    pub fn without_timestamps(mut self) -> Self {
        self.aqm = None;
        self
    }

    /// True if the engine should ask the kernel for arrival timestamps.
    pub fn wants_timestamps(&self) -> bool {
        self.aqm.is_some()
    }

    /// True if flow queueing was asked for: the engine then gives the TUN
    /// side (and, with timestamps, the receive side) as many buffers as
    /// the queues are to hold.
    pub fn flow_queueing_requested(&self) -> bool {
        self.fq_params.is_some()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn offload(&self) -> bool {
        self.offload
    }

    pub fn visit_limits(&self) -> VisitLimits {
        self.limits
    }

    /// What sizes the engine's buffers.
    pub fn framing(&self) -> Framing {
        Framing::of(&self.fwd)
    }

    /// True if the engine's socket should report each datagram's outer
    /// TOS byte ([`Received::tos`]): the encapsulation carries ECN.
    pub fn wants_outer_tos(&self) -> bool {
        self.fwd.encap().carries_ecn()
    }

    /// The datapath over the engine's buffers and socket.
    pub fn build(self, at: Attach) -> Datapath {
        let Setup {
            mut fwd,
            stats,
            offload,
            label,
            aqm,
            fq_params,
            fq_in_flight,
            limits,
            device,
            shared_peers,
            wg,
        } = self;
        fwd.set_socket(at.socket);
        let framing = Framing::of(&fwd);
        let mut peers_generation = 0;
        let mut per_peer = false;
        let mut wg_set = None;
        if let Some(shared) = &shared_peers {
            let (generation, table) = shared.load();
            wg_set = table.attached::<crate::wg::PeerSet>();
            per_peer = !table.is_single();
            fwd.set_peers(table);
            peers_generation = generation;
        }
        Datapath {
            queues: queues::Queues {
                txq: fq_params.map(|p| FlowQueue::new(at.tun_buffers, p, fq_in_flight)),
                // Receives are queued by the flow of their inner packet,
                // which a WireGuard datagram hides until it is opened.
                rxq: fq_params
                    .filter(|_| aqm.is_some() && wg.is_none())
                    .map(|p| FlowQueue::new(at.udp_buffers, p, fq_in_flight)),
                device,
                ring_drops: None,
                ring_checked_ns: 0,
                reads_since_check: 0,
            },
            rx: rx::RxState {
                aqm: aqm.map(crate::aqm::Codel::new),
                aqm_pending: false,
            },
            tx: tx::TxState { gso: offload },
            peers: PeerView {
                shared: shared_peers,
                generation: peers_generation,
                per_peer,
            },
            fwd,
            stats,
            offload,
            label,
            limits,
            events: VecDeque::new(),
            // A datagram, or with offload a whole super-packet's segments
            // (headers repeated, padding) before they are sealed.
            wg: wg.map(|dev| wg::WgPath {
                set: wg_set.unwrap_or_else(|| dev.current()),
                scratch: vec![
                    0;
                    if offload {
                        2 * OFFLOAD_READ_LEN
                    } else {
                        framing.max_receive_len(false)
                    }
                ],
            }),
        }
    }
}

/// Something the datapath decided that the worker's owner should hear of
/// (the engine logs it); taken with [`Datapath::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The kernel refused a UDP GSO send with this error: datagrams now go
    /// one by one on this worker (nothing was lost).
    GsoRefused(Errno),
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::GsoRefused(e) => {
                write!(f, "UDP GSO refused ({e}): sending datagrams one by one")
            }
        }
    }
}

/// The shared datapath of one worker: policy, offload state and counters.
/// Made by [`Setup::build`]. Every entry that depends on time takes it
/// (`now_ns`): one clock for both sides, the wall clock in ns since the
/// Unix epoch, because it is the clock of the kernel's arrival timestamps
/// (`SO_TIMESTAMPNS`) that the receive side measures against. The datapath
/// reads no clock itself, so tests drive it through time exactly; a clock
/// step only shifts sojourn times for one CoDel interval (all differences
/// saturate at 0).
#[derive(Debug)]
pub struct Datapath {
    fwd: Forwarder,
    stats: Arc<WorkerStats>,
    /// The TUN device carries virtio-net headers; the socket does GSO/GRO.
    offload: bool,
    /// "TUN queue 0 of tun0", for errors.
    label: String,
    /// Each part's own state: the peer table in use, the TUN side's
    /// sends, the receive side's CoDel, the flow queues and overload.
    peers: PeerView,
    tx: tx::TxState,
    rx: rx::RxState,
    queues: queues::Queues,
    /// What one visit to a direction may take.
    limits: VisitLimits,
    /// Events not yet taken by the engine.
    events: VecDeque<Event>,
    /// WireGuard mode: the tunnel's keys and sessions.
    wg: Option<wg::WgPath>,
}

/// The peer table as reloads publish it, the generation the forwarder
/// has, and whether to count per peer (a table with prefixes).
#[derive(Debug)]
struct PeerView {
    shared: Option<Arc<SharedPeers>>,
    generation: u64,
    per_peer: bool,
}

impl Datapath {
    /// Takes a reloaded peer table (and with WireGuard the peer set
    /// attached to it), if there is one: one atomic load when there is
    /// not. Packets in flight keep their destination.
    #[inline]
    fn refresh_peers(&mut self) {
        let Some(shared) = &self.peers.shared else {
            return;
        };
        if shared.generation() == self.peers.generation {
            return;
        }
        let (generation, table) = shared.load();
        // WireGuard's peers come with the table whose numbers name them.
        if let (Some(wg), Some(set)) = (&mut self.wg, table.attached::<crate::wg::PeerSet>()) {
            wg.set = set;
        }
        self.peers.per_peer = !table.is_single();
        self.fwd.set_peers(table);
        self.peers.generation = generation;
    }

    /// Worker `queue`'s counters of peer `id` (in the current table).
    #[inline]
    fn peer_counters(&self, id: PeerId) -> &crate::peers::PeerCounters {
        self.fwd.peers().peer(id).stats.worker(self.fwd.queue())
    }

    /// The next event, oldest first; None when there is none.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The device to watch.
    pub fn device(&self) -> &str {
        &self.queues.device
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

    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Headroom the engine leaves in front of every TUN read.
    pub fn read_headroom(&self) -> usize {
        Framing::of(&self.fwd).read_headroom(self.offload)
    }

    /// Room the engine leaves behind the largest TUN read.
    pub fn read_tailroom(&self) -> usize {
        Framing::of(&self.fwd).read_tailroom(self.offload)
    }

    /// Bytes a TUN read may return.
    pub fn max_read_len(&self) -> usize {
        Framing::of(&self.fwd).max_read_len(self.offload)
    }

    /// Bytes a receive buffer needs.
    pub fn max_receive_len(&self) -> usize {
        Framing::of(&self.fwd).max_receive_len(self.offload)
    }

    /// True if receives go through flow queues: the engine queues each
    /// ([`Datapath::rx_enqueue`]) and handles what [`Datapath::rx_next`]
    /// hands out ([`Datapath::handle_dequeued_receive`]).
    pub fn rx_flow_queueing(&self) -> bool {
        self.queues.rxq.is_some()
    }

    /// True if the kernel's arrival timestamps are used (the engine asks
    /// for them with each receive).
    pub fn wants_timestamps(&self) -> bool {
        self.rx.aqm.is_some()
    }
}

#[cfg(test)]
mod tests;
