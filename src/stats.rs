//! Per-worker counters and their printed form.
//!
//! Each worker owns one [`WorkerStats`] and is its only writer, so an update
//! is a relaxed load and store (no locked instruction on the hot path). The
//! reporter reads them at any time with relaxed loads; a snapshot may be a few
//! packets behind, never torn per counter.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::DropReason;

/// A counter with exactly one writing thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The largest value seen, with exactly one writing thread.
#[derive(Default, Debug)]
pub struct Max(AtomicU64);

impl Max {
    /// Keeps `v` if it is the largest yet. Only the owning worker may call
    /// this.
    #[inline]
    pub fn record(&self, v: u64) {
        if v > self.0.load(Ordering::Relaxed) {
            self.0.store(v, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that is set, not added to, with exactly one writing thread.
#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Only the owning worker may call this.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (inclusive, ns) of the duration histogram's buckets, 1 us
/// to 1 s in 1-2-5 steps; a last bucket takes everything longer.
pub const DURATION_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];
/// Buckets of the duration histogram: one per bound and one beyond.
pub const DURATION_BUCKETS: usize = DURATION_BOUNDS_NS.len() + 1;

/// A duration measured many times: how often, in total, the longest, and
/// how many fell in each bucket of [`DURATION_BOUNDS_NS`].
#[derive(Default, Debug)]
pub struct Durations {
    pub count: Counter,
    pub total_ns: Counter,
    pub max_ns: Max,
    buckets: [Counter; DURATION_BUCKETS],
}

impl Durations {
    #[inline]
    pub fn record(&self, ns: u64) {
        self.count.add(1);
        self.total_ns.add(ns);
        self.max_ns.record(ns);
        let b = DURATION_BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[b].add(1);
    }

    pub fn snapshot(&self) -> DurationSnapshot {
        let mut buckets = [0; DURATION_BUCKETS];
        for (b, c) in buckets.iter_mut().zip(&self.buckets) {
            *b = c.get();
        }
        DurationSnapshot {
            count: self.count.get(),
            total_ns: self.total_ns.get(),
            max_ns: self.max_ns.get(),
            buckets,
        }
    }
}

/// Plain copy of [`Durations`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationSnapshot {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Per bucket (not cumulative).
    pub buckets: [u64; DURATION_BUCKETS],
}

impl DurationSnapshot {
    /// The mean in microseconds (0 without measurements).
    pub fn avg_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total_ns as f64 / self.count as f64 / 1e3
        }
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1e3
    }

    fn add(&mut self, o: &DurationSnapshot) {
        self.count += o.count;
        self.total_ns += o.total_ns;
        self.max_ns = self.max_ns.max(o.max_ns);
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
    }
}

/// Counters of one direction of one worker.
#[derive(Default, Debug)]
pub struct DirectionStats {
    /// Packets delivered to the destination endpoint.
    pub packets: Counter,
    /// Bytes of those packets (inner IP packet length).
    pub bytes: Counter,
    /// Times the destination was full and the engine had to wait.
    pub backpressure: Counter,
    /// The worker's visits to this direction: how long each took (the
    /// reads, the decisions and the sends or writes they led to), while
    /// the other direction waited.
    pub visits: Durations,
    /// How long packets waited in the queue before this direction's
    /// reader took them: the UDP receive buffer, from the kernel's arrival
    /// timestamp (peer to TUN, when timestamps are on).
    pub queue_delay: Durations,
    /// TUN to peer with flow queueing: the most packets tunfwd's own
    /// queue held at once.
    pub queue_max: Max,
    /// With flow queueing, now: packets in this side's flow queues, and
    /// buffers and bytes handed out and not yet sent (or written).
    pub queued: Gauge,
    pub in_flight_buffers: Gauge,
    pub in_flight_bytes: Gauge,
    drops: [Counter; DropReason::COUNT],
}

impl DirectionStats {
    #[inline]
    pub fn delivered(&self, bytes: usize) {
        self.packets.add(1);
        self.bytes.add(bytes as u64);
    }

    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason.index()].add(1);
    }

    pub fn snapshot(&self) -> DirectionSnapshot {
        let mut drops = [0; DropReason::COUNT];
        for (d, c) in drops.iter_mut().zip(&self.drops) {
            *d = c.get();
        }
        DirectionSnapshot {
            packets: self.packets.get(),
            bytes: self.bytes.get(),
            backpressure: self.backpressure.get(),
            visits: self.visits.snapshot(),
            queue_delay: self.queue_delay.snapshot(),
            queue_max: self.queue_max.get(),
            queued: self.queued.get(),
            in_flight_buffers: self.in_flight_buffers.get(),
            in_flight_bytes: self.in_flight_bytes.get(),
            drops,
        }
    }
}

