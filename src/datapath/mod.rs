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

mod queues;
mod rx;
mod tx;
mod visit;

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

    /// Applies CoDel with `params` to datagrams from the peer, using the
    /// kernel's arrival timestamps (TUN mode: the packets must be IP to
    /// carry a mark).
    pub fn with_aqm(mut self, params: Option<crate::aqm::CodelParams>) -> Self {
        self.aqm = params
            .filter(|_| self.fwd.carries_ip())
            .map(crate::aqm::Codel::new);
        self
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

    /// The flow queues' clock (monotonic ns).
    pub fn clock_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
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
        Framing::of(&self.fwd).read_headroom(self.offload)
    }

    /// Bytes a TUN read may return.
    pub fn max_read_len(&self) -> usize {
        Framing::of(&self.fwd).max_read_len(self.offload)
    }

    /// Bytes a receive buffer needs.
    pub fn max_receive_len(&self) -> usize {
        Framing::of(&self.fwd).max_receive_len(self.offload)
    }
}

#[cfg(test)]
mod tests;
