//! Flow queueing with CoDel (RFC 8290, "FQ-CoDel") for packets read from
//! the TUN device, before they are split and sent. Pure code: the clock is
//! passed in, packets are named by the engine's buffer numbers, and nothing
//! allocates after [`FlowQueues::new`].
//!
//! # Why here
//! The kernel's TUN device never stops its transmit queue and its ring is
//! FIFO: a ping read behind a TCP stream's super-packets waits for all of
//! them, and no AQM acts on that queue. tunfwd reads the device promptly
//! (the ring only absorbs bursts) into its own buffers and keeps the
//! standing queue here, where it is managed:
//! - **Per-flow queues**: a packet goes to one of [`FLOWS`] queues by a
//!   keyed hash of its inner 5-tuple (the engine's caller computes it).
//! - **Deficit round robin with priority for sparse flows**: a flow that
//!   had nothing queued starts on the new-flows list and is served before
//!   the old ones, with a quantum of bytes; so a ping, a DNS query or a
//!   TCP ACK leaves ahead of a bulk flow's backlog. A flow that empties on
//!   the new list moves to the old one (RFC 8290 section 4.2), so no flow
//!   keeps the priority by sending just often enough.
//! - **Byte accounting**: a super-packet (up to 64 KiB with offload) costs
//!   its bytes from its flow's deficit, not one packet.
//! - **CoDel per flow** ([`crate::aqm::Codel`], RFC 8289) on the time a
//!   packet waited (the caller says since when: a TUN read since it was
//!   read, a receive since it arrived in the socket). A signal is carried
//!   by the first packet of the flow that can carry one: a TCP segment
//!   without data (an ECN-capable flow's SYN, FIN, ACK, all Not-ECT)
//!   passes, and so does a packet served from the new flows (a sparse
//!   flow's: its wait, if any, was behind other flows in the kernel's FIFO
//!   queue, not behind its own backlog); the signal waits for the flow's
//!   next packet that can carry it. The caller marks it CE if it is
//!   ECN-capable, else drops it.
//! - **Overload**: when the engine has no free buffer for the next read
//!   and the datapath finds the TUN device's ring overflowing,
//!   [`FlowQueues::drop_fattest`] drops the head of the flow with the most
//!   bytes queued (RFC 8290 section 4.1), before any work is spent on
//!   splitting or sending it.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use crate::aqm::{Codel, CodelParams};

/// Flow queues (buckets of the hash), as RFC 8290 suggests.
pub const FLOWS: usize = 1024;
/// Bytes a flow may send per round: one Ethernet-sized packet (RFC 8290's
/// default, the MTU plus 14).
pub const QUANTUM: i64 = 1514;

const NONE: u32 = u32::MAX;

/// One packet as the queue knows it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The next packet of the same flow.
    next: u32,
    /// It can carry a signal (a mark or its loss): false for a TCP segment
    /// without data.
    can_signal: bool,
    bytes: u32,
    enqueued_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum List {
    None,
    New,
    Old,
}

#[derive(Clone, Debug)]
struct Flow {
    head: u32,
    tail: u32,
    packets: u32,
    bytes: u64,
    deficit: i64,
    list: List,
    codel: Codel,
    /// CoDel asked for a signal that the packet could not carry.
    pending: bool,
}

/// A packet leaving the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dequeued {
    /// The buffer it is in.
    pub id: u32,
    /// Its bytes, as enqueued.
    pub bytes: usize,
    /// How long it was queued.
    pub sojourn_ns: u64,
    /// CoDel signals congestion with it: mark it CE if it is ECN-capable,
    /// else drop it.
    pub signal: bool,
}

/// The flow queues of one worker.
#[derive(Debug)]
pub struct FlowQueues {
    entries: Vec<Entry>,
    flows: Vec<Flow>,
    new_flows: VecDeque<u16>,
    old_flows: VecDeque<u16>,
    packets: usize,
    bytes: u64,
}

