//! Active queue management: CoDel (RFC 8289) over the time packets spent
//! queued before tunfwd took them. Pure code with the clock passed in.
//!
//! Where the queue is: a TCP stream through the tunnel grows its window
//! until something signals congestion. Nothing in the kernel does on this
//! path (the TUN device never stops its queue, no qdisc holds anything), so
//! with socket buffers large enough not to drop bursts the window fills
//! them, and every packet behind it (a ping, an ACK, a game's update) waits
//! for milliseconds. The receive buffer of the far forwarder's UDP socket is
//! that queue when the far side is the slower one. The kernel stamps each
//! datagram when it arrives (`SO_TIMESTAMPNS`); tunfwd reads it with the
//! datagram, so the sojourn time in that buffer is known exactly.
//!
//! CoDel lets bursts through (a queue that drains within `interval` is
//! fine) and acts on a standing queue: once every packet for `interval` has
//! waited longer than `target`, it signals one packet, then the next after
//! `interval / sqrt(count)`, until the sojourn time falls below `target`.
//! A signal is a CE mark on an ECN-capable packet (RFC 3168; no loss at
//! all), or a drop otherwise (one retransmit: far fewer than a full buffer
//! would have cost).

use std::time::Duration;

/// CoDel's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodelParams {
    /// Acceptable standing queue delay.
    pub target: Duration,
    /// How long the delay must stay above `target` before acting; about
    /// the worst-case round trip the tunnel's flows see.
    pub interval: Duration,
}

impl Default for CodelParams {
    /// RFC 8289 suggests 5 ms / 100 ms for the Internet. A tunnel on one
    /// host or a LAN has round trips of tens of microseconds, where 5 ms
    /// is already a hundred round trips of queue: tunfwd defaults to
    /// 500 us / 10 ms (README, Performance, for the measurements).
    fn default() -> Self {
        CodelParams {
            target: Duration::from_micros(500),
            interval: Duration::from_millis(10),
        }
    }
}

/// The CoDel state of one queue. Call [`Codel::on_dequeue`] for every
/// packet as it leaves the queue, in order.
#[derive(Clone, Debug)]
pub struct Codel {
    target_ns: u64,
    interval_ns: u64,
    /// When the sojourn time first stayed above target, plus interval.
    first_above_ns: Option<u64>,
    /// In the dropping state: signal at `drop_next_ns`.
    dropping: bool,
    drop_next_ns: u64,
    /// Signals in this dropping state, and in the last one.
    count: u32,
    last_count: u32,
    /// When the last packet left: a gap of a whole interval means the
    /// queue was empty in between.
    last_dequeue_ns: Option<u64>,
}

impl Codel {
    pub fn new(p: CodelParams) -> Codel {
        Codel {
            target_ns: p.target.as_nanos() as u64,
            interval_ns: (p.interval.as_nanos() as u64).max(1),
            first_above_ns: None,
            dropping: false,
            drop_next_ns: 0,
            count: 0,
            last_count: 0,
            last_dequeue_ns: None,
        }
    }

    /// The next signal time: `t + interval / sqrt(count)`.
    fn control_law(&self, t: u64) -> u64 {
        t + (self.interval_ns as f64 / f64::from(self.count.max(1)).sqrt()) as u64
    }

    /// RFC 8289's `dodequeue`: true if the sojourn time has stayed above
    /// target for at least an interval.
    fn ok_to_signal(&mut self, now_ns: u64, sojourn_ns: u64) -> bool {
        if sojourn_ns < self.target_ns {
            self.first_above_ns = None;
            return false;
        }
        match self.first_above_ns {
            None => {
                self.first_above_ns = Some(now_ns + self.interval_ns);
                false
            }
            Some(t) => now_ns >= t,
        }
    }

    /// A packet leaves the queue at `now_ns` after waiting `sojourn_ns`:
    /// true if it is to be signalled (CE-marked, or dropped if it cannot
    /// carry a mark). One decision per packet, in order.
    pub fn on_dequeue(&mut self, now_ns: u64, sojourn_ns: u64) -> bool {
        // RFC 8289 resets when the queue runs empty. tunfwd drains its
        // queue promptly, so no packet for a whole interval means it was
        // empty: the packet now starts a fresh episode.
        if self
            .last_dequeue_ns
            .is_some_and(|t| now_ns.saturating_sub(t) > self.interval_ns)
        {
            self.first_above_ns = None;
            self.dropping = false;
        }
        self.last_dequeue_ns = Some(now_ns);
        let ok = self.ok_to_signal(now_ns, sojourn_ns);
        if self.dropping {
            if !ok {
                self.dropping = false;
                return false;
            }
            if now_ns >= self.drop_next_ns {
                self.count += 1;
                self.drop_next_ns = self.control_law(self.drop_next_ns);
                return true;
            }
            return false;
        }
        if !ok {
            return false;
        }
        // Enter the dropping state; if it was left recently, resume near
        // the rate it had (RFC 8289 section 5.6).
        self.dropping = true;
        let delta = self.count.saturating_sub(self.last_count);
        self.count =
            if delta > 1 && now_ns.saturating_sub(self.drop_next_ns) < 16 * self.interval_ns {
                delta
            } else {
                1
            };
        self.drop_next_ns = self.control_law(now_ns);
        self.last_count = self.count;
        true
    }
}

