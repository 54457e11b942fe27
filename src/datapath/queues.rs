//! The flow queues of both sides over the engine's buffers, and overload:
//! the device's ring dropping, read from its counter.

use super::*;

/// Overload lasts this long after the kernel last dropped at the TUN
/// device's full ring: while it does, a read that finds no free buffer
/// drops the fattest flow's head to make room.
pub const OVERLOAD_HOLD_NS: u64 = 100_000_000;

/// How often the engine reads the device's drop counter
/// ([`Datapath::ring_check_due`]).
pub const RING_CHECK_NS: u64 = 10_000_000;

/// The flow queues of both sides, and the overload watch: the TUN
/// device's name, its drop counter as last read (and when), and when the
/// engine was last told to read it.
#[derive(Debug)]
pub(super) struct Queues {
    pub(super) txq: Option<FlowQueue>,
    pub(super) rxq: Option<FlowQueue>,
    pub(super) device: String,
    pub(super) ring_drops: Option<(u64, u64)>,
    pub(super) ring_checked_ns: u64,
    /// TUN reads queued since the drop counter was last read.
    pub(super) reads_since_check: u64,
}

/// One side's flow queues (see [`crate::fq`]) over the engine's buffers
/// of that side, with what is in flight and the overload state.
#[derive(Debug)]
pub(super) struct FlowQueue {
    pub(super) q: crate::fq::FlowQueues,
    pub(super) keys: std::collections::hash_map::RandomState,
    /// Buffers dequeued that the engine has not handed back, and the most
    /// that may be: half the pool, so that the other half can hold queued
    /// packets (and a backlog can be dropped from) while sends are slow.
    pub(super) in_flight_buffers: usize,
    pub(super) max_in_flight_buffers: usize,
    /// Bytes dequeued that the engine has not handed back, and
    /// the most bytes that may be (a fixed BQL: enough to keep the
    /// destination busy; the rest waits here, where a sparse flow can pass
    /// it).
    pub(super) in_flight: usize,
    pub(super) in_flight_limit: usize,
    /// Overload: when the kernel last dropped at the queue in front of
    /// this side (the TUN device's ring overflowed), as the engine found
    /// by reading the device's drop counter.
    pub(super) ring_dropped_ns: Option<u64>,
    /// The buffers the queues are over.
    pub(super) buffers: usize,
}

impl FlowQueue {
    pub(super) fn new(
        buffers: usize,
        p: crate::aqm::CodelParams,
        in_flight_limit: usize,
    ) -> FlowQueue {
        FlowQueue {
            q: crate::fq::FlowQueues::new(buffers, p),
            keys: Default::default(),
            in_flight: 0,
            in_flight_limit,
            in_flight_buffers: 0,
            max_in_flight_buffers: (buffers / 2).max(1),
            ring_dropped_ns: None,
            buffers,
        }
    }

    /// Queues buffer `id`, `len` bytes whose (first) IP packet is `pkt`,
    /// arrived at `at_ns`.
    pub(super) fn enqueue(
        &mut self,
        id: u32,
        pkt: &[u8],
        len: usize,
        at_ns: u64,
        stats: &DirectionStats,
    ) {
        let hash = crate::fq::flow_hash(&self.keys, pkt);
        let can_signal = !crate::aqm::is_tcp_without_data(pkt);
        self.q.enqueue(id, hash, len, can_signal, at_ns);
        stats.queue_max.record(self.q.len() as u64);
        stats.queued.set(self.q.len() as u64);
    }

    /// Publishes what is queued and in flight (gauges for the metrics).
    #[inline]
    pub(super) fn publish(&self, stats: &DirectionStats) {
        stats.queued.set(self.q.len() as u64);
        stats.in_flight_buffers.set(self.in_flight_buffers as u64);
        stats.in_flight_bytes.set(self.in_flight as u64);
    }

