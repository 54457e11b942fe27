//! TUN to peer: what a read becomes (a [`TxPlan`] of datagrams, plain or
//! split from a super-packet), its sends in order ([`Datapath::next_send`])
//! and their results ([`Datapath::on_send`]); the flow queues' TUN side.

use super::*;

/// The TUN side's own state.
#[derive(Debug)]
pub(super) struct TxState {
    /// Segmented sends with UDP GSO (off once the kernel refused it).
    pub(super) gso: bool,
}

/// Which buffer a [`TxPlan`]'s datagrams are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxBuf {
    /// The buffer the TUN read landed in (headroom included).
    Read,
    /// Offload: datagram `i` is its headers in the split buffer
    /// (`g.headers(i)`) followed by its payload in the read buffer
    /// (`READ_PAYLOAD_OFFSET + g.payload(i)`): sent as a gather list, the
    /// payload never copied. See [`TxPlan::pieces`].
    Gather(offload::GatherSegments),
    /// The split buffer holds the datagrams (WireGuard: a super-packet's
    /// segments, each sealed there).
    Split,
}

/// The datagrams one TUN read became: bytes `start..end` of `buf`, cut every
/// `seg` bytes (the last datagram may be shorter), all to `dest`. `sent`
/// bytes have been dealt with (sent, or lost and counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPlan {
    pub buf: TxBuf,
    /// Where every datagram of the plan goes (one peer: the segments of a
    /// super-packet share a destination), as the socket takes it.
    pub dest: SocketAddr,
    pub(super) peer: PeerId,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) seg: usize,
    pub(super) sent: usize,
    /// The outer header's TOS byte (IPv6: traffic class): 0, but for
    /// WireGuard data messages, which carry the packet's ECN bits.
    pub(super) tos: u8,
}

impl TxPlan {
    /// Datagrams not yet sent, and their bytes.
    pub(super) fn remaining(&self) -> (u64, u64) {
        let left = self.end - (self.start + self.sent).min(self.end);
        (left.div_ceil(self.seg) as u64, left as u64)
    }

    /// True once every datagram was sent or counted as lost.
    pub fn is_done(&self) -> bool {
        self.start + self.sent >= self.end
    }

    /// Datagrams in the plan.
    pub fn datagrams(&self) -> usize {
        (self.end - self.start).div_ceil(self.seg)
    }

    /// A gather plan's pieces of `send`, in order, one pair per datagram:
    /// its headers (a range of the split buffer) and its payload (a range
    /// of the read buffer). Empty for a plan that is one contiguous range.
    pub fn pieces(
        &self,
        send: &TxSend,
    ) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + use<> {
        let (g, first, last) = match self.buf {
            TxBuf::Gather(g) => (
                Some(g),
                send.range.start / self.seg,
                send.range.end.div_ceil(self.seg),
            ),
            TxBuf::Read | TxBuf::Split => (None, 0, 0),
        };
        (first..last).filter_map(move |i| {
            let g = g?;
            let p = g.payload(i);
            Some((
                g.headers(i),
                READ_PAYLOAD_OFFSET + p.start..READ_PAYLOAD_OFFSET + p.end,
            ))
        })
    }
}

/// One send of a plan: bytes `range` of the plan's buffer; with `gso_size`,
/// one UDP GSO send of datagrams of that many bytes, else one datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxSend {
    pub range: Range<usize>,
    pub gso_size: Option<u16>,
    /// The outer header's TOS byte or traffic class (the plan's).
    pub tos: u8,
}

impl TxSend {
    pub(super) fn datagrams(&self) -> usize {
        match self.gso_size {
            Some(g) => self.range.len().div_ceil(usize::from(g).max(1)),
            None => 1,
        }
    }
}

/// What a TUN read becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum TunAction {
    /// Send these datagrams to the peer.
    Send(TxPlan),
    /// Reflect mode: write these bytes of the read buffer back into the TUN
    /// device (the answer, rewritten in place).
    Reflect(Range<usize>),
    /// Nothing to send: dropped and counted, or (WireGuard) held until a
    /// handshake completes, counted as such.
    Dropped,
}

impl Datapath {
    /// Counts a plan's datagrams for its peer.
    #[inline]
    pub(super) fn count_peer_tx(&self, action: &TunAction) {
        if let (true, TunAction::Send(plan)) = (self.peers.per_peer, action) {
            let (packets, bytes) = plan.remaining();
            let c = self.peer_counters(plan.peer);
            c.tx_packets.add(packets);
            c.tx_bytes.add(bytes);
        }
    }

    /// Where a TUN read of `len` bytes (behind the headroom) has its IP
    /// packet: behind the virtio-net header with offload.
    pub(super) fn read_packet_range(&self, len: usize) -> Range<usize> {
        let head = self.read_headroom();
        let off = if self.offload { READ_PAYLOAD_OFFSET } else { 0 };
        (head + off).min(head + len)..head + len
    }