/// Everything one worker counts.
#[derive(Default, Debug)]
pub struct WorkerStats {
    /// Packets read from the TUN device and sent to the peer.
    pub tun_to_peer: DirectionStats,
    /// Datagrams received from the peer and written to the TUN device.
    pub peer_to_tun: DirectionStats,
    /// System calls the engine made (poll, read, write, recv, send, ...).
    pub syscalls: Counter,
    /// Times the engine went to sleep waiting for events.
    pub waits: Counter,
    /// Socket errors that did not stop the worker (queued ICMP errors).
    pub io_errors: Counter,
    /// ICMP errors (port or host unreachable, ...) the kernel reported for
    /// datagrams sent to the peer: the peer is down or unreachable.
    pub peer_unreachable: Counter,
    /// Times a read found no free buffer in the worker's pool.
    pub pool_exhausted: Counter,
    /// UDP GSO sends and the datagrams they carried.
    pub gso_sends: Counter,
    pub gso_segments: Counter,
    /// Receives that returned GRO-coalesced datagrams, and how many.
    pub gro_receives: Counter,
    pub gro_datagrams: Counter,
    /// TUN writes with a virtio-net header, and the packets they carried.
    pub vnet_writes: Counter,
    pub vnet_write_packets: Counter,
    /// Packets from the peer that CoDel found in a standing queue and
    /// marked CE (ECN-capable); those it dropped count as drops (`aqm`).
    pub aqm_marks: Counter,
}

impl WorkerStats {
    pub fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            tun_to_peer: self.tun_to_peer.snapshot(),
            peer_to_tun: self.peer_to_tun.snapshot(),
            syscalls: self.syscalls.get(),
            waits: self.waits.get(),
            io_errors: self.io_errors.get(),
            peer_unreachable: self.peer_unreachable.get(),
            pool_exhausted: self.pool_exhausted.get(),
            gso_sends: self.gso_sends.get(),
            gso_segments: self.gso_segments.get(),
            gro_receives: self.gro_receives.get(),
            gro_datagrams: self.gro_datagrams.get(),
            vnet_writes: self.vnet_writes.get(),
            vnet_write_packets: self.vnet_write_packets.get(),
            aqm_marks: self.aqm_marks.get(),
        }
    }
}

/// Plain copy of [`DirectionStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionSnapshot {
    pub packets: u64,
    pub bytes: u64,
    pub backpressure: u64,
    pub visits: DurationSnapshot,
    pub queue_delay: DurationSnapshot,
    pub queue_max: u64,
    pub queued: u64,
    pub in_flight_buffers: u64,
    pub in_flight_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl DirectionSnapshot {
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    fn add(&mut self, o: &DirectionSnapshot) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.backpressure += o.backpressure;
        self.visits.add(&o.visits);
        self.queue_delay.add(&o.queue_delay);
        self.queue_max = self.queue_max.max(o.queue_max);
        self.queued += o.queued;
        self.in_flight_buffers += o.in_flight_buffers;
        self.in_flight_bytes += o.in_flight_bytes;
        for (a, b) in self.drops.iter_mut().zip(&o.drops) {
            *a += b;
        }
    }
}

/// Plain copy of [`WorkerStats`]; also used for the sum over all workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub tun_to_peer: DirectionSnapshot,
    pub peer_to_tun: DirectionSnapshot,
    pub syscalls: u64,
    pub waits: u64,
    pub io_errors: u64,
    pub peer_unreachable: u64,
    pub pool_exhausted: u64,
    pub gso_sends: u64,
    pub gso_segments: u64,
    pub gro_receives: u64,
    pub gro_datagrams: u64,
    pub vnet_writes: u64,
    pub vnet_write_packets: u64,
    pub aqm_marks: u64,
}

impl WorkerSnapshot {
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a WorkerSnapshot>) -> WorkerSnapshot {
        let mut total = WorkerSnapshot::default();
        for s in all {
            total.tun_to_peer.add(&s.tun_to_peer);
            total.peer_to_tun.add(&s.peer_to_tun);
            total.syscalls += s.syscalls;
            total.waits += s.waits;
            total.io_errors += s.io_errors;
            total.peer_unreachable += s.peer_unreachable;
            total.pool_exhausted += s.pool_exhausted;
            total.gso_sends += s.gso_sends;
            total.gso_segments += s.gso_segments;
            total.gro_receives += s.gro_receives;
            total.gro_datagrams += s.gro_datagrams;
            total.vnet_writes += s.vnet_writes;
            total.vnet_write_packets += s.vnet_write_packets;
            total.aqm_marks += s.aqm_marks;
        }
        total
    }

    /// Packets delivered in both directions.
    pub fn packets(&self) -> u64 {
        self.tun_to_peer.packets + self.peer_to_tun.packets
    }
}