    pub(super) fn next(
        &mut self,
        now_ns: u64,
        stats: &DirectionStats,
    ) -> Option<crate::fq::Dequeued> {
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

    pub(super) fn done(&mut self, d: &crate::fq::Dequeued, stats: &DirectionStats) {
        self.in_flight = self.in_flight.saturating_sub(d.bytes);
        self.in_flight_buffers = self.in_flight_buffers.saturating_sub(1);
        self.publish(stats);
    }

    pub(super) fn make_room(&mut self, now_ns: u64, stats: &DirectionStats) -> Option<u32> {
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

impl Datapath {
    /// Receives in the flow queues.
    pub fn rx_queued(&self) -> usize {
        self.queues.rxq.as_ref().map_or(0, |q| q.q.len())
    }

    /// True every [`RING_CHECK_NS`] with flow queueing on, while the
    /// worker is busy: its flow queues hold packets, or it has read at
    /// least a visit's packets (`--batch`) since the last reading. The
    /// engine then reads the device's drop counter
    /// (`crate::platform::device_tx_drops`) and reports it with
    /// [`Datapath::tx_ring_drops`]. The ring overflows only while the
    /// worker falls behind, reading full visits or keeping a backlog; a
    /// quiet tunnel (a packet per wakeup, sent at once) pays for the
    /// reading, a render of every device's counters, once per a visit's
    /// worth of packets instead of on every other packet.
    pub fn ring_check_due(&mut self, now_ns: u64) -> bool {
        let busy =
            self.tx_queued() > 0 || self.queues.reads_since_check >= self.limits.packets as u64;
        if self.queues.device.is_empty() || !busy {
            return false;
        }
        if now_ns.saturating_sub(self.queues.ring_checked_ns) < RING_CHECK_NS {
            return false;
        }
        self.queues.ring_checked_ns = now_ns;
        self.queues.reads_since_check = 0;
        true
    }

    /// The device's transmit drop counter was `count` at `now_ns` (None:
    /// unreadable): an increase is the ring overflowing, which starts (or
    /// continues) overload.
    pub fn tx_ring_drops(&mut self, count: Option<u64>, now_ns: u64) {
        let Some(count) = count else { return };
        let before = self.queues.ring_drops.replace((count, now_ns));
        // Only an increase since a recent reading is current: after a
        // quiet spell (no visits, no readings) it may be long past.
        let rose = before
            .is_some_and(|(b, at)| count > b && now_ns.saturating_sub(at) <= 2 * RING_CHECK_NS);
        if let (true, Some(q)) = (rose, self.queues.txq.as_mut()) {
            q.ring_dropped_ns = Some(now_ns);
        }
    }

    /// True if TUN reads go through the flow queues: the engine queues
    /// each read ([`Datapath::tx_enqueue`]) and sends what
    /// [`Datapath::tx_next`] hands out ([`Datapath::handle_dequeued`]).
    pub fn flow_queueing(&self) -> bool {
        self.queues.txq.is_some()
    }

    /// Packets in the flow queues.
    pub fn tx_queued(&self) -> usize {
        self.queues.txq.as_ref().map_or(0, |t| t.q.len())
    }

    /// The TUN side's reads ran out of buffers at `now_ns`, with `free`
    /// buffers ready for reads: which queued read to drop to make room, if
    /// any. Normally none: the device's ring holds the rest until buffers
    /// come back (a burst). In overload (the ring overflowed within
    /// [`OVERLOAD_HOLD_NS`]: the sender does not answer CoDel, and a ping
    /// waits behind a full FIFO ring or is dropped there), the head of the
    /// flow with the most bytes queued, counted as `overload`, until half
    /// the buffers are free: the engine calls again after each (its buffer
    /// is free for reads), so both engines drop the same amount. The
    /// device is read promptly, the flood loses what it must in tunfwd's
    /// queue instead of everyone in the ring, and no work is spent on what
    /// is dropped.
    pub fn tx_make_room(&mut self, now_ns: u64, free: usize) -> Option<u32> {
        let q = self.queues.txq.as_mut()?;
        if free >= q.buffers.div_ceil(2) {
            return None;
        }
        q.make_room(now_ns, &self.stats.tun_to_peer)
    }
}