    /// A TUN read of `len` bytes landed in buffer `id` (`read`, headroom
    /// included) at `now_ns`: queue it by flow. The buffer is the queue's
    /// until [`Datapath::tx_next`] or [`Datapath::tx_make_room`] hands it
    /// back.
    pub fn tx_enqueue(&mut self, id: u32, read: &[u8], len: usize, now_ns: u64) {
        let len = len.min(read.len().saturating_sub(self.read_headroom()));
        let pkt = &read[self.read_packet_range(len)];
        let Some(t) = &mut self.queues.txq else {
            return;
        };
        self.queues.reads_since_check += 1;
        t.enqueue(id, pkt, len, now_ns, &self.stats.tun_to_peer);
    }

    /// The next queued read to send at `now_ns` (new flows first, by
    /// bytes), unless the in-flight limit (`--aqm-inflight-bytes`) is reached.
    /// Hand its buffer and the [`crate::fq::Dequeued`] to
    /// [`Datapath::handle_dequeued`], and call [`Datapath::tx_done`] once
    /// the buffer is free again.
    pub fn tx_next(&mut self, now_ns: u64) -> Option<crate::fq::Dequeued> {
        self.queues
            .txq
            .as_mut()?
            .next(now_ns, &self.stats.tun_to_peer)
    }

    /// The buffer of a dequeued read is free again (sent, or dropped).
    pub fn tx_done(&mut self, d: &crate::fq::Dequeued) {
        if let Some(t) = &mut self.queues.txq {
            t.done(d, &self.stats.tun_to_peer);
        }
    }

    /// What a dequeued read (`d`, in `read`) becomes: as
    /// [`Datapath::handle_tun_read`], with CoDel's signal carried out. An
    /// ECN-capable packet is marked CE (a super-packet before it is cut, so
    /// every datagram carries the mark). Otherwise one datagram is dropped
    /// and counted as `aqm`: a lone packet, or the first datagram of a
    /// super-packet while the rest goes, so the sender loses one segment
    /// (one retransmit) rather than the 45 of a whole 64 KiB super-packet.
    pub fn handle_dequeued(
        &mut self,
        read: &mut [u8],
        d: &crate::fq::Dequeued,
        split: &mut [u8],
    ) -> TunAction {
        let marked = d.signal && {
            let r = self.read_packet_range(d.bytes);
            crate::packet::ecn::mark_ce(&mut read[r])
        };
        if marked {
            self.stats.aqm_marks.add(1);
        }
        let action = self.plan_tun_read(read, d.bytes, split);
        let action = if !d.signal || marked {
            action
        } else {
            match action {
                TunAction::Send(mut plan) => {
                    self.stats.tun_to_peer.drop(DropReason::Aqm);
                    if self.peers.per_peer {
                        self.peer_counters(plan.peer).drop(DropReason::Aqm);
                    }
                    if plan.datagrams() > 1 {
                        plan.sent = plan.seg;
                        TunAction::Send(plan)
                    } else {
                        TunAction::Dropped
                    }
                }
                // Dropped and counted for its own reason, or reflected.
                other => other,
            }
        };
        self.count_peer_tx(&action);
        action
    }

    /// A TUN read of `len` bytes at `read[head..]`, where `head` is
    /// [`Datapath::read_headroom`]. Offload cuts a super-packet into
    /// `split` (at least [`SPLIT_LEN`] bytes).
    pub fn handle_tun_read(&mut self, read: &mut [u8], len: usize, split: &mut [u8]) -> TunAction {
        let action = self.plan_tun_read(read, len, split);
        self.count_peer_tx(&action);
        action
    }

    /// [`Datapath::handle_tun_read`] without the per-peer count.
    pub(super) fn plan_tun_read(
        &mut self,
        read: &mut [u8],
        len: usize,
        split: &mut [u8],
    ) -> TunAction {
        if self.offload {
            return self.handle_offload_read(read, len, split);
        }
        let head = self.read_headroom();
        let (encap, pkt) = read[..head + len].split_at_mut(head);
        match self.fwd.handle_from_tun_mut(pkt) {
            TunVerdict::ToPeer => {
                let Some(peer) = self.route(pkt) else {
                    return TunAction::Dropped;
                };
                if self.wg.is_some() {
                    return self.seal(peer, read, head, len);
                }
                self.fwd.write_encap(encap);
                TunAction::Send(TxPlan {
                    buf: TxBuf::Read,
                    dest: self.fwd.peer_addr(peer),
                    peer,
                    start: 0,
                    end: head + len,
                    seg: (head + len).max(1),
                    sent: 0,
                    tos: 0,
                })
            }
            TunVerdict::Reflect => TunAction::Reflect(head..head + len),
            TunVerdict::Drop(r) => {
                self.stats.tun_to_peer.drop(r);
                TunAction::Dropped
            }
        }
    }

    /// The peer for a packet read from the TUN device; None: no route,
    /// dropped and counted.
    #[inline]
    pub(super) fn route(&self, pkt: &[u8]) -> Option<PeerId> {
        match self.fwd.route(pkt) {
            Ok(p) => Some(p),
            Err(r) => {
                self.stats.tun_to_peer.drop(r);
                None
            }
        }
    }

