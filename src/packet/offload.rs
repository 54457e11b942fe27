//! Offload work done in userspace, as pure functions over byte slices:
//!
//! - [`split`]: cut a TUN super-packet (TSO/USO, described by its virtio-net
//!   header) into MTU-sized IP packets with correct IP and TCP/UDP headers and
//!   checksums, written back to back so one UDP GSO send carries them all;
//!   also completes a partial checksum (`NEEDS_CSUM`) of a single packet.
//! - [`Coalescer`]: the reverse for the TUN write side: consecutive TCP
//!   segments of one flow become one super-packet with a virtio-net header;
//!   anything else passes through one by one, in order. A super-packet is
//!   written with `NEEDS_CSUM`, which the kernel takes as already verified,
//!   so every TCP segment that could join one has its IPv4 header and TCP
//!   checksums verified first; one that fails is refused ([`BadChecksum`]).
//!
//! Every segment leaves as an ordinary IP packet, so a peer without offload
//! interoperates unchanged.

use std::fmt;
use std::net::IpAddr;

use super::checksum::{fold, fold_partial, pseudo_header_sum, sum};
use super::ip::{IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN, IpPacket, PROTO_TCP, PROTO_UDP};
use super::virtio::{self, VirtioNetHdr};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;
/// Largest IP packet a super-packet may become.
const MAX_SUPER_LEN: usize = 65535;

/// Why a packet could not be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// The IP packet itself is malformed.
    Malformed(&'static str),
    /// A GSO type or header layout this code does not handle.
    Unsupported(&'static str),
    /// The output buffer is too small.
    NoRoom,
    /// Headers alone exceed the MTU.
    TooBig,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::Malformed(w) => write!(f, "malformed packet: {w}"),
            OffloadError::Unsupported(w) => write!(f, "unsupported offload: {w}"),
            OffloadError::NoRoom => f.write_str("output buffer too small"),
            OffloadError::TooBig => f.write_str("headers exceed the MTU"),
        }
    }
}

/// The segments [`split`] wrote: `count` packets back to back, each
/// `seg_len` bytes except the last, which is `last_len` (<= `seg_len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    pub count: usize,
    pub seg_len: usize,
    pub last_len: usize,
}

impl Segments {
    pub fn total_len(&self) -> usize {
        (self.count - 1) * self.seg_len + self.last_len
    }

    /// Byte ranges of the segments inside the output buffer.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.count).map(move |i| {
            let start = i * self.seg_len;
            let len = if i + 1 == self.count {
                self.last_len
            } else {
                self.seg_len
            };
            start..start + len
        })
    }
}

/// IP-level facts about a packet: where L4 starts, its protocol, addresses.
struct IpInfo {
    v6: bool,
    l4_off: usize,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
}

fn ip_info(pkt: &[u8]) -> Result<IpInfo, OffloadError> {
    match IpPacket::new_checked(pkt) {
        Ok(IpPacket::V4(p)) => Ok(IpInfo {
            v6: false,
            l4_off: p.header_len(),
            protocol: p.protocol(),
            src: p.src().into(),
            dst: p.dst().into(),
        }),
        Ok(IpPacket::V6(p)) => Ok(IpInfo {
            v6: true,
            l4_off: IPV6_HEADER_LEN,
            protocol: p.next_header(),
            src: p.src().into(),
            dst: p.dst().into(),
        }),
        Err(e) => Err(match e {
            super::ParseError::Empty => OffloadError::Malformed("empty"),
            super::ParseError::Truncated => OffloadError::Malformed("truncated"),
            super::ParseError::BadVersion => OffloadError::Malformed("bad IP version"),
            super::ParseError::BadHeaderLength => OffloadError::Malformed("bad IPv4 header length"),
            super::ParseError::LengthMismatch => OffloadError::Malformed("length mismatch"),
        }),
    }
}

