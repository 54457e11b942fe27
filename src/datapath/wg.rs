//! WireGuard mode: a packet is sealed for its peer once the TUN side has
//! planned it (checked, routed, through the flow queues), and a datagram
//! is opened before the receive side's checks (the inner packet, the
//! peer's AllowedIPs, CoDel). The keys and sessions are the
//! [`crate::wg::Device`]'s; handshake messages go from here to the
//! runtime's control thread through it.

use super::rx::PeerCount;
use super::*;
use crate::packet::ecn;
use crate::wg::device::{Opened, Sealed, padded_len};
use crate::wg::wire::is_data_message;

/// The peer set of the worker's peer table, and room for one copy: boringtun writes its output into another buffer than its input,
/// so the packet (or datagram) is copied here and sealed (or opened) back
/// into the engine's buffer.
#[derive(Debug)]
pub(super) struct WgPath {
    pub(super) set: Arc<crate::wg::PeerSet>,
    pub(super) scratch: Vec<u8>,
}

impl Datapath {
    /// Seals the packet of `len` bytes at `at` of `read` for `peer`; the
    /// message is written from the start of `read` (whose tail room holds
    /// the tag, or a handshake initiation). A data message's outer ECN bits
    /// are the packet's ([`ecn::outer_tos`]).
    pub(super) fn seal(
        &mut self,
        peer: PeerId,
        read: &mut [u8],
        at: usize,
        len: usize,
    ) -> TunAction {
        let padded = padded_len(len, self.fwd.mtu());
        let Some(wg) = &mut self.wg else {
            return TunAction::Dropped;
        };
        let tos = ecn::outer_tos(&read[at..at + len]);
        wg.scratch[..len].copy_from_slice(&read[at..at + len]);
        wg.scratch[len..padded].fill(0);
        let sealed = wg.set.seal(peer, &wg.scratch[..padded], read);
        let tos = if is_data_message(read) { tos } else { 0 };
        self.sealed(peer, sealed, TxBuf::Read, 1, tos)
    }

    /// Seals the segments `g` of a super-packet (headers in `split`,
    /// payloads in `read`) for `peer`, each padded, into `split`: one UDP
    /// GSO send of equal-size messages, whose outer ECN bits are the
    /// super-packet's (its segments share its IP header's).
    pub(super) fn seal_segments(
        &mut self,
        peer: PeerId,
        g: offload::GatherSegments,
        read: &[u8],
        split: &mut [u8],
    ) -> TunAction {
        let mtu = self.fwd.mtu();
        let Some(wg) = &mut self.wg else {
            return TunAction::Dropped;
        };
        // Full segments are all seg_len long, so all pad to one size.
        let stride = padded_len(g.seg_len(), mtu);
        let tos = ecn::outer_tos(&split[g.headers(0)]);
        let mut end = 0;
        for i in 0..g.count {
            let (h, p) = (g.headers(i), g.payload(i));
            let plain = &mut wg.scratch[i * stride..];
            plain[..h.len()].copy_from_slice(&split[h.clone()]);
            plain[h.len()..h.len() + p.len()]
                .copy_from_slice(&read[READ_PAYLOAD_OFFSET + p.start..READ_PAYLOAD_OFFSET + p.end]);
            let len = h.len() + p.len();
            let padded = padded_len(len, mtu);
            plain[len..padded].fill(0);
            end = i * stride + padded;
        }
        let sealed = wg
            .set
            .seal_segments(peer, &wg.scratch[..end], stride, split);
        let tos = if is_data_message(split) { tos } else { 0 };
        self.sealed(peer, sealed, TxBuf::Split, g.count, tos)
    }

    /// What sealing gave, as a plan for the datagrams in `buf` with outer
    /// TOS byte `tos`; `packets` were sealed (or wait for a handshake).
    fn sealed(
        &self,
        peer: PeerId,
        sealed: Sealed,
        buf: TxBuf,
        packets: usize,
        tos: u8,
    ) -> TunAction {
        let plan = |end: usize, seg: usize, dest| {
            TunAction::Send(TxPlan {
                buf,
                dest,
                peer,
                start: 0,
                end,
                seg: seg.max(1),
                sent: 0,
                tos,
            })
        };
        match sealed {
            Sealed::Datagrams { len, seg, to } => plan(len, seg, to),
            // A data message, or an initiation the packets wait behind.
            Sealed::Datagram { len, to } => {
                if packets > 1 {
                    self.stats.wg_waiting.add(packets as u64);
                }
                plan(len, len, to)
            }
            Sealed::Queued => {
                self.stats.wg_waiting.add(packets as u64);
                TunAction::Dropped
            }
            Sealed::Dropped(r) => {
                for _ in 0..packets {
                    self.stats.tun_to_peer.drop(r);
                }
                if self.peers.per_peer {
                    self.peer_counters(peer).drop(r);
                }
                TunAction::Dropped
            }
        }
    }