impl FlowQueues {
    /// Queues for packets in buffers `0..buffers` (each buffer holds at
    /// most one queued packet), with CoDel `params` per flow.
    pub fn new(buffers: usize, params: CodelParams) -> FlowQueues {
        let e = Entry {
            next: NONE,
            can_signal: true,
            bytes: 0,
            enqueued_ns: 0,
        };
        let f = Flow {
            head: NONE,
            tail: NONE,
            packets: 0,
            bytes: 0,
            deficit: 0,
            list: List::None,
            codel: Codel::new(params),
            pending: false,
        };
        FlowQueues {
            entries: vec![e; buffers],
            flows: vec![f; FLOWS],
            new_flows: VecDeque::with_capacity(FLOWS),
            old_flows: VecDeque::with_capacity(FLOWS),
            packets: 0,
            bytes: 0,
        }
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.packets
    }

    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Bytes queued.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Queues the packet in buffer `id` (which must not be queued already,
    /// and be below the `buffers` given to [`FlowQueues::new`]): `bytes`
    /// long, of the flow with `hash`, arrived at `now_ns`.
    pub fn enqueue(&mut self, id: u32, hash: u32, bytes: usize, can_signal: bool, now_ns: u64) {
        let fi = (hash as usize % FLOWS) as u16;
        self.entries[id as usize] = Entry {
            next: NONE,
            can_signal,
            bytes: bytes.min(u32::MAX as usize) as u32,
            enqueued_ns: now_ns,
        };
        let f = &mut self.flows[usize::from(fi)];
        if f.tail == NONE {
            f.head = id;
        } else {
            self.entries[f.tail as usize].next = id;
        }
        f.tail = id;
        f.packets += 1;
        f.bytes += bytes as u64;
        if f.list == List::None {
            f.list = List::New;
            f.deficit = QUANTUM;
            self.new_flows.push_back(fi);
        }
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// Takes the head packet of flow `fi`, which must have one.
    fn pop(&mut self, fi: u16) -> (u32, Entry) {
        let f = &mut self.flows[usize::from(fi)];
        let id = f.head;
        let e = self.entries[id as usize];
        f.head = e.next;
        if f.head == NONE {
            f.tail = NONE;
        }
        f.packets -= 1;
        f.bytes -= u64::from(e.bytes);
        self.packets -= 1;
        self.bytes -= u64::from(e.bytes);
        (id, e)
    }

    /// The next packet to send at `now_ns`, by deficit round robin (new
    /// flows first) with CoDel's verdict; None if nothing is queued.
    pub fn dequeue(&mut self, now_ns: u64) -> Option<Dequeued> {
        loop {
            let (fi, from_new) = match self.new_flows.front() {
                Some(&fi) => (fi, true),
                None => (*self.old_flows.front()?, false),
            };
            let f = &mut self.flows[usize::from(fi)];
            if f.deficit <= 0 {
                // Its round is used up: one more quantum, to the back of
                // the old flows (a super-packet's debt takes several
                // rounds, during which the other flows are served).
                f.deficit += QUANTUM;
                f.list = List::Old;
                self.unlink_front(from_new);
                self.old_flows.push_back(fi);
                continue;
            }
            if f.head == NONE {
                // Empty: a new flow becomes old (if there are old ones to
                // take turns with); an old one leaves the lists.
                self.unlink_front(from_new);
                let f = &mut self.flows[usize::from(fi)];
                if from_new && !self.old_flows.is_empty() {
                    f.list = List::Old;
                    self.old_flows.push_back(fi);
                } else {
                    f.list = List::None;
                }
                continue;
            }
            let (id, e) = self.pop(fi);
            let f = &mut self.flows[usize::from(fi)];
            f.deficit -= i64::from(e.bytes);
            let sojourn_ns = now_ns.saturating_sub(e.enqueued_ns);
            if f.codel.on_dequeue(now_ns, sojourn_ns) {
                f.pending = true;
            }
            // A packet served from the new flows was not queued behind its
            // own flow's backlog: any wait it had was behind other flows
            // (in the kernel's FIFO queue before tunfwd read it, which is
            // part of the sojourn time of a receive), so it carries no
            // signal; the flow's next packet from the old flows does.
            let signal = f.pending && e.can_signal && !from_new;
            if signal {
                f.pending = false;
            }
            return Some(Dequeued {
                id,
                bytes: e.bytes as usize,
                sojourn_ns,
                signal,
            });
        }
    }

    fn unlink_front(&mut self, from_new: bool) {
        if from_new {
            self.new_flows.pop_front();
        } else {
            self.old_flows.pop_front();
        }
    }

    /// Overload: drops the head packet of the flow with the most bytes
    /// queued and returns its buffer; None if nothing is queued. The flow
    /// keeps its place in the round.
    pub fn drop_fattest(&mut self) -> Option<u32> {
        let fattest = self
            .new_flows
            .iter()
            .chain(self.old_flows.iter())
            .copied()
            .filter(|&fi| self.flows[usize::from(fi)].head != NONE)
            .max_by_key(|&fi| self.flows[usize::from(fi)].bytes)?;
        Some(self.pop(fattest).0)
    }
}

/// The flow of an IP packet for [`FlowQueues::enqueue`]: a keyed hash
/// (`keys`, random per worker, so nobody can aim packets at one queue) of
/// its addresses, protocol and, for TCP, UDP, UDP-Lite and SCTP (not in a
/// later fragment), ports. Anything else hashes what it has.
pub fn flow_hash<H: BuildHasher>(keys: &H, pkt: &[u8]) -> u32 {
    let (proto, addrs, l4) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let later_fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0;
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            (
                pkt[9],
                &pkt[12..20],
                if later_fragment { None } else { Some(ihl) },
            )
        }
        Some(6) if pkt.len() >= 40 => (pkt[6], &pkt[8..40], Some(40)),
        _ => return keys.hash_one(pkt.get(..pkt.len().min(40))) as u32,
    };
    let ports = match (proto, l4) {
        (6 | 17 | 132 | 136, Some(at)) => pkt.get(at..at + 4),
        _ => None,
    };
    keys.hash_one((proto, addrs, ports)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    fn params() -> CodelParams {
        CodelParams {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }

    /// Buffer ids taken from a free list, as an engine would.
    struct Harness {
        q: FlowQueues,
        free: Vec<u32>,
    }

    impl Harness {
        fn new(buffers: usize) -> Harness {
            Harness {
                q: FlowQueues::new(buffers, params()),
                free: (0..buffers as u32).rev().collect(),
            }
        }

        fn push(&mut self, hash: u32, bytes: usize, now: u64) -> u32 {
            let id = self.free.pop().expect("a free buffer");
            self.q.enqueue(id, hash, bytes, true, now);
            id
        }

        fn pop(&mut self, now: u64) -> Option<Dequeued> {
            let d = self.q.dequeue(now)?;
            self.free.push(d.id);
            Some(d)
        }
    }

    #[test]
    fn one_flow_is_fifo_and_accounts_bytes() {
        let mut h = Harness::new(8);
        let ids: Vec<u32> = (0..5).map(|i| h.push(7, 100 + i, 0)).collect();
        assert_eq!(h.q.len(), 5);
        assert_eq!(h.q.bytes(), 100 + 101 + 102 + 103 + 104);
        let out: Vec<u32> = std::iter::from_fn(|| h.pop(1).map(|d| d.id)).collect();
        assert_eq!(out, ids);
        assert!(h.q.is_empty());
        assert_eq!(h.q.bytes(), 0);
    }

    #[test]
    fn a_sparse_flow_leaves_before_a_bulk_backlog() {
        let mut h = Harness::new(64);
        // A bulk flow's backlog of 40 super-packets, being served.
        for _ in 0..40 {
            h.push(1, 65_000, 0);
        }
        assert_eq!(h.pop(0).map(|d| d.bytes), Some(65_000));
        // A ping arrives behind it: it is next.
        let ping = h.push(2, 84, 10);
        assert_eq!(h.pop(20).map(|d| d.id), Some(ping));
        // And the next ping too, after some more bulk.
        h.pop(30);
        let ping2 = h.push(2, 84, 40);
        assert_eq!(h.pop(50).map(|d| d.id), Some(ping2));
    }

    #[test]
    fn super_packets_cost_their_bytes_in_the_round() {
        let mut h = Harness::new(128);
        // Flow A sends 64 KiB super-packets, flow B 1500-byte packets,
        // both backlogged: over many rounds each gets about the same bytes.
        for _ in 0..20 {
            h.push(1, 65_536, 0);
        }
        for _ in 0..100 {
            h.push(2, 1500, 0);
        }
        let (mut a, mut b) = (0usize, 0usize);
        // Serve until B has sent 90 packets (135,000 bytes).
        let mut b_packets = 0;
        while b_packets < 90 {
            let d = h.pop(1).expect("packets queued");
            if d.bytes == 65_536 {
                a += d.bytes;
            } else {
                b += d.bytes;
                b_packets += 1;
                h.push(2, 1500, 1);
            }
            if d.bytes == 65_536 {
                h.push(1, 65_536, 1);
            }
        }
        // A got at most one super-packet more than its fair share: with
        // 1,514 bytes of quantum a round, one 64 KiB super-packet takes 44
        // rounds to pay for, so in B's 90 rounds A sent exactly three
        // (rounds 0, 43 and 87).
        assert_eq!(a, 3 * 65_536, "b {b}");
        assert!(a <= b + 65_536, "a {a} b {b}");
        assert!(a + 65_536 >= b, "a {a} b {b}");
    }

    #[test]
    fn codel_signals_a_standing_queue_per_flow_and_spares_the_others() {
        let mut h = Harness::new(16);
        // Flow 1 keeps 10 packets queued, each waiting 10 ms; flow 2
        // sends one packet per ms that leaves at once.
        // The clock starts at 1 s (sojourns are computed backwards).
        let base = 1000 * MS;
        let mut t = base;
        for _ in 0..10 {
            h.push(1, 1000, t);
        }
        let mut signals_bulk = Vec::new();
        let mut signals_sparse = 0;
        while t < base + 400 * MS {
            t += MS;
            h.push(2, 100, t);
            // The bulk flow's packet at the head arrived 10 ms ago.
            while let Some(d) = h.pop(t) {
                if d.bytes == 1000 {
                    if d.signal {
                        signals_bulk.push((t - base) / MS);
                    }
                    h.push(1, 1000, t - 10 * MS);
                    break;
                }
                signals_sparse += usize::from(d.signal);
            }
        }
        assert_eq!(signals_sparse, 0);
        // The first four bulk packets waited 1-4 ms (below target); from
        // 5 ms on every one waited 10 ms: the first signal comes an
        // interval later (105), then at interval/sqrt(n) from the last
        // scheduled time (RFC 8289): 205, 275.7, 333.4, 383.4.
        assert_eq!(
            &signals_bulk[..5],
            &[105, 205, 276, 334, 384],
            "{signals_bulk:?}"
        );
    }

    #[test]
    fn a_signal_waits_for_a_packet_that_can_carry_it() {
        let mut q = FlowQueues::new(4, params());
        let mut t = 0;
        let mut id_free = vec![3u32, 2, 1, 0];
        // A flow whose packets wait 10 ms, alternating data and pure ACKs
        // (which cannot carry a signal).
        let mut carried_by = Vec::new();
        for i in 0..400u64 {
            t += MS;
            let id = id_free.pop().unwrap();
            let data = i % 2 == 0;
            q.enqueue(id, 5, 100, data, t.saturating_sub(10 * MS));
            let d = q.dequeue(t).unwrap();
            id_free.push(d.id);
            if d.signal {
                carried_by.push(data);
            }
        }
        assert!(!carried_by.is_empty());
        assert!(carried_by.iter().all(|&data| data), "{carried_by:?}");
    }

    #[test]
    fn overload_drops_from_the_fattest_flow_only() {
        let mut h = Harness::new(32);
        for _ in 0..20 {
            h.push(1, 1400, 0);
        }
        // The bulk flow used its first round (two packets of its quantum).
        h.pop(0);
        h.pop(0);
        let ping = h.push(2, 84, 0);
        let first_bulk = h.q.flows[1].head;
        assert_eq!(h.q.drop_fattest(), Some(first_bulk));
        assert_eq!(h.q.len(), 18);
        // The ping is still there and leaves first.
        assert_eq!(h.pop(1).map(|d| d.id), Some(ping));
        while h.q.drop_fattest().is_some() {}
        assert!(h.q.is_empty());
        assert_eq!(h.q.bytes(), 0);
        assert_eq!(h.q.dequeue(2), None);
    }

    #[test]
    fn flows_leave_the_lists_when_empty_and_come_back_as_new() {
        let mut h = Harness::new(8);
        h.push(1, 100, 0);
        h.pop(0);
        assert_eq!(h.q.dequeue(0), None);
        assert!(h.q.new_flows.is_empty() && h.q.old_flows.is_empty());
        h.push(1, 100, 1);
        assert_eq!(h.q.new_flows.len(), 1);
    }

    #[test]
    fn flows_are_told_apart_by_their_five_tuple() {
        let keys = std::collections::hash_map::RandomState::new();
        let mut a = vec![0u8; 40];
        a[0] = 0x45;
        a[9] = 6;
        a[12..16].copy_from_slice(&[198, 19, 0, 1]);
        a[16..20].copy_from_slice(&[198, 19, 0, 2]);
        a[20..24].copy_from_slice(&[0x13, 0x88, 0xc0, 0x00]);
        let mut same_flow = a.clone();
        same_flow[30] = 0xff; // another sequence number
        let mut other_port = a.clone();
        other_port[23] = 1;
        assert_eq!(flow_hash(&keys, &a), flow_hash(&keys, &same_flow));
        assert_ne!(flow_hash(&keys, &a), flow_hash(&keys, &other_port));
        // Garbage and short packets hash too, without panicking.
        for len in 0..45 {
            flow_hash(&keys, &a[..len.min(40)]);
        }
        flow_hash(&keys, &[0x60; 39]);
    }

    #[test]
    fn a_sparse_flow_is_not_signalled_for_waiting_behind_others() {
        let mut h = Harness::new(8);
        // Every packet of a sparse flow waited 10 ms before tunfwd read it
        // (in the kernel's FIFO queue, behind other flows), for 400 ms:
        // served from the new flows, none is signalled.
        for t in 0..400u64 {
            let now = (1000 + t) * MS;
            h.push(3, 100, now - 10 * MS);
            let d = h.pop(now).expect("queued");
            assert!(!d.signal, "signalled at {t} ms");
            // The engine asks until the queues are empty (which takes the
            // emptied flow off the lists).
            assert_eq!(h.pop(now), None);
        }
    }
}
