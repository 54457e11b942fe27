//! Visits: how much one turn to a direction may take, and its timing.

use super::*;

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
    pub(super) dir: Direction,
    pub(super) began_ns: u64,
    pub(super) packets: usize,
    pub(super) bytes: usize,
    pub(super) limits: VisitLimits,
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
    /// What each visit to a direction may take.
    pub fn visit_limits(&self) -> VisitLimits {
        self.limits
    }

    /// Starts a visit to `dir` at `now_ns` (with the current peer table).
    pub fn begin_visit(&mut self, dir: Direction, now_ns: u64) -> Visit {
        self.refresh_peers();
        Visit {
            dir,
            began_ns: now_ns,
            packets: 0,
            bytes: 0,
            limits: self.limits,
        }
    }

    /// Ends a visit at `now_ns`: one that took anything is counted with its
    /// duration.
    pub fn end_visit(&self, v: Visit, now_ns: u64) {
        if !v.took_any() {
            return;
        }
        let ns = now_ns.saturating_sub(v.began_ns);
        match v.dir {
            Direction::TunToPeer => self.stats.tun_to_peer.visits.record(ns),
            Direction::PeerToTun => self.stats.peer_to_tun.visits.record(ns),
        }
    }
}