    /// A receive from `src` (`rx`, in `buf`) at `now_ns`: each datagram
    /// (one, or with UDP GRO several) is opened where it lies, under one
    /// lock of its peer for the whole batch, and its packet checked like
    /// any other (valid, within the MTU, its source in the AllowedIPs of the
    /// peer whose key opened it, CoDel) and given the outer header's ECN
    /// bits ([`ecn::decapsulate`]); without offload the packet is
    /// written as it is, with offload the coalescer joins consecutive TCP
    /// segments. A handshake message goes to the control thread.
    pub(super) fn receive_wg(
        &mut self,
        rx: &Received,
        src: SocketAddr,
        buf: &mut [u8],
        coalescer: &mut Coalescer,
        now_ns: u64,
    ) -> RxAction {
        let Some(wg) = &mut self.wg else {
            return RxAction::Dropped;
        };
        if rx.payload.is_empty() {
            self.stats.peer_to_tun.drop(DropReason::WgBadMessage);
            return RxAction::Dropped;
        }
        let set = wg.set.clone();
        let mut scratch = std::mem::take(&mut wg.scratch);
        let end = rx.payload.end;
        let seg = match (self.offload, rx.gro_size) {
            (true, Some(g)) => g.max(1),
            _ => rx.payload.len().max(1),
        };
        if self.offload {
            coalescer.clear();
            if seg < rx.payload.len() {
                self.stats.gro_receives.add(1);
                self.stats
                    .gro_datagrams
                    .add(rx.payload.len().div_ceil(seg) as u64);
            }
        }
        let datagrams = rx
            .payload
            .clone()
            .step_by(seg)
            .map(|at| at..(at + seg).min(end));
        let mut single = None;
        set.open_batch(src, datagrams, buf, &mut scratch, |buf, d, opened| {
            let Some((peer, pkt)) = self.accept_opened(rx, buf, d.start, opened, now_ns) else {
                return;
            };
            if !self.offload {
                self.count_accepted(peer, pkt.len(), now_ns);
                single = Some(pkt);
            } else if coalescer.push(buf, pkt.clone()).is_err() {
                self.stats.peer_to_tun.drop(DropReason::BadChecksum);
                if self.peers.per_peer {
                    self.peer_counters(peer).drop(DropReason::BadChecksum);
                }
            } else {
                self.count_accepted(peer, pkt.len(), now_ns);
            }
        });
        if let Some(wg) = &mut self.wg {
            wg.scratch = scratch;
        }
        match single {
            Some(pkt) => RxAction::Write(pkt),
            None if self.offload && !coalescer.finish(buf).is_empty() => RxAction::Coalesced,
            None => RxAction::Dropped,
        }
    }

    /// A packet of `len` bytes from `peer` was accepted.
    fn count_accepted(&self, peer: PeerId, len: usize, now_ns: u64) {
        if self.peers.per_peer {
            let c = self.peer_counters(peer);
            c.last_rx_ns.record(now_ns);
            PeerCount(Some(c)).accepted(len);
        }
    }

    /// What opening a datagram at `at` of `buf` gave: the peer and its
    /// packet's bytes if the packet is accepted; otherwise None, counted
    /// (a drop, a keepalive, a handshake message).
    fn accept_opened(
        &mut self,
        rx: &Received,
        buf: &mut [u8],
        at: usize,
        opened: Opened,
        now_ns: u64,
    ) -> Option<(PeerId, Range<usize>)> {
        let stats = &self.stats;
        let (peer, len) = match opened {
            Opened::Packet { peer, len } => (peer, len),
            Opened::Keepalive { peer } => {
                stats.wg_keepalives.add(1);
                if self.peers.per_peer {
                    self.peer_counters(peer).last_rx_ns.record(now_ns);
                }
                return None;
            }
            Opened::Handshake => {
                stats.wg_handshake_messages.add(1);
                return None;
            }
            Opened::Dropped(r) => {
                stats.peer_to_tun.drop(r);
                return None;
            }
        };
        let pkt = at..at + len;
        let mut verdict = self.fwd.check_opened(peer, &buf[pkt.clone()]);
        let outer_ce = match (verdict, rx.tos) {
            (Ok(()), Some(outer)) => ecn::decapsulate(outer, &mut buf[pkt.clone()]),
            _ => false,
        };
        if outer_ce {
            self.stats.wg_outer_ce.add(1);
        }
        // CoDel's signal (a CE mark, or a drop) goes to an accepted packet.
        if verdict.is_ok() {
            if self.aqm_signal(rx, now_ns) {
                self.rx.aqm_pending = true;
            }
            if !Self::aqm_apply(&mut self.rx.aqm_pending, &self.stats, &mut buf[pkt.clone()]) {
                verdict = Err(DropReason::Aqm);
            }
        }
        match verdict {
            Ok(()) => Some((peer, pkt)),
            Err(r) => {
                // (aqm_apply counted its own drop.)
                if r != DropReason::Aqm {
                    self.stats.peer_to_tun.drop(r);
                }
                if self.peers.per_peer {
                    let c = self.peer_counters(peer);
                    c.last_rx_ns.record(now_ns);
                    c.drop(r);
                }
                None
            }
        }
    }
}