/// True if `pkt` is a TCP segment without payload (a SYN, FIN or pure ACK
/// of any ECN-capable flow is Not-ECT, RFC 3168 section 6.1.4).
pub fn is_tcp_without_data(pkt: &[u8]) -> bool {
    let (l4, total, proto) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => (
            usize::from(pkt[0] & 0x0f) * 4,
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]])),
            pkt[9],
        ),
        Some(6) if pkt.len() >= 40 => (
            40,
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
            pkt[6],
        ),
        _ => return false,
    };
    if proto != crate::packet::ip::PROTO_TCP {
        return false;
    }
    match pkt.get(l4 + 12) {
        Some(off) => total <= l4 + usize::from(off >> 4) * 4,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn codel() -> Codel {
        Codel::new(CodelParams {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        })
    }

    #[test]
    fn bursts_below_interval_pass() {
        let mut c = codel();
        // 90 ms of a queue above target, then it drains: never signalled.
        for t in 0..90 {
            assert!(!c.on_dequeue(t * MS, 20 * MS));
        }
        assert!(!c.on_dequeue(90 * MS, MS));
        for t in 91..180 {
            assert!(
                !c.on_dequeue(t * MS, 20 * MS),
                "a new burst starts its own interval"
            );
        }
    }

    #[test]
    fn sparse_packets_are_never_signalled() {
        let mut c = codel();
        // One packet every 150 ms (longer than the interval), each above
        // target: the queue was empty in between, so none is signalled.
        for i in 0..50 {
            assert!(!c.on_dequeue(i * 150 * MS, 20 * MS), "packet {i}");
        }
    }

    #[test]
    fn drop_schedule_follows_the_control_law() {
        let mut c = codel();
        // One packet per millisecond, each having waited 10 ms: the
        // first signal comes one interval after the queue went above
        // target, then at interval/sqrt(n) spacing (RFC 8289).
        let mut signals = Vec::new();
        for t in 0..400u64 {
            if c.on_dequeue(t * MS, 10 * MS) {
                signals.push(t);
            }
        }
        assert_eq!(signals[0], 100, "{signals:?}");
        // 100 + 100/sqrt(1) = 200, + 100/sqrt(2) = 270.7 -> 271, + 57.7 -> 329,
        // + 50 -> 379.
        assert_eq!(&signals[..5], &[100, 200, 271, 329, 379], "{signals:?}");
    }

    #[test]
    fn leaving_and_reentering_resumes_near_the_last_rate() {
        let mut c = codel();
        let mut t = 0;
        while t < 500 {
            c.on_dequeue(t * MS, 10 * MS);
            t += 1;
        }
        let count_before = c.count;
        assert!(count_before >= 4);
        // The queue drains for 5 ms, then builds again.
        for _ in 0..5 {
            assert!(!c.on_dequeue(t * MS, MS));
            t += 1;
        }
        // Re-entering: one interval of standing queue again, then a
        // signal with the count carried over (delta of the last episode).
        let mut first = None;
        for _ in 0..200 {
            if c.on_dequeue(t * MS, 10 * MS) {
                first.get_or_insert(t);
            }
            t += 1;
        }
        assert_eq!(first, Some(605));
        assert!(c.count > 1, "count resumed: {}", c.count);
    }

    fn ipv4(tos: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[1] = tos;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 0, 1]);
        p[16..20].copy_from_slice(&[198, 19, 0, 2]);
        let c = crate::packet::checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn tells_tcp_control_packets_from_data() {
        let mut ack = ipv4(0);
        ack[32] = 5 << 4; // TCP header of 20 bytes, no data
        assert!(is_tcp_without_data(&ack));
        let mut data = vec![0u8; 60];
        data[..40].copy_from_slice(&ack);
        data[2..4].copy_from_slice(&60u16.to_be_bytes());
        assert!(!is_tcp_without_data(&data));
        let mut udp = ipv4(0);
        udp[9] = 17;
        assert!(!is_tcp_without_data(&udp));
    }
}