/// The drop reasons that counted, with their counts, in the order of
/// [`DropReason::ALL`].
pub fn nonzero_drops(
    drops: &[u64; DropReason::COUNT],
) -> impl Iterator<Item = (DropReason, u64)> + '_ {
    DropReason::ALL
        .into_iter()
        .map(|r| (r, drops[r.index()]))
        .filter(|&(_, n)| n > 0)
}

/// The same as a JSON object (`{"aqm": 3, ...}`).
pub fn nonzero_drops_json(
    drops: &[u64; DropReason::COUNT],
) -> serde_json::Map<String, serde_json::Value> {
    nonzero_drops(drops)
        .map(|(r, n)| (r.name().to_string(), n.into()))
        .collect()
}

/// Writes one direction as `key=value` pairs, e.g.
/// `tun_to_peer packets=10 bytes=840 drops=1 backpressure=0 [over_mtu=1]`.
fn write_direction(out: &mut String, name: &str, d: &DirectionSnapshot) {
    let _ = write!(
        out,
        "{name} packets={} bytes={} drops={} backpressure={}",
        d.packets,
        d.bytes,
        d.dropped(),
        d.backpressure
    );
    if d.dropped() > 0 {
        out.push_str(" [");
        for (i, (r, n)) in nonzero_drops(&d.drops).enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let _ = write!(out, "{}={n}", r.name());
        }
        out.push(']');
    }
    if d.visits.count > 0 {
        let _ = write!(
            out,
            " visits={} visit_avg_us={:.1} visit_max_us={:.0}",
            d.visits.count,
            d.visits.avg_us(),
            d.visits.max_us()
        );
    }
    if d.queue_delay.count > 0 {
        let _ = write!(
            out,
            " queue_delay_avg_us={:.1} queue_delay_max_us={:.0}",
            d.queue_delay.avg_us(),
            d.queue_delay.max_us()
        );
    }
    if d.queue_max > 0 {
        let _ = write!(out, " queue_max={}", d.queue_max);
    }
}

fn direction_json(d: &DirectionSnapshot) -> serde_json::Value {
    serde_json::json!({
        "packets": d.packets,
        "bytes": d.bytes,
        "drops": d.dropped(),
        "drop_reasons": nonzero_drops_json(&d.drops),
        "backpressure": d.backpressure,
        "visits": d.visits.count,
        "visit_avg_us": d.visits.avg_us(),
        "visit_max_us": d.visits.max_us(),
        "queue_delay_avg_us": d.queue_delay.avg_us(),
        "queue_delay_max_us": d.queue_delay.max_us(),
        "queue_max": d.queue_max,
    })
}

impl WorkerSnapshot {
    /// The same fields as the text form, as one JSON object (every field
    /// always present; drop reasons only where they counted).
    pub fn to_json(&self) -> serde_json::Value {
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        serde_json::json!({
            "tun_to_peer": direction_json(&self.tun_to_peer),
            "peer_to_tun": direction_json(&self.peer_to_tun),
            "syscalls": self.syscalls,
            "syscalls_per_packet": ratio(self.syscalls, self.packets()),
            "waits": self.waits,
            "io_errors": self.io_errors,
            "peer_unreachable": self.peer_unreachable,
            "pool_exhausted": self.pool_exhausted,
            "aqm_marks": self.aqm_marks,
            "aqm_drops": self.peer_to_tun.drops_for(DropReason::Aqm)
                + self.tun_to_peer.drops_for(DropReason::Aqm),
            "gso_sends": self.gso_sends,
            "segments_per_send": ratio(self.gso_segments, self.gso_sends),
            "gro_receives": self.gro_receives,
            "datagrams_per_receive": ratio(self.gro_datagrams, self.gro_receives),
            "vnet_writes": self.vnet_writes,
            "packets_per_tun_write": ratio(self.vnet_write_packets, self.vnet_writes),
        })
    }
}