/// Sets the IP length field(s) of the packet at `p` (total `len` bytes) and,
/// for IPv4, `id` and a fresh header checksum.
fn fix_ip_header(p: &mut [u8], v6: bool, len: usize, l4_off: usize, id: Option<u16>) {
    if v6 {
        p[4..6].copy_from_slice(&((len - IPV6_HEADER_LEN) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        if let Some(id) = id {
            p[4..6].copy_from_slice(&id.to_be_bytes());
        }
        p[10..12].copy_from_slice(&[0, 0]);
        let c = fold(sum(&p[..l4_off], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Writes the full L4 checksum of the packet at `p` into `field` (offset
/// within `p`); UDP over IPv4 writes 0xffff for a computed 0.
#[cfg(test)]
fn fill_l4_checksum(p: &mut [u8], info: &IpInfo, field: usize) {
    let l4_len = p.len() - info.l4_off;
    p[field..field + 2].copy_from_slice(&[0, 0]);
    let s = sum(
        &p[info.l4_off..],
        pseudo_header_sum(info.src, info.dst, info.protocol, l4_len),
    );
    let mut c = fold(s);
    if info.protocol == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    p[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// Completes the partial checksum (`NEEDS_CSUM`) of a single packet in
/// place: the field holds the pseudo-header sum, and summing it in with the
/// rest yields the full checksum.
fn complete_checksum(hdr: &VirtioNetHdr, p: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & virtio::F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let len = p.len();
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if start >= len || field + 2 > len {
        return Err(OffloadError::Malformed(
            "checksum offsets beyond the packet",
        ));
    }
    let c = fold(sum(&p[start..len], 0));
    p[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// How a super-packet is cut: the headers every segment repeats, the
/// payload per segment, and what each segment's headers must say.
struct Cut {
    info: IpInfo,
    tcp: bool,
    /// Bytes of IP and L4 headers (`hlen`), repeated in every segment.
    headers: usize,
    mss: usize,
    count: usize,
    last_payload: usize,
    ip_id: Option<u16>,
    seq: u32,
    tcp_flags: u8,
}

impl Cut {
    /// Checks `pkt` against its GSO header and the MTU.
    fn plan(hdr: &VirtioNetHdr, pkt: &[u8], mtu: usize) -> Result<Cut, OffloadError> {
        let kind = hdr.gso_kind();
        let info = ip_info(pkt)?;
        let (want_proto, l4_hdr_len) = match kind {
            virtio::GSO_TCPV4 | virtio::GSO_TCPV6 => {
                if info.protocol != PROTO_TCP {
                    return Err(OffloadError::Unsupported("TCP GSO on a non-TCP packet"));
                }
                let off = info.l4_off + 12;
                let b = *pkt
                    .get(off)
                    .ok_or(OffloadError::Malformed("truncated TCP header"))?;
                (PROTO_TCP, usize::from(b >> 4) * 4)
            }
            virtio::GSO_UDP_L4 => (PROTO_UDP, 8),
            virtio::GSO_UDP => return Err(OffloadError::Unsupported("UFO (IP fragmentation)")),
            _ => return Err(OffloadError::Unsupported("unknown GSO type")),
        };
        if info.protocol != want_proto {
            return Err(OffloadError::Unsupported(
                "GSO type does not match the L4 protocol",
            ));
        }
        if (kind == virtio::GSO_TCPV4 && info.v6) || (kind == virtio::GSO_TCPV6 && !info.v6) {
            return Err(OffloadError::Unsupported(
                "GSO type does not match the IP version",
            ));
        }
        if l4_hdr_len < 8 || (want_proto == PROTO_TCP && l4_hdr_len < 20) {
            return Err(OffloadError::Malformed("bad L4 header length"));
        }
        let headers = info.l4_off + l4_hdr_len;
        if headers > pkt.len() {
            return Err(OffloadError::Malformed("truncated L4 header"));
        }
        if headers >= mtu {
            return Err(OffloadError::TooBig);
        }
        let payload = pkt.len() - headers;
        let gso = usize::from(hdr.gso_size).max(1);
        // Never exceed the MTU, whatever the header says.
        let mss = gso.min(mtu - headers);
        let count = payload.div_ceil(mss).max(1);
        let l4 = info.l4_off;
        let tcp = want_proto == PROTO_TCP;
        let (seq, tcp_flags) = if tcp {
            (
                u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]),
                pkt[l4 + 13],
            )
        } else {
            (0, 0)
        };
        Ok(Cut {
            ip_id: (!info.v6).then(|| u16::from_be_bytes([pkt[4], pkt[5]])),
            info,
            tcp,
            headers,
            mss,
            count,
            last_payload: payload - (count - 1) * mss,
            seq,
            tcp_flags,
        })
    }

    /// Where each datagram's headers and payload lie.
    fn layout(&self) -> GatherSegments {
        GatherSegments {
            count: self.count,
            hlen: self.headers,
            mss: self.mss,
            last_payload: self.last_payload,
        }
    }

    fn segments(&self) -> Segments {
        let l = self.layout();
        Segments {
            count: l.count,
            seg_len: l.seg_len(),
            last_len: l.hlen + l.last_payload,
        }
    }

    /// Fills in the headers `h` (a copy of the super-packet's) for segment
    /// `i`, whose payload is `payload`: lengths, IPv4 id and checksum,
    /// sequence number and flags, and the L4 checksum over both parts.
    fn write_headers(&self, h: &mut [u8], i: usize, payload: &[u8]) {
        let info = &self.info;
        let l4 = info.l4_off;
        let len = h.len() + payload.len();
        fix_ip_header(
            h,
            info.v6,
            len,
            l4,
            self.ip_id.map(|id| id.wrapping_add(i as u16)),
        );
        let field = if self.tcp {
            let s = self.seq.wrapping_add((i * self.mss) as u32);
            h[l4 + 4..l4 + 8].copy_from_slice(&s.to_be_bytes());
            let mut flags = self.tcp_flags;
            if i + 1 != self.count {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                flags &= !TCP_CWR;
            }
            h[l4 + 13] = flags;
            l4 + 16
        } else {
            h[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
            l4 + 6
        };
        // The L4 header has an even length (TCP: a multiple of 4, UDP: 8),
        // so the two parts' sums add up.
        h[field..field + 2].copy_from_slice(&[0, 0]);
        let s = sum(
            payload,
            sum(
                &h[l4..],
                pseudo_header_sum(info.src, info.dst, info.protocol, len - l4),
            ),
        );
        let mut c = fold(s);
        if !self.tcp && c == 0 {
            c = 0xffff;
        }
        h[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// Most datagrams one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS
/// on older kernels).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one UDP GSO send may carry: one UDP payload over IPv4.
pub const GSO_MAX_BYTES: usize = 65507;
/// Datagrams of at most `seg_len` bytes that one UDP GSO send may carry.
pub fn gso_segments_per_send(seg_len: usize) -> usize {
    GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / seg_len.max(1)).max(1)
}

/// Splits the packet `pkt` (read from a TUN device with header `hdr`) into
/// IP packets of at most `mtu` bytes, written back to back into `out`.
/// A non-GSO packet is copied as one segment, its checksum completed if the
/// header asks for it.
pub fn split(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    mtu: usize,
    out: &mut [u8],
) -> Result<Segments, OffloadError> {
    if hdr.gso_kind() == virtio::GSO_NONE {
        let len = pkt.len();
        if len > out.len() {
            return Err(OffloadError::NoRoom);
        }
        out[..len].copy_from_slice(pkt);
        complete_checksum(hdr, &mut out[..len])?;
        return Ok(Segments {
            count: 1,
            seg_len: len,
            last_len: len,
        });
    }
    let cut = Cut::plan(hdr, pkt, mtu)?;
    let segs = cut.segments();
    if segs.total_len() > out.len() {
        return Err(OffloadError::NoRoom);
    }
    let layout = cut.layout();
    for (i, range) in segs.ranges().enumerate() {
        let seg = &mut out[range];
        let (h, payload) = seg.split_at_mut(layout.hlen);
        h.copy_from_slice(&pkt[..layout.hlen]);
        payload.copy_from_slice(&pkt[layout.payload(i)]);
        cut.write_headers(h, i, payload);
    }
    Ok(segs)
}

/// What [`split_gather`] made of a TUN read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gathered {
    /// Not a super-packet: the packet itself, its checksum completed in
    /// place, is the one datagram.
    Single,
    /// A super-packet: datagram `i` is the headers at
    /// `headers[i * hlen..][..hlen]` followed by the payload at
    /// `pkt[payload_start + i * mss..]` (`mss` bytes, the last
    /// `last_payload`). Nothing of the payload was copied.
    Segments(GatherSegments),
}

/// The layout of a super-packet cut by [`split_gather`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherSegments {
    pub count: usize,
    /// Header bytes per datagram.
    pub hlen: usize,
    pub mss: usize,
    pub last_payload: usize,
}

impl GatherSegments {
    /// Bytes of datagram `i` (all `hlen + mss` but the last).
    pub fn seg_len(&self) -> usize {
        self.hlen
            + self
                .mss
                .min(self.mss * (self.count - 1) + self.last_payload)
    }

    /// Where the payload of datagram `i` lies in the super-packet.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.hlen + i * self.mss;
        let len = if i + 1 == self.count {
            self.last_payload
        } else {
            self.mss
        };
        start..start + len
    }

    /// Where the headers of datagram `i` lie in the headers area.
    pub fn headers(&self, i: usize) -> std::ops::Range<usize> {
        i * self.hlen..(i + 1) * self.hlen
    }

    /// Bytes of all datagrams together.
    pub fn total_len(&self) -> usize {
        (self.count - 1) * self.seg_len() + self.hlen + self.last_payload
    }
}

/// As [`split`], without copying the payload: only each datagram's headers
/// are written (into `headers`); the payload stays in `pkt`, to be sent as
/// a gather list. The datagrams are byte for byte those [`split`] writes.
/// A non-GSO packet's checksum is completed in `pkt` itself.
pub fn split_gather(
    hdr: &VirtioNetHdr,
    pkt: &mut [u8],
    mtu: usize,
    headers: &mut [u8],
) -> Result<Gathered, OffloadError> {
    if hdr.gso_kind() == virtio::GSO_NONE {
        complete_checksum(hdr, pkt)?;
        return Ok(Gathered::Single);
    }
    let cut = Cut::plan(hdr, pkt, mtu)?;
    let layout = cut.layout();
    if layout.count * layout.hlen > headers.len() {
        return Err(OffloadError::NoRoom);
    }
    for i in 0..layout.count {
        let h = &mut headers[layout.headers(i)];
        h.copy_from_slice(&pkt[..layout.hlen]);
        cut.write_headers(h, i, &pkt[layout.payload(i)]);
    }
    Ok(Gathered::Segments(layout))
}

/// Most received segments one super-packet joins: bounds the pieces of a
/// write (one header piece and one payload piece per segment), which UDP
/// GRO (at most 64 datagrams per receive) never reaches anyway.
pub const MAX_JOINED: usize = 64;

/// Most pieces one [`TunWrite`] has.
pub const MAX_WRITE_PIECES: usize = 1 + MAX_JOINED;

/// Where the bytes of one piece of a TUN write are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the coalescer's header area ([`Coalescer::header_area`]):
    /// a virtio-net header, with the rewritten IP and TCP headers of a
    /// super-packet after it.
    Header(std::ops::Range<usize>),
    /// Bytes of the receive buffer the packets were pushed from.
    Buffer(std::ops::Range<usize>),
}

/// One TUN write produced by the [`Coalescer`]: a virtio-net header and one
/// IP packet, gathered from `pieces` (indices into [`Coalescer::pieces`]),
/// `len` bytes in all; made of `packets` received packets, which were
/// `bytes` long together (what the stats count as delivered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunWrite {
    pub pieces: std::ops::Range<usize>,
    pub len: usize,
    pub packets: usize,
    pub bytes: usize,
}

/// A TCP segment whose IPv4 header or TCP checksum does not verify: the
/// coalescer refused it (nothing was written for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadChecksum;

/// True if the IPv4 header checksum (if IPv4) and the TCP checksum over the
/// pseudo-header of the segment described by `v` verify.
fn checksums_verify(v: &TcpView, pkt: &[u8]) -> bool {
    if !v.v6 && fold(sum(&pkt[..v.l4_off], 0)) != 0 {
        return false;
    }
    let l4_len = pkt.len() - v.l4_off;
    let s = sum(
        &pkt[v.l4_off..],
        pseudo_header_sum(v.src, v.dst, PROTO_TCP, l4_len),
    );
    fold(s) == 0
}

/// The TCP super-packet being built.
#[derive(Clone, Debug)]
struct Open {
    /// Index of its first piece (its headers).
    first_piece: usize,
    /// Where its virtio-net header starts in the header area; the first
    /// segment's IP and TCP headers follow it.
    hdr_at: usize,
    v6: bool,
    l4_off: usize,
    tcp_hdr_len: usize,
    src: IpAddr,
    dst: IpAddr,
    next_seq: u32,
    /// Payload bytes of the first segment: every later one must be equal,
    /// except a last shorter one.
    mss: usize,
    /// Length of the IP packet it has become so far.
    len: usize,
    packets: usize,
    /// Bytes of the packets that joined, as received.
    bytes: usize,
    /// No more segments may join (a short or PSH segment joined).
    closed: bool,
}

/// Coalesces consecutive TCP segments of the same flow into super-packets
/// for a TUN device with `IFF_VNET_HDR` and TSO enabled. Order is kept:
/// a packet that cannot join is written as it is, after what came before.
///
/// A super-packet is not copied: its write is a gather list of a small
/// header piece (the virtio-net header and its first segment's IP and TCP
/// headers with lengths and checksum rewritten) and slices of the receive
/// buffer (each segment's payload). A packet that joins nothing is copied
/// behind its virtio-net header into one piece instead (one plain write: for
/// one packet a short copy is cheaper than a gather write). The buffer must
/// stay untouched until every write of the batch is done.
#[derive(Debug, Default)]
pub struct Coalescer {
    headers: Vec<u8>,
    pieces: Vec<Piece>,
    writes: Vec<TunWrite>,
    open: Option<Open>,
}

/// What makes two TCP segments joinable, read from one packet.
struct TcpView {
    v6: bool,
    l4_off: usize,
    tcp_hdr_len: usize,
    src: IpAddr,
    dst: IpAddr,
    seq: u32,
    flags: u8,
    payload_len: usize,
}

/// A TCP segment that may be coalesced: no IP options or fragments, only
/// ACK (and PSH) set, some payload.
fn tcp_view(pkt: &[u8]) -> Option<TcpView> {
    let info = ip_info(pkt).ok()?;
    if info.protocol != PROTO_TCP {
        return None;
    }
    if !info.v6 {
        // No options, not a fragment (MF or offset).
        if info.l4_off != IPV4_MIN_HEADER_LEN || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0
        {
            return None;
        }
    }
    let l4 = info.l4_off;
    let tcp_hdr_len = usize::from(*pkt.get(l4 + 12)? >> 4) * 4;
    if tcp_hdr_len < 20 || l4 + tcp_hdr_len > pkt.len() {
        return None;
    }
    let flags = pkt[l4 + 13];
    if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) != 0
        || flags & TCP_ACK == 0
    {
        return None;
    }
    let payload_len = pkt.len() - l4 - tcp_hdr_len;
    if payload_len == 0 {
        return None;
    }
    Some(TcpView {
        v6: info.v6,
        l4_off: l4,
        tcp_hdr_len,
        src: info.src,
        dst: info.dst,
        seq: u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]),
        flags,
        payload_len,
    })
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Starts a new batch; the previous one's writes are discarded.
    pub fn clear(&mut self) {
        self.headers.clear();
        self.pieces.clear();
        self.writes.clear();
        self.open = None;
    }

    /// Adds the IP packet at `buf[at]` (already validated by the
    /// forwarder). A TCP segment that could be coalesced must verify its
    /// checksums, or it is refused with [`BadChecksum`] and leaves no trace
    /// in the output. Every packet of a batch must come from the same
    /// buffer.
    pub fn push(&mut self, buf: &[u8], at: std::ops::Range<usize>) -> Result<(), BadChecksum> {
        let pkt = &buf[at.clone()];
        let view = tcp_view(pkt);
        if let Some(v) = &view {
            if !checksums_verify(v, pkt) {
                return Err(BadChecksum);
            }
        }
        if let (Some(open), Some(v)) = (&self.open, &view) {
            if self.can_join(open, v, pkt) {
                self.join(v, pkt, at.start);
                return Ok(());
            }
        }
        self.finish_open(buf);
        let hdr_at = self.headers.len();
        self.headers.extend_from_slice(&[0u8; virtio::LEN]);
        let first_piece = self.pieces.len();
        match view {
            Some(v) => {
                // The headers are copied: a super-packet rewrites them.
                let hlen = v.l4_off + v.tcp_hdr_len;
                self.headers.extend_from_slice(&pkt[..hlen]);
                self.pieces.push(Piece::Header(hdr_at..self.headers.len()));
                self.pieces.push(Piece::Buffer(at.start + hlen..at.end));
                self.open = Some(Open {
                    first_piece,
                    hdr_at,
                    v6: v.v6,
                    l4_off: v.l4_off,
                    tcp_hdr_len: v.tcp_hdr_len,
                    src: v.src,
                    dst: v.dst,
                    next_seq: v.seq.wrapping_add(v.payload_len as u32),
                    mss: v.payload_len,
                    len: pkt.len(),
                    packets: 1,
                    bytes: pkt.len(),
                    closed: v.flags & TCP_PSH != 0,
                });
            }
            None => {
                self.headers.extend_from_slice(pkt);
                self.pieces.push(Piece::Header(hdr_at..self.headers.len()));
                self.writes.push(TunWrite {
                    pieces: first_piece..self.pieces.len(),
                    len: virtio::LEN + pkt.len(),
                    packets: 1,
                    bytes: pkt.len(),
                });
            }
        }
        Ok(())
    }

    fn can_join(&self, open: &Open, v: &TcpView, pkt: &[u8]) -> bool {
        if open.closed
            || open.packets >= MAX_JOINED
            || v.v6 != open.v6
            || v.src != open.src
            || v.dst != open.dst
            || v.tcp_hdr_len != open.tcp_hdr_len
            || v.seq != open.next_seq
            || v.payload_len > open.mss
            || open.len + v.payload_len > MAX_SUPER_LEN
        {
            return false;
        }
        let first = &self.headers[open.hdr_at + virtio::LEN..];
        let l4 = open.l4_off;
        // Same IP header fields that matter (TOS/TTL/DF; traffic class,
        // flow label, hop limit), same ports, ack, window and options.
        let ip_same = if open.v6 {
            first[..4] == pkt[..4] && first[7] == pkt[7]
        } else {
            first[1] == pkt[1] && first[6] & 0x40 == pkt[6] & 0x40 && first[8] == pkt[8]
        };
        let tcp_same = first[l4..l4 + 4] == pkt[l4..l4 + 4]
            && first[l4 + 8..l4 + 12] == pkt[l4 + 8..l4 + 12]
            && first[l4 + 14..l4 + 16] == pkt[l4 + 14..l4 + 16]
            && first[l4 + 20..l4 + open.tcp_hdr_len] == pkt[l4 + 20..l4 + open.tcp_hdr_len];
        ip_same && tcp_same
    }

    /// Joins the segment `pkt`, which starts at `start` in the buffer.
    fn join(&mut self, v: &TcpView, pkt: &[u8], start: usize) {
        let Some(open) = &mut self.open else { return };
        let hlen = v.l4_off + v.tcp_hdr_len;
        self.pieces
            .push(Piece::Buffer(start + hlen..start + pkt.len()));
        open.packets += 1;
        open.bytes += pkt.len();
        open.len += v.payload_len;
        open.next_seq = open.next_seq.wrapping_add(v.payload_len as u32);
        if v.flags & TCP_PSH != 0 {
            // The super-packet carries PSH (the kernel puts it on the last
            // segment when it segments again).
            let flag_at = open.hdr_at + virtio::LEN + open.l4_off + 13;
            self.headers[flag_at] |= TCP_PSH;
            open.closed = true;
        }
        if v.payload_len < open.mss {
            open.closed = true;
        }
    }

    /// Writes the header (and fixes lengths) of the open super-packet; a
    /// lone segment is copied behind its header instead (one piece). `buf`
    /// is the buffer the packets were pushed from.
    fn finish_open(&mut self, buf: &[u8]) {
        let Some(open) = self.open.take() else { return };
        let pkt_at = open.hdr_at + virtio::LEN;
        if open.packets == 1 {
            // Its header is the last thing in the area (nothing is added
            // while a packet is open), its payload the last piece.
            if let Some(Piece::Buffer(r)) = self.pieces.pop() {
                self.headers.extend_from_slice(&buf[r]);
            }
            if let Some(Piece::Header(r)) = self.pieces.last_mut() {
                r.end = self.headers.len();
            }
        } else {
            let l4 = open.l4_off;
            let p = &mut self.headers[pkt_at..pkt_at + l4 + open.tcp_hdr_len];
            fix_ip_header(p, open.v6, open.len, l4, None);
            // NEEDS_CSUM: the field holds the pseudo-header sum only.
            let partial = fold_partial(pseudo_header_sum(
                open.src,
                open.dst,
                PROTO_TCP,
                open.len - l4,
            ));
            p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
            let hdr = VirtioNetHdr {
                flags: virtio::F_NEEDS_CSUM,
                gso_type: if open.v6 {
                    virtio::GSO_TCPV6
                } else {
                    virtio::GSO_TCPV4
                },
                hdr_len: (l4 + open.tcp_hdr_len) as u16,
                gso_size: open.mss as u16,
                csum_start: l4 as u16,
                csum_offset: 16,
            };
            hdr.write(&mut self.headers[open.hdr_at..pkt_at]);
        }
        self.writes.push(TunWrite {
            pieces: open.first_piece..self.pieces.len(),
            len: virtio::LEN + open.len,
            packets: open.packets,
            bytes: open.bytes,
        });
    }

    /// Closes the batch (`buf`: the buffer the packets were pushed from):
    /// its writes, in order.
    pub fn finish(&mut self, buf: &[u8]) -> &[TunWrite] {
        self.finish_open(buf);
        &self.writes
    }

    /// The writes of the last finished batch (after [`finish`]).
    ///
    /// [`finish`]: Coalescer::finish
    pub fn writes(&self) -> &[TunWrite] {
        &self.writes
    }

    /// The pieces of write `w`, in order.
    pub fn pieces(&self, w: &TunWrite) -> &[Piece] {
        &self.pieces[w.pieces.clone()]
    }

    /// The bytes [`Piece::Header`] ranges refer to.
    pub fn header_area(&self) -> &[u8] {
        &self.headers
    }

    /// The slices of write `w`, in order, its packets having been pushed
    /// from `buf`.
    pub fn slices<'a>(&'a self, w: &TunWrite, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.pieces(w).iter().map(move |p| match p {
            Piece::Header(r) => &self.headers[r.clone()],
            Piece::Buffer(r) => &buf[r.clone()],
        })
    }

    /// Write `w` as one contiguous frame (what the device receives).
    pub fn frame(&self, w: &TunWrite, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(w.len);
        for s in self.slices(w, buf) {
            out.extend_from_slice(s);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::checksum::checksum;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Packets pushed into a coalescer from one buffer, as a receive
    /// pushes them: the writes come back as the frames the device gets.
    #[derive(Default)]
    pub(crate) struct Batch {
        buf: Vec<u8>,
        c: Coalescer,
    }

    impl Batch {
        pub(crate) fn push(&mut self, p: &[u8]) -> Result<(), BadChecksum> {
            // Odd offsets: nothing may depend on alignment.
            self.buf.push(0xee);
            let at = self.buf.len();
            self.buf.extend_from_slice(p);
            self.c.push(&self.buf, at..self.buf.len())
        }

        /// Closes the batch: each write's frame, and the writes.
        pub(crate) fn finish(&mut self) -> (Vec<Vec<u8>>, Vec<TunWrite>) {
            let writes = self.c.finish(&self.buf).to_vec();
            let frames: Vec<Vec<u8>> = writes.iter().map(|w| self.c.frame(w, &self.buf)).collect();
            for (f, w) in frames.iter().zip(&writes) {
                assert_eq!(f.len(), w.len);
            }
            (frames, writes)
        }
    }

    /// Independent check of a segment: IPv4 header checksum and the L4
    /// checksum over the pseudo-header verify.
    pub(crate) fn verify(pkt: &[u8]) {
        let info = ip_info(pkt).expect("valid IP");
        if !info.v6 {
            assert_eq!(checksum(&pkt[..info.l4_off]), 0, "IPv4 header checksum");
        }
        let l4_len = pkt.len() - info.l4_off;
        let s = sum(
            &pkt[info.l4_off..],
            pseudo_header_sum(info.src, info.dst, info.protocol, l4_len),
        );
        assert_eq!(fold(s), 0, "L4 checksum");
    }

    fn addrs(v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (
                "2001:db8:19::1".parse::<Ipv6Addr>().unwrap().into(),
                "2001:db8:19::2".parse::<Ipv6Addr>().unwrap().into(),
            )
        } else {
            (
                Ipv4Addr::new(198, 19, 0, 1).into(),
                Ipv4Addr::new(198, 19, 0, 2).into(),
            )
        }
    }

    /// A TCP packet with `options` and `payload`, valid checksums.
    pub(crate) fn tcp_packet(
        v6: bool,
        seq: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let ip_len = if v6 {
            IPV6_HEADER_LEN
        } else {
            IPV4_MIN_HEADER_LEN
        };
        let thl = 20 + options.len();
        assert_eq!(thl % 4, 0);
        let total = ip_len + thl + payload.len();
        let mut p = vec![0u8; total];
        let (src, dst) = addrs(v6);
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
            }
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = PROTO_TCP;
            if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
            }
        }
        let l4 = ip_len;
        p[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[l4 + 2..l4 + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        p[l4 + 8..l4 + 12].copy_from_slice(&777u32.to_be_bytes());
        p[l4 + 12] = ((thl / 4) as u8) << 4;
        p[l4 + 13] = flags;
        p[l4 + 14..l4 + 16].copy_from_slice(&502u16.to_be_bytes());
        p[l4 + 20..l4 + thl].copy_from_slice(options);
        p[l4 + thl..].copy_from_slice(payload);
        let info = ip_info(&p).unwrap();
        if !v6 {
            fix_ip_header(&mut p, false, total, l4, None);
        }
        fill_l4_checksum(&mut p, &info, l4 + 16);
        p
    }

    /// Recomputes the IPv4 header and TCP checksums after a test edited
    /// the packet.
    pub(crate) fn refresh_tcp_checksums(p: &mut [u8]) {
        let info = ip_info(p).unwrap();
        let total = p.len();
        if !info.v6 {
            fix_ip_header(p, false, total, info.l4_off, None);
        }
        fill_l4_checksum(p, &info, info.l4_off + 16);
    }

    pub(crate) fn udp_packet(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut p = tcp_packet(v6, 0, TCP_ACK, &[], &[0u8; 0]);
        let l4 = if v6 { 40 } else { 20 };
        p.truncate(l4);
        p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        let total = p.len();
        if v6 {
            p[6] = PROTO_UDP;
        } else {
            p[9] = PROTO_UDP;
        }
        fix_ip_header(&mut p, v6, total, l4, None);
        p[l4 + 4..l4 + 6].copy_from_slice(&((total - l4) as u16).to_be_bytes());
        let info = ip_info(&p).unwrap();
        fill_l4_checksum(&mut p, &info, l4 + 6);
        p
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// A super-packet as a TUN with TSO hands it over: lengths for the whole
    /// thing, the checksum field holding only the pseudo-header sum.
    fn tso_super(
        v6: bool,
        options: &[u8],
        payload: &[u8],
        mss: u16,
        flags: u8,
    ) -> (VirtioNetHdr, Vec<u8>) {
        let mut p = tcp_packet(v6, 1000, flags, options, payload);
        let info = ip_info(&p).unwrap();
        let l4 = info.l4_off;
        let partial = fold_partial(pseudo_header_sum(
            info.src,
            info.dst,
            PROTO_TCP,
            p.len() - l4,
        ));
        p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: if v6 {
                virtio::GSO_TCPV6
            } else {
                virtio::GSO_TCPV4
            },
            hdr_len: (l4 + 20 + options.len()) as u16,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    fn segments(out: &[u8], s: &Segments) -> Vec<Vec<u8>> {
        s.ranges().map(|r| out[r].to_vec()).collect()
    }

    #[test]
    fn split_tcp_v4_and_v6() {
        let timestamps = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        for v6 in [false, true] {
            for options in [&[][..], &timestamps[..]] {
                let payload = data(5000);
                let (hdr, p) = tso_super(
                    v6,
                    options,
                    &payload,
                    1400,
                    TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR,
                );
                let mut out = vec![0u8; 70000];
                let s = split(&hdr, &p, 1500, &mut out).unwrap();
                assert_eq!(s.count, 4);
                let segs = segments(&out, &s);
                let mut rebuilt = Vec::new();
                let headers = if v6 { 40 } else { 20 } + 20 + options.len();
                for (i, seg) in segs.iter().enumerate() {
                    verify(seg);
                    assert!(seg.len() <= 1500);
                    let l4 = if v6 { 40 } else { 20 };
                    let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().unwrap());
                    assert_eq!(seq, 1000 + 1400 * i as u32);
                    let flags = seg[l4 + 13];
                    assert_eq!(flags & TCP_FIN != 0, i == 3, "FIN only on the last");
                    assert_eq!(flags & TCP_PSH != 0, i == 3, "PSH only on the last");
                    assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
                    if !v6 {
                        assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
                    }
                    assert_eq!(&seg[l4 + 20..l4 + 20 + options.len()], options);
                    rebuilt.extend_from_slice(&seg[headers..]);
                }
                assert_eq!(segs[3].len(), headers + 5000 - 3 * 1400);
                assert_eq!(rebuilt, payload);
            }
        }
    }

    #[test]
    fn split_respects_mtu_over_gso_size() {
        let (hdr, p) = tso_super(false, &[], &data(4000), 1460, TCP_ACK);
        let mut out = vec![0u8; 70000];
        let s = split(&hdr, &p, 1000, &mut out).unwrap();
        assert_eq!(s.seg_len, 1000);
        assert_eq!(s.count, 4000usize.div_ceil(960));
        for seg in segments(&out, &s) {
            verify(&seg);
        }
    }

    #[test]
    fn split_udp_l4() {
        for v6 in [false, true] {
            let p = udp_packet(v6, &data(3000));
            let l4 = if v6 { 40 } else { 20 };
            let hdr = VirtioNetHdr {
                flags: virtio::F_NEEDS_CSUM,
                gso_type: virtio::GSO_UDP_L4,
                hdr_len: (l4 + 8) as u16,
                gso_size: 1200,
                csum_start: l4 as u16,
                csum_offset: 6,
            };
            let mut out = vec![0u8; 70000];
            let s = split(&hdr, &p, 1500, &mut out).unwrap();
            assert_eq!(s.count, 3);
            let mut rebuilt = Vec::new();
            for seg in segments(&out, &s) {
                verify(&seg);
                assert_eq!(
                    usize::from(u16::from_be_bytes([seg[l4 + 4], seg[l4 + 5]])),
                    seg.len() - l4
                );
                rebuilt.extend_from_slice(&seg[l4 + 8..]);
            }
            assert_eq!(rebuilt, data(3000));
        }
    }

    #[test]
    fn completes_partial_checksum_of_single_packet() {
        let mut p = tcp_packet(false, 5, TCP_ACK, &[], &data(333));
        let info = ip_info(&p).unwrap();
        let partial = fold_partial(pseudo_header_sum(
            info.src,
            info.dst,
            PROTO_TCP,
            p.len() - 20,
        ));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: virtio::F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = vec![0u8; 2000];
        let s = split(&hdr, &p, 1500, &mut out).unwrap();
        assert_eq!(s.count, 1);
        verify(&out[..s.last_len]);
        // Bad offsets are refused, not trusted.
        let bad = VirtioNetHdr {
            csum_start: 5000,
            ..hdr
        };
        assert!(split(&bad, &p, 1500, &mut out).is_err());
    }

    #[test]
    fn split_rejects_mismatches() {
        let (mut hdr, p) = tso_super(false, &[], &data(3000), 1400, TCP_ACK);
        let mut out = vec![0u8; 70000];
        hdr.gso_type = virtio::GSO_TCPV6;
        assert!(split(&hdr, &p, 1500, &mut out).is_err());
        hdr.gso_type = virtio::GSO_UDP;
        assert_eq!(
            split(&hdr, &p, 1500, &mut out),
            Err(OffloadError::Unsupported("UFO (IP fragmentation)"))
        );
        hdr.gso_type = virtio::GSO_TCPV4;
        assert_eq!(
            split(&hdr, &p, 1500, &mut out[..100]),
            Err(OffloadError::NoRoom)
        );
        assert_eq!(split(&hdr, &p, 40, &mut out), Err(OffloadError::TooBig));
        assert!(split(&hdr, &p[..30], 1500, &mut out).is_err());
    }

    #[test]
    fn coalesce_roundtrips_split() {
        for v6 in [false, true] {
            let payload = data(20000);
            let (hdr, p) = tso_super(v6, &[], &payload, 1400, TCP_ACK | TCP_PSH);
            let mut out = vec![0u8; 70000];
            let s = split(&hdr, &p, 1500, &mut out).unwrap();
            let mut c = Batch::default();
            for seg in segments(&out, &s) {
                c.push(&seg).unwrap();
            }
            let (frames, writes) = c.finish();
            assert_eq!(writes.len(), 1, "{writes:?}");
            assert_eq!(writes[0].packets, s.count);
            let w = &frames[0][..];
            let h = VirtioNetHdr::parse(w).unwrap();
            assert_eq!(h.gso_size, 1400);
            assert_eq!(h.flags, virtio::F_NEEDS_CSUM);
            // Splitting the coalesced packet gives the same segments back.
            let mut again = vec![0u8; 70000];
            let s2 = split(&h, &w[virtio::LEN..], 1500, &mut again).unwrap();
            assert_eq!(s2, s);
            assert_eq!(&again[..s2.total_len()], &out[..s.total_len()]);
        }
    }

    #[test]
    fn must_not_coalesce() {
        let seg = |seq: u32, flags: u8, len: usize| tcp_packet(false, seq, flags, &[], &data(len));
        // (what, packets pushed, packets per resulting write)
        type Case = (&'static str, Vec<Vec<u8>>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (
                "gap in sequence",
                vec![seg(0, TCP_ACK, 100), seg(200, TCP_ACK, 100)],
                vec![1, 1],
            ),
            (
                "PSH closes",
                vec![seg(0, TCP_ACK | TCP_PSH, 100), seg(100, TCP_ACK, 100)],
                vec![1, 1],
            ),
            (
                "FIN",
                vec![seg(0, TCP_ACK, 100), seg(100, TCP_ACK | TCP_FIN, 100)],
                vec![1, 1],
            ),
            (
                "RST",
                vec![seg(0, TCP_ACK, 100), seg(100, TCP_RST | TCP_ACK, 100)],
                vec![1, 1],
            ),
            (
                "SYN",
                vec![seg(0, TCP_SYN, 0), seg(1, TCP_ACK, 100)],
                vec![1, 1],
            ),
            (
                "bigger after smaller",
                vec![seg(0, TCP_ACK, 100), seg(100, TCP_ACK, 200)],
                vec![1, 1],
            ),
            (
                "short closes",
                vec![
                    seg(0, TCP_ACK, 100),
                    seg(100, TCP_ACK, 50),
                    seg(150, TCP_ACK, 50),
                ],
                vec![2, 1],
            ),
            (
                "pure ACKs",
                vec![seg(0, TCP_ACK, 0), seg(0, TCP_ACK, 0)],
                vec![1, 1],
            ),
            (
                "three join",
                vec![
                    seg(0, TCP_ACK, 100),
                    seg(100, TCP_ACK, 100),
                    seg(200, TCP_ACK | TCP_PSH, 100),
                ],
                vec![3],
            ),
        ];
        for (what, pkts, want) in cases {
            let mut c = Batch::default();
            for p in &pkts {
                c.push(p).unwrap();
            }
            let (_, writes) = c.finish();
            let got: Vec<usize> = writes.iter().map(|w| w.packets).collect();
            assert_eq!(got, want, "{what}");
        }
        // Different flow (other port), IP options, different ack.
        let a = seg(0, TCP_ACK, 100);
        let mut b = seg(100, TCP_ACK, 100);
        b[20] = 1;
        refresh_tcp_checksums(&mut b);
        let mut d = seg(100, TCP_ACK, 100);
        d[28..32].copy_from_slice(&9u32.to_be_bytes());
        refresh_tcp_checksums(&mut d);
        let mut opt = tcp_packet(false, 100, TCP_ACK, &[], &data(100));
        opt.splice(20..20, [1u8, 1, 1, 0]);
        opt[0] = 0x46;
        let n = opt.len() as u16;
        opt[2..4].copy_from_slice(&n.to_be_bytes());
        refresh_tcp_checksums(&mut opt);
        for (what, second) in [("other port", b), ("other ack", d), ("IP options", opt)] {
            let mut c = Batch::default();
            c.push(&a).unwrap();
            c.push(&second).unwrap();
            let (_, writes) = c.finish();
            assert_eq!(writes.len(), 2, "{what}");
        }
    }

    #[test]
    fn corrupted_segments_are_refused_not_merged() {
        for v6 in [false, true] {
            let good = |seq: u32| tcp_packet(v6, seq, TCP_ACK, &[], &data(100));
            // A flipped payload bit (TCP checksum), and for IPv4 a flipped
            // TTL (header checksum): both refused, the rest still joins.
            let mut bad_payload = good(100);
            let last = bad_payload.len() - 1;
            bad_payload[last] ^= 0x01;
            let mut cases = vec![("payload", bad_payload)];
            if !v6 {
                let mut bad_ttl = good(100);
                bad_ttl[8] ^= 0x01;
                cases.push(("IPv4 header", bad_ttl));
            }
            for (what, bad) in cases {
                let mut c = Batch::default();
                c.push(&good(0)).unwrap();
                assert_eq!(c.push(&bad), Err(BadChecksum), "{what}");
                c.push(&good(100)).unwrap();
                c.push(&good(200)).unwrap();
                let (frames, writes) = c.finish();
                assert_eq!(writes.len(), 1, "{what}");
                assert_eq!(writes[0].packets, 3);
                assert_eq!(writes[0].bytes, 3 * good(0).len());
                // The merged payload is the good data, in order.
                let w = &frames[0][virtio::LEN..];
                let l4 = if v6 { 40 } else { 20 };
                assert_eq!(
                    &w[l4 + 20..],
                    &[data(100), data(100), data(100)].concat()[..]
                );
            }
        }
    }

    /// A super-packet is gathered (its headers, then every segment's
    /// payload straight from the buffer); a packet that joins nothing is
    /// one piece, copied behind its virtio-net header.
    #[test]
    fn super_packets_gather_lone_packets_are_one_piece() {
        let segs: Vec<Vec<u8>> = (0..3)
            .map(|i| tcp_packet(false, i * 100, TCP_ACK, &[], &data(100)))
            .collect();
        let lone = udp_packet(false, &data(10));
        let mut buf = Vec::new();
        let mut at = Vec::new();
        for p in segs.iter().chain([&lone]) {
            at.push(buf.len()..buf.len() + p.len());
            buf.extend_from_slice(p);
        }
        let mut c = Coalescer::new();
        for r in &at {
            c.push(&buf, r.clone()).unwrap();
        }
        let writes = c.finish(&buf).to_vec();
        assert_eq!(writes.len(), 2);
        let pieces = c.pieces(&writes[0]);
        assert_eq!(pieces.len(), 4, "{pieces:?}");
        assert!(matches!(&pieces[0], Piece::Header(r) if r.len() == virtio::LEN + 40));
        for (p, r) in pieces[1..].iter().zip(&at) {
            assert_eq!(p, &Piece::Buffer(r.start + 40..r.end));
        }
        let pieces = c.pieces(&writes[1]);
        assert!(
            matches!(pieces, [Piece::Header(r)] if r.len() == virtio::LEN + lone.len()),
            "{pieces:?}"
        );
        assert_eq!(&c.frame(&writes[1], &buf)[virtio::LEN..], &lone[..]);
    }

    #[test]
    fn non_tcp_passes_through_in_order() {
        let u = udp_packet(false, &data(10));
        let t1 = tcp_packet(false, 0, TCP_ACK, &[], &data(100));
        let t2 = tcp_packet(false, 100, TCP_ACK, &[], &data(100));
        let mut c = Batch::default();
        c.push(&t1).unwrap();
        c.push(&u).unwrap();
        c.push(&t2).unwrap();
        let (frames, writes) = c.finish();
        assert_eq!(
            writes.len(),
            3,
            "the UDP packet splits the flow: no reordering"
        );
        for (f, orig) in frames.iter().zip([&t1, &u, &t2]) {
            assert_eq!(&f[virtio::LEN..], &orig[..]);
            assert_eq!(VirtioNetHdr::parse(f).unwrap(), VirtioNetHdr::default());
        }
    }
}

/// Bounded property tests (fuzzing with shrinking): `PROPTEST_CASES`
/// raises the count for a longer run.
#[cfg(test)]
mod props {
    use super::tests::{Batch, tcp_packet, verify};
    use super::*;
    use proptest::prelude::*;

    /// The virtio-net header of a TCP super-packet with `options_len` bytes
    /// of TCP options, cut every `mss` bytes.
    fn tcp_tso_hdr(v6: bool, options_len: usize, mss: u16) -> VirtioNetHdr {
        let l4 = if v6 { 40 } else { 20 };
        VirtioNetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: if v6 {
                virtio::GSO_TCPV6
            } else {
                virtio::GSO_TCPV4
            },
            hdr_len: (l4 + 20 + options_len) as u16,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: 16,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes under any header: split never panics, and every
        /// segment it emits for a GSO type fits the MTU and verifies.
        #[test]
        fn split_arbitrary_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            hdr_bytes in proptest::array::uniform10(any::<u8>()),
            mtu in 60usize..2000,
        ) {
            let hdr = VirtioNetHdr::parse(&hdr_bytes).unwrap();
            let mut out = vec![0u8; 70000];
            if let Ok(s) = split(&hdr, &bytes, mtu, &mut out) {
                prop_assert!(s.last_len <= s.seg_len);
                if hdr.gso_kind() != virtio::GSO_NONE {
                    for r in s.ranges() {
                        prop_assert!(r.len() <= mtu);
                        verify(&out[r]);
                    }
                }
            }
        }

        /// A valid TSO super-packet: split yields MTU-sized, valid segments
        /// whose payload is the original, and coalescing them gives back one
        /// super-packet that splits into the same segments.
        #[test]
        fn split_then_coalesce_roundtrip(
            v6 in any::<bool>(),
            ts in any::<bool>(),
            len in 1usize..30000,
            mss in 100u16..1500,
            mtu in 600usize..1600,
            seq in any::<u32>(),
        ) {
            let options: &[u8] = if ts { &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7] } else { &[] };
            let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut p = tcp_packet(v6, seq, 0x10, options, &payload);
            let l4 = if v6 { 40 } else { 20 };
            let info = ip_info(&p).unwrap();
            let partial = fold_partial(pseudo_header_sum(info.src, info.dst, 6, p.len() - l4));
            p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
            let hdr = tcp_tso_hdr(v6, options.len(), mss);
            let mut out = vec![0u8; 70000];
            let s = split(&hdr, &p, mtu, &mut out).unwrap();
            let headers = l4 + 20 + options.len();
            let mut rebuilt = Vec::new();
            for r in s.ranges() {
                prop_assert!(r.len() <= mtu);
                verify(&out[r.clone()]);
                rebuilt.extend_from_slice(&out[r.start + headers..r.end]);
            }
            prop_assert_eq!(&rebuilt, &payload);

            let mut c = Batch::default();
            for r in s.ranges() {
                c.push(&out[r]).unwrap();
            }
            // One write per MAX_JOINED segments; splitting each again
            // gives the same datagrams back, byte for byte.
            let (frames, writes) = c.finish();
            prop_assert_eq!(writes.len(), s.count.div_ceil(MAX_JOINED));
            let mut wire = Vec::new();
            for (f, w) in frames.iter().zip(&writes) {
                let h = VirtioNetHdr::parse(f).unwrap();
                let mut again = vec![0u8; 70000];
                let s2 = split(&h, &f[virtio::LEN..], mtu, &mut again).unwrap();
                prop_assert_eq!(s2.count, w.packets);
                wire.extend_from_slice(&again[..s2.total_len()]);
            }
            prop_assert_eq!(&wire[..], &out[..s.total_len()]);
        }

        /// The gather split writes only headers, yet its datagrams (headers
        /// followed by payload slices of the super-packet) are byte for byte
        /// those of the copying split, for TCP and UDP, both IP versions.
        #[test]
        fn gather_split_is_byte_identical(
            v6 in any::<bool>(),
            udp in any::<bool>(),
            ts in any::<bool>(),
            len in 1usize..20000,
            mss in 100u16..1500,
            mtu in 600usize..1600,
            seq in any::<u32>(),
        ) {
            let options: &[u8] = if ts && !udp { &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7] } else { &[] };
            let payload: Vec<u8> = (0..len).map(|i| (i * 29 + 5) as u8).collect();
            let l4 = if v6 { 40 } else { 20 };
            let (p, hdr) = if udp {
                let p = super::tests::udp_packet(v6, &payload);
                let hdr = VirtioNetHdr {
                    flags: virtio::F_NEEDS_CSUM,
                    gso_type: virtio::GSO_UDP_L4,
                    hdr_len: (l4 + 8) as u16,
                    gso_size: mss,
                    csum_start: l4 as u16,
                    csum_offset: 6,
                };
                (p, hdr)
            } else {
                let p = tcp_packet(v6, seq, 0x18, options, &payload);
                let hdr = tcp_tso_hdr(v6, options.len(), mss);
                (p, hdr)
            };
            let mut out = vec![0u8; 70000];
            let s = split(&hdr, &p, mtu, &mut out).unwrap();
            let mut pkt = p.clone();
            let mut headers = vec![0u8; 70000];
            let Gathered::Segments(g) = split_gather(&hdr, &mut pkt, mtu, &mut headers).unwrap() else {
                panic!("a super-packet");
            };
            prop_assert_eq!(g.count, s.count);
            prop_assert_eq!(g.seg_len(), s.seg_len);
            prop_assert_eq!(g.total_len(), s.total_len());
            let mut wire = Vec::new();
            for i in 0..g.count {
                wire.extend_from_slice(&headers[g.headers(i)]);
                wire.extend_from_slice(&pkt[g.payload(i)]);
            }
            prop_assert_eq!(&wire[..], &out[..s.total_len()]);
            prop_assert_eq!(&pkt, &p, "the super-packet is left as it was");
        }

        /// Arbitrary packets into the coalescer: no panic, every packet is
        /// accounted for exactly once, writes are in order and contiguous.
        #[test]
        fn coalescer_arbitrary_packets(
            pkts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
            seqs in proptest::collection::vec(0u32..4, 0..20),
        ) {
            let mut c = Batch::default();
            let mut pushed = 0;
            for (i, p) in pkts.iter().enumerate() {
                // Arbitrary bytes: a TCP-looking segment with bad checksums
                // is refused and must leave no trace.
                if c.push(p).is_ok() {
                    pushed += 1;
                }
                // Interleave valid 100-byte segments whose sequence numbers
                // sometimes line up, so joins happen too.
                if let Some(&s) = seqs.get(i) {
                    c.push(&tcp_packet(false, s * 100, 0x10, &[], &[p.len() as u8; 100])).unwrap();
                    pushed += 1;
                }
            }
            let (frames, writes) = c.finish();
            let total: usize = writes.iter().map(|w| w.packets).sum();
            prop_assert_eq!(total, pushed);
            // The writes' pieces follow each other, each write has its
            // header piece and at most MAX_WRITE_PIECES.
            let mut at = 0;
            for (w, f) in writes.iter().zip(&frames) {
                prop_assert_eq!(w.pieces.start, at);
                prop_assert!(!w.pieces.is_empty() && w.pieces.len() <= MAX_WRITE_PIECES);
                prop_assert!(f.len() >= virtio::LEN);
                at = w.pieces.end;
            }
        }
    }
}
