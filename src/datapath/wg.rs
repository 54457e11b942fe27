//! WireGuard mode: a packet is sealed for its peer once the TUN side has
//! planned it (checked, routed, through the flow queues), and a datagram
//! is opened before the receive side's checks (the inner packet, the
//! peer's AllowedIPs, CoDel). The keys and sessions are the
//! [`crate::wg::Device`]'s; handshake messages go from here to the
//! runtime's control thread through it.

use super::rx::PeerCount;
use super::*;
use crate::wg::device::{Opened, Sealed, padded_len};

/// The device, and room for one copy: boringtun writes its output into
/// another buffer than its input, so the packet (or datagram) is copied
/// here and sealed (or opened) back into the engine's buffer.
#[derive(Debug)]
pub(super) struct WgPath {
    pub(super) dev: Arc<crate::wg::Device>,
    pub(super) scratch: Vec<u8>,
}

impl Datapath {
    /// Seals the packet of `len` bytes read behind the headroom of `read`
    /// for `peer`; the message is written from the start of `read` (whose
    /// tail room holds the tag, or a handshake initiation).
    pub(super) fn seal(&mut self, peer: PeerId, read: &mut [u8], len: usize) -> TunAction {
        let head = self.read_headroom();
        let padded = padded_len(len, self.fwd.mtu());
        let Some(wg) = &mut self.wg else {
            return TunAction::Dropped;
        };
        wg.scratch[..len].copy_from_slice(&read[head..head + len]);
        wg.scratch[len..padded].fill(0);
        match wg.dev.seal(peer, &wg.scratch[..padded], read) {
            Sealed::Datagram { len: n, to } => TunAction::Send(TxPlan {
                buf: TxBuf::Read,
                dest: to,
                peer,
                start: 0,
                end: n,
                seg: n.max(1),
                sent: 0,
            }),
            Sealed::Queued => {
                self.stats.wg_waiting.add(1);
                TunAction::Dropped
            }
            Sealed::Dropped(r) => {
                self.stats.tun_to_peer.drop(r);
                if self.peers.per_peer {
                    self.peer_counters(peer).drop(r);
                }
                TunAction::Dropped
            }
        }
    }

    /// Opens a datagram from `src` (`rx`, in `buf`) at `now_ns`: a data
    /// message's packet is checked like any other (valid, within the MTU,
    /// its source in the peer's AllowedIPs) and written from where the
    /// datagram was; a handshake message goes to the control thread.
    pub(super) fn receive_wg(
        &mut self,
        rx: &Received,
        src: SocketAddr,
        buf: &mut [u8],
        now_ns: u64,
    ) -> RxAction {
        let Some(wg) = &mut self.wg else {
            return RxAction::Dropped;
        };
        let at = rx.payload.start;
        let n = rx.payload.len();
        wg.scratch[..n].copy_from_slice(&buf[rx.payload.clone()]);
        let opened = wg.dev.open(src, &wg.scratch[..n], &mut buf[at..]);
        let stats = &self.stats;
        let (peer, len) = match opened {
            Opened::Packet { peer, len } => (peer, len),
            Opened::Keepalive { peer } => {
                stats.wg_keepalives.add(1);
                if self.peers.per_peer {
                    self.peer_counters(peer).last_rx_ns.record(now_ns);
                }
                return RxAction::Dropped;
            }
            Opened::Handshake => {
                stats.wg_handshake_messages.add(1);
                return RxAction::Dropped;
            }
            Opened::Dropped(r) => {
                stats.peer_to_tun.drop(r);
                return RxAction::Dropped;
            }
        };
        let pkt = at..at + len;
        let mut verdict = self.fwd.check_opened(peer, &buf[pkt.clone()]);
        // CoDel's signal (a CE mark, or a drop) goes to an accepted packet.
        if verdict.is_ok() {
            if self.aqm_signal(rx, now_ns) {
                self.rx.aqm_pending = true;
            }
            if !Self::aqm_apply(&mut self.rx.aqm_pending, &self.stats, &mut buf[pkt.clone()]) {
                verdict = Err(DropReason::Aqm);
            }
        }
        let count = PeerCount(self.peers.per_peer.then(|| {
            let c = self.fwd.peers().peer(peer).stats.worker(self.fwd.queue());
            c.last_rx_ns.record(now_ns);
            c
        }));
        match verdict {
            Ok(()) => {
                count.accepted(len);
                RxAction::Write(pkt)
            }
            Err(r) => {
                // (aqm_apply counted its own drop.)
                if r != DropReason::Aqm {
                    self.stats.peer_to_tun.drop(r);
                }
                count.dropped(r);
                RxAction::Dropped
            }
        }
    }
}