    pub(super) fn handle_offload_read(
        &mut self,
        read: &mut [u8],
        len: usize,
        split: &mut [u8],
    ) -> TunAction {
        let frame = &mut read[..len];
        let Some(hdr) = VirtioNetHdr::parse(frame) else {
            self.stats.tun_to_peer.drop(DropReason::Truncated);
            return TunAction::Dropped;
        };
        let frame_len = frame.len();
        let pkt = &mut frame[READ_PAYLOAD_OFFSET..];
        let gathered = match offload::split_gather(&hdr, pkt, self.fwd.mtu(), split) {
            Ok(g) => g,
            Err(_) => {
                self.stats.tun_to_peer.drop(DropReason::BadOffload);
                return TunAction::Dropped;
            }
        };
        match gathered {
            // One packet gets the same checks as without offload, and goes
            // out from where it was read (WireGuard: sealed there).
            offload::Gathered::Single => match self.fwd.handle_from_tun(pkt) {
                TunVerdict::Drop(r) => {
                    self.stats.tun_to_peer.drop(r);
                    TunAction::Dropped
                }
                _ => match self.route(pkt) {
                    None => TunAction::Dropped,
                    Some(peer) if self.wg.is_some() => {
                        let n = pkt.len();
                        self.seal(peer, read, READ_PAYLOAD_OFFSET, n)
                    }
                    Some(peer) => TunAction::Send(TxPlan {
                        buf: TxBuf::Read,
                        dest: self.fwd.peer_addr(peer),
                        peer,
                        start: READ_PAYLOAD_OFFSET,
                        end: frame_len,
                        seg: pkt.len().max(1),
                        sent: 0,
                        tos: 0,
                    }),
                },
            },
            // Split made every segment valid and within the MTU; they all
            // go to the peer of the super-packet's destination (WireGuard:
            // sealed one by one into the split buffer).
            offload::Gathered::Segments(g) => match self.route(pkt) {
                None => TunAction::Dropped,
                Some(peer) if self.wg.is_some() => self.seal_segments(peer, g, read, split),
                Some(peer) => TunAction::Send(TxPlan {
                    buf: TxBuf::Gather(g),
                    dest: self.fwd.peer_addr(peer),
                    peer,
                    start: 0,
                    end: g.total_len(),
                    seg: g.seg_len().max(1),
                    sent: 0,
                    tos: 0,
                }),
            },
        }
    }

    /// The next send of `plan`, or None when it is done.
    pub fn next_send(&self, plan: &TxPlan) -> Option<TxSend> {
        if plan.is_done() {
            return None;
        }
        let at = plan.start + plan.sent;
        let left = plan.end - at;
        let seg = plan.seg;
        if self.tx.gso && left > seg {
            let per_send = gso_segments_per_send(seg) * seg;
            let len = left.min(per_send);
            if len > seg {
                return Some(TxSend {
                    range: at..at + len,
                    gso_size: Some(seg as u16),
                    tos: plan.tos,
                });
            }
        }
        Some(TxSend {
            range: at..at + left.min(seg),
            gso_size: None,
            tos: plan.tos,
        })
    }

    /// The result of `send` (from [`Datapath::next_send`] on `plan`): bytes
    /// sent, or the error. Counts, and advances the plan unless the send
    /// must be retried. `Errno::ECANCELED` (an engine shutting down) counts
    /// nothing and abandons the plan.
    pub fn on_send(
        &mut self,
        plan: &mut TxPlan,
        send: &TxSend,
        res: std::result::Result<usize, Errno>,
    ) -> After {
        let stats = &self.stats;
        let datagrams = send.datagrams() as u64;
        match res {
            Ok(n) if n == send.range.len() => {
                if send.gso_size.is_some() {
                    stats.gso_sends.add(1);
                    stats.gso_segments.add(datagrams);
                }
                stats.tun_to_peer.packets.add(datagrams);
                stats.tun_to_peer.bytes.add(n as u64);
            }
            Err(Errno::EAGAIN) => {
                stats.tun_to_peer.backpressure.add(1);
                return After::Retry;
            }
            Err(Errno::EINTR) => return After::Retry,
            Err(Errno::ECANCELED) => {
                plan.sent = plan.end - plan.start;
                return After::Next;
            }
            Err(e @ (Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT))
                if send.gso_size.is_some() =>
            {
                // Send the same datagrams again, one by one.
                self.tx.gso = false;
                self.events.push_back(Event::GsoRefused(e));
                return After::Next;
            }
            // A short send (never seen for UDP) or an error: lost.
            Ok(_) | Err(_) => {
                for _ in 0..datagrams {
                    stats.tun_to_peer.drop(DropReason::SendFailed);
                }
            }
        }
        plan.sent += send.range.len();
        After::Next
    }

    /// The result of a TUN read that failed with `e`: Ok(()) to read again
    /// once readable; Err if the device failed (a TUN read has no error a
    /// worker can go on from).
    pub fn on_tun_read_error(&self, e: Errno) -> Result<()> {
        match e {
            Errno::EAGAIN | Errno::EINTR | Errno::ECANCELED => Ok(()),
            e => Err(tun_failure("read from", &self.label, e.into())),
        }
    }
}
