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

/// How a declared counter is kept and reported.
pub trait Cell: Default {
    /// The Prometheus type: `counter` or `gauge`.
    const KIND: &'static str;
    fn value(&self) -> u64;
    /// Two workers' values as one (the sum; the larger for a [`Max`]).
    fn merge(a: u64, b: u64) -> u64 {
        a + b
    }
}

impl Cell for Counter {
    const KIND: &'static str = "counter";
    fn value(&self) -> u64 {
        self.get()
    }
}

impl Cell for Gauge {
    const KIND: &'static str = "gauge";
    fn value(&self) -> u64 {
        self.get()
    }
}

impl Cell for Max {
    const KIND: &'static str = "gauge";
    fn value(&self) -> u64 {
        self.get()
    }
    fn merge(a: u64, b: u64) -> u64 {
        a.max(b)
    }
}

/// One declared counter of a snapshot `S`: its key in the text and JSON
/// stats, its Prometheus family and type, its help text, and how to read
/// it.
pub struct Field<S> {
    pub key: &'static str,
    pub metric: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
    pub get: fn(&S) -> u64,
}

/// Declares a set of counters once: the live struct (one cell per
/// counter, plus `$extra` fields), its plain snapshot, `snapshot()`, the
/// merge of two snapshots, and the table [`Field`]s that the text and
/// JSON stats and the Prometheus output are made from. Adding a counter
/// is one line here plus its increment.
macro_rules! counters {
    (
        $(#[$smeta:meta])* struct $live:ident / $(#[$snmeta:meta])* $snap:ident {
            $( $(#[doc = $xdoc:literal])* $extra:ident : $xlive:ty => $xsnap:ty, )*
        }
        $( $(#[doc = $doc:literal])* $name:ident : $cell:ty => $metric:literal, $help:literal; )*
    ) => {
        $(#[$smeta])*
        #[derive(Default, Debug)]
        pub struct $live {
            $( $(#[doc = $xdoc])* pub $extra: $xlive, )*
            $( $(#[doc = $doc])* pub $name: $cell, )*
        }

        $(#[$snmeta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $snap {
            $( pub $extra: $xsnap, )*
            $( pub $name: u64, )*
        }

        impl $snap {
            /// The declared counters, in the order they are reported.
            pub const FIELDS: &'static [Field<$snap>] = &[
                $( Field {
                    key: stringify!($name),
                    metric: $metric,
                    kind: <$cell as Cell>::KIND,
                    help: $help,
                    get: |s| s.$name,
                }, )*
            ];

            /// Adds the declared counters of `o` (the largest for a maximum).
            fn merge_fields(&mut self, o: &$snap) {
                $( self.$name = <$cell as Cell>::merge(self.$name, o.$name); )*
            }
        }

        impl $live {
            fn snapshot_fields(&self, s: &mut $snap) {
                $( s.$name = self.$name.value(); )*
            }
        }
    };
}

counters! {
    /// Counters of one direction of one worker.
    struct DirectionStats /
    /// Plain copy of [`DirectionStats`].
    DirectionSnapshot {
        /// The worker's visits to this direction: how long each took (the
        /// reads, the decisions and the sends or writes they led to), while
        /// the other direction waited.
        visits: Durations => DurationSnapshot,
        /// How long packets waited in the queue before this direction's
        /// reader took them: the UDP receive buffer, from the kernel's
        /// arrival timestamp (peer to TUN, when timestamps are on).
        queue_delay: Durations => DurationSnapshot,
        drops: [Counter; DropReason::COUNT] => [u64; DropReason::COUNT],
    }
    /// Packets delivered to the destination endpoint.
    packets: Counter => "tunfwd_packets_total",
        "Packets delivered: sent to a peer (tun_to_peer) or written to the TUN device (peer_to_tun).";
    /// Bytes of those packets (inner IP packet length).
    bytes: Counter => "tunfwd_bytes_total", "Bytes of the packets delivered.";
    /// Times the destination was full and the engine had to wait.
    backpressure: Counter => "tunfwd_backpressure_total",
        "Times the destination was full and the worker waited for room.";
    /// With flow queueing: the most packets this side's queues held at once.
    queue_max: Max => "tunfwd_queue_max_packets",
        "The most packets a side's flow queues held at once.";
    /// With flow queueing, now: packets in this side's flow queues.
    queued: Gauge => "tunfwd_queued_packets", "Packets in a side's flow queues now.";
    /// Buffers handed out by the flow queues and not yet sent (or written).
    in_flight_buffers: Gauge => "tunfwd_in_flight_buffers",
        "Buffers a side's flow queues handed out that are not yet sent (or written).";
    /// Bytes handed out by the flow queues and not yet sent (or written).
    in_flight_bytes: Gauge => "tunfwd_in_flight_bytes",
        "Bytes a side's flow queues handed out that are not yet sent (or written).";
}

impl WorkerStats {
    /// Packets delivered in both directions so far.
    #[inline]
    pub fn packets_moved(&self) -> u64 {
        self.tun_to_peer.packets.get() + self.peer_to_tun.packets.get()
    }
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
        let mut s = DirectionSnapshot {
            visits: self.visits.snapshot(),
            queue_delay: self.queue_delay.snapshot(),
            ..DirectionSnapshot::default()
        };
        for (d, c) in s.drops.iter_mut().zip(&self.drops) {
            *d = c.get();
        }
        self.snapshot_fields(&mut s);
        s
    }
}

counters! {
    /// Everything one worker counts.
    struct WorkerStats /
    /// Plain copy of [`WorkerStats`]; also used for the sum over all workers.
    WorkerSnapshot {
        /// Packets read from the TUN device and sent to the peer.
        tun_to_peer: DirectionStats => DirectionSnapshot,
        /// Datagrams received from the peer and written to the TUN device.
        peer_to_tun: DirectionStats => DirectionSnapshot,
    }
    /// System calls the engine made (poll, read, write, recv, send, ...).
    syscalls: Counter => "tunfwd_syscalls_total", "System calls the worker made.";
    /// Times the engine went to sleep waiting for events.
    waits: Counter => "tunfwd_waits_total", "Times the worker slept waiting for events.";
    /// With --wake-nice: times a worker used up its wakeup budget and
    /// dropped back to its normal priority.
    wake_lowered: Counter => "tunfwd_wake_lowered_total",
        "Times a worker dropped back from its wakeup priority after its budget.";
    /// With --spin: times a worker yielded and looked for packets again
    /// instead of sleeping.
    spin_looks: Counter => "tunfwd_spin_looks_total",
        "Times a worker looked for packets again instead of sleeping (--spin).";
    /// Socket errors that did not stop the worker (queued ICMP errors).
    io_errors: Counter => "tunfwd_io_errors_total", "Socket errors the worker went on from.";
    /// ICMP errors (port or host unreachable, ...) the kernel reported for
    /// datagrams sent to the peer: the peer is down or unreachable.
    peer_unreachable: Counter => "tunfwd_peer_unreachable_total",
        "ICMP errors the kernel reported for datagrams sent to peers.";
    /// Times a read found no free buffer in the worker's pool.
    pool_exhausted: Counter => "tunfwd_pool_exhausted_total", "Times a read found no free buffer.";
    /// UDP GSO sends and the datagrams they carried.
    gso_sends: Counter => "tunfwd_gso_sends_total", "UDP GSO sends.";
    gso_segments: Counter => "tunfwd_gso_segments_total", "Datagrams carried by UDP GSO sends.";
    /// Receives that returned GRO-coalesced datagrams, and how many.
    gro_receives: Counter => "tunfwd_gro_receives_total",
        "Receives that returned several datagrams (UDP GRO).";
    gro_datagrams: Counter => "tunfwd_gro_datagrams_total", "Datagrams in those receives.";
    /// TUN writes with a virtio-net header, and the packets they carried.
    vnet_writes: Counter => "tunfwd_vnet_writes_total",
        "TUN writes with a virtio-net header (coalesced super-packets).";
    vnet_write_packets: Counter => "tunfwd_vnet_write_packets_total",
        "Packets carried by those writes.";
    /// Packets from the peer that CoDel found in a standing queue and
    /// marked CE (ECN-capable); those it dropped count as drops (`aqm`).
    aqm_marks: Counter => "tunfwd_aqm_marks_total",
        "Packets CoDel marked CE (its drops are tunfwd_drops_total{reason=\"aqm\"}).";
    /// WireGuard: handshake messages received and handed to the control
    /// thread.
    wg_handshake_messages: Counter => "tunfwd_wg_handshake_messages_total",
        "WireGuard handshake messages received and handed to the control thread.";
    /// WireGuard: packets whose datagram arrived marked CE (congestion on
    /// the underlay), the mark carried into the packet (ECN-capable ones).
    wg_outer_ce: Counter => "tunfwd_wg_outer_ce_total",
        "WireGuard packets whose datagram arrived marked CE on the underlay; the mark was carried into the packet.";
    /// WireGuard: authenticated keepalives received.
    wg_keepalives: Counter => "tunfwd_wg_keepalives_received_total",
        "Authenticated WireGuard keepalives received.";
    /// WireGuard: packets from the device held until a handshake completes.
    wg_waiting: Counter => "tunfwd_wg_packets_awaiting_handshake_total",
        "Packets held until a WireGuard handshake completed.";
    /// WireGuard: cookie replies sent (handshakes under load).
    wg_cookie_replies: Counter => "tunfwd_wg_cookie_replies_total",
        "WireGuard cookie replies sent (handshake initiations under load).";
    /// WireGuard: datagrams the control thread sent (handshake messages,
    /// keepalives, packets that waited for a handshake).
    wg_control_sent: Counter => "tunfwd_wg_control_datagrams_total",
        "Datagrams the WireGuard control thread sent: handshake messages, keepalives, packets that waited for a handshake.";
}

impl WorkerStats {
    pub fn snapshot(&self) -> WorkerSnapshot {
        let mut s = WorkerSnapshot {
            tun_to_peer: self.tun_to_peer.snapshot(),
            peer_to_tun: self.peer_to_tun.snapshot(),
            ..WorkerSnapshot::default()
        };
        self.snapshot_fields(&mut s);
        s
    }
}

impl DirectionSnapshot {
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    fn add(&mut self, o: &DirectionSnapshot) {
        self.merge_fields(o);
        self.visits.add(&o.visits);
        self.queue_delay.add(&o.queue_delay);
        for (a, b) in self.drops.iter_mut().zip(&o.drops) {
            *a += b;
        }
    }
}

impl WorkerSnapshot {
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a WorkerSnapshot>) -> WorkerSnapshot {
        let mut total = WorkerSnapshot::default();
        for s in all {
            total.tun_to_peer.add(&s.tun_to_peer);
            total.peer_to_tun.add(&s.peer_to_tun);
            total.merge_fields(s);
        }
        total
    }

    /// Packets delivered in both directions.
    pub fn packets(&self) -> u64 {
        self.tun_to_peer.packets + self.peer_to_tun.packets
    }

    /// The ratios derived from the declared counters, as (key, value).
    fn ratios(&self) -> [(&'static str, f64); 4] {
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        [
            ("syscalls_per_packet", ratio(self.syscalls, self.packets())),
            (
                "segments_per_send",
                ratio(self.gso_segments, self.gso_sends),
            ),
            (
                "datagrams_per_receive",
                ratio(self.gro_datagrams, self.gro_receives),
            ),
            (
                "packets_per_tun_write",
                ratio(self.vnet_write_packets, self.vnet_writes),
            ),
        ]
    }

    /// CoDel's drops in both directions.
    pub fn aqm_drops(&self) -> u64 {
        self.peer_to_tun.drops_for(DropReason::Aqm) + self.tun_to_peer.drops_for(DropReason::Aqm)
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
/// `tun_to_peer packets=10 bytes=840 drops=1 backpressure=0 ... [over_mtu=1]`:
/// every declared counter, the drops by reason that counted, then the
/// visit and queue-delay figures where there were any.
fn write_direction(out: &mut String, name: &str, d: &DirectionSnapshot) {
    let _ = write!(out, "{name}");
    for (i, f) in DirectionSnapshot::FIELDS.iter().enumerate() {
        let _ = write!(out, " {}={}", f.key, (f.get)(d));
        if i == 1 {
            let _ = write!(out, " drops={}", d.dropped());
        }
    }
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
}

fn direction_json(d: &DirectionSnapshot) -> serde_json::Value {
    let mut v = serde_json::json!({
        "drops": d.dropped(),
        "drop_reasons": nonzero_drops_json(&d.drops),
        "visits": d.visits.count,
        "visit_avg_us": d.visits.avg_us(),
        "visit_max_us": d.visits.max_us(),
        "queue_delay_avg_us": d.queue_delay.avg_us(),
        "queue_delay_max_us": d.queue_delay.max_us(),
    });
    for f in DirectionSnapshot::FIELDS {
        v[f.key] = (f.get)(d).into();
    }
    v
}

impl WorkerSnapshot {
    /// The same fields as the text form, as one JSON object (every field
    /// always present; drop reasons only where they counted).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "tun_to_peer": direction_json(&self.tun_to_peer),
            "peer_to_tun": direction_json(&self.peer_to_tun),
        });
        for f in WorkerSnapshot::FIELDS {
            v[f.key] = (f.get)(self).into();
        }
        v["aqm_drops"] = self.aqm_drops().into();
        for (key, x) in self.ratios() {
            v[key] = x.into();
        }
        v
    }
}

impl fmt::Display for WorkerSnapshot {
    /// Two directions, then the worker's declared counters and what is
    /// derived from them, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(512);
        write_direction(&mut s, "tun_to_peer", &self.tun_to_peer);
        s.push_str(" | ");
        write_direction(&mut s, "peer_to_tun", &self.peer_to_tun);
        s.push_str(" |");
        for field in WorkerSnapshot::FIELDS {
            let _ = write!(s, " {}={}", field.key, (field.get)(self));
        }
        let _ = write!(s, " aqm_drops={}", self.aqm_drops());
        for (key, x) in self.ratios() {
            let _ = write!(s, " {key}={x:.2}");
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