impl fmt::Display for WorkerSnapshot {
    /// Two directions and the engine's effort, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(256);
        write_direction(&mut s, "tun_to_peer", &self.tun_to_peer);
        s.push_str(" | ");
        write_direction(&mut s, "peer_to_tun", &self.peer_to_tun);
        let per_packet = if self.packets() > 0 {
            self.syscalls as f64 / self.packets() as f64
        } else {
            0.0
        };
        let _ = write!(
            s,
            " | syscalls={} syscalls_per_packet={per_packet:.2} waits={} io_errors={} peer_unreachable={} pool_exhausted={}",
            self.syscalls, self.waits, self.io_errors, self.peer_unreachable, self.pool_exhausted
        );
        let aqm_drops = self.peer_to_tun.drops_for(DropReason::Aqm)
            + self.tun_to_peer.drops_for(DropReason::Aqm);
        if self.aqm_marks + aqm_drops > 0 {
            let _ = write!(s, " | aqm_marks={} aqm_drops={aqm_drops}", self.aqm_marks);
        }
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        if self.gso_sends + self.gro_receives + self.vnet_writes > 0 {
            let _ = write!(
                s,
                " | gso_sends={} segments_per_send={:.2} gro_receives={} datagrams_per_receive={:.2} \
                 vnet_writes={} packets_per_tun_write={:.2}",
                self.gso_sends,
                ratio(self.gso_segments, self.gso_sends),
                self.gro_receives,
                ratio(self.gro_datagrams, self.gro_receives),
                self.vnet_writes,
                ratio(self.vnet_write_packets, self.vnet_writes),
            );
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_formats() {
        let w = WorkerStats::default();
        w.tun_to_peer.delivered(100);
        w.tun_to_peer.delivered(50);
        w.peer_to_tun.drop(DropReason::NotFromPeer);
        w.peer_to_tun.drop(DropReason::NotFromPeer);
        w.peer_to_tun.drop(DropReason::OverMtu);
        w.syscalls.add(6);
        let s = w.snapshot();
        assert_eq!(s.tun_to_peer.packets, 2);
        assert_eq!(s.tun_to_peer.bytes, 150);
        assert_eq!(s.peer_to_tun.dropped(), 3);
        let line = s.to_string();
        assert!(
            line.contains("tun_to_peer packets=2 bytes=150 drops=0"),
            "{line}"
        );
        assert!(line.contains("[over_mtu=1 not_from_peer=2]"), "{line}");
        assert!(line.contains("syscalls_per_packet=3.00"), "{line}");
    }

    #[test]
    fn visits_and_queue_delay_are_printed_and_summed() {
        let a = WorkerStats::default();
        let b = WorkerStats::default();
        a.tun_to_peer.visits.record(2_000);
        a.tun_to_peer.visits.record(4_000);
        b.tun_to_peer.visits.record(9_000);
        b.peer_to_tun.queue_delay.record(150_000);
        let line = a.snapshot().to_string();
        assert!(
            line.contains("visits=2 visit_avg_us=3.0 visit_max_us=4"),
            "{line}"
        );
        assert!(!line.contains("queue_delay"), "{line}");
        let total = WorkerSnapshot::sum(&[a.snapshot(), b.snapshot()]);
        assert_eq!(total.tun_to_peer.visits.count, 3);
        assert_eq!(total.tun_to_peer.visits.max_ns, 9_000);
        let line = total.to_string();
        assert!(
            line.contains("queue_delay_avg_us=150.0 queue_delay_max_us=150"),
            "{line}"
        );
    }

    #[test]
    fn durations_fall_in_their_buckets() {
        let d = Durations::default();
        for ns in [
            0,
            1_000,
            1_001,
            7_000,
            999_999_999,
            1_000_000_001,
            u64::MAX / 4,
        ] {
            d.record(ns);
        }
        let s = d.snapshot();
        assert_eq!(s.buckets[0], 2, "0 and 1 us are <= 1 us");
        assert_eq!(s.buckets[1], 1, "1.001 us is <= 2 us");
        assert_eq!(s.buckets[3], 1, "7 us is <= 10 us");
        assert_eq!(s.buckets[DURATION_BUCKETS - 2], 1, "<= 1 s");
        assert_eq!(s.buckets[DURATION_BUCKETS - 1], 2, "beyond 1 s");
        assert_eq!(s.buckets.iter().sum::<u64>(), s.count);
    }

    #[test]
    fn sums_workers() {
        let a = WorkerStats::default();
        let b = WorkerStats::default();
        a.peer_to_tun.delivered(10);
        b.peer_to_tun.delivered(20);
        b.peer_to_tun.drop(DropReason::Empty);
        let total = WorkerSnapshot::sum(&[a.snapshot(), b.snapshot()]);
        assert_eq!(total.peer_to_tun.packets, 2);
        assert_eq!(total.peer_to_tun.bytes, 30);
        assert_eq!(total.peer_to_tun.drops_for(DropReason::Empty), 1);
    }
}
