//! The forwarding core: bytes in, decisions out.
//!
//! The datapath hands every packet to [`Forwarder`] and acts on the
//! returned [`TunVerdict`] or [`PeerVerdict`]. The core does no I/O, holds no clock and keeps no
//! per-packet state, so it is unit-tested and fuzzed without root, and both
//! engines behave identically by construction.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::encap::{Encap, Inner};
use crate::packet::{IpPacket, ParseError};
use crate::peers::{PeerId, PeerTable};
use crate::types::{DropReason, Prefix, canonical};

/// What becomes of a packet read from the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunVerdict {
    /// Send it to the peer (in one UDP datagram, behind the encapsulation
    /// header if there is one).
    ToPeer,
    /// Reflect mode: the packet was rewritten in place into its answer;
    /// write it back into the TUN device.
    Reflect,
    /// Drop it and count it under this reason.
    Drop(DropReason),
}

/// What becomes of a datagram received from the network. Nothing that came
/// from the network goes back to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerVerdict {
    /// Write the packet (the datagram without its encapsulation header) to
    /// the TUN device.
    ToTun,
    /// Drop it and count it under this reason.
    Drop(DropReason),
}

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Empty => DropReason::Empty,
            ParseError::Truncated => DropReason::Truncated,
            ParseError::BadVersion => DropReason::BadVersion,
            ParseError::BadHeaderLength => DropReason::BadHeaderLength,
            ParseError::LengthMismatch => DropReason::LengthMismatch,
        }
    }
}

/// The per-worker forwarding policy: how packets are carried
/// ([`Encap`]), who the peers are (and which inner addresses each owns),
/// how large a packet may be, and which inner sources are accepted.
#[derive(Clone, Debug)]
pub struct Forwarder {
    mtu: usize,
    peers: Arc<PeerTable>,
    /// The worker's queue: it talks to each peer's port + `port_offset`,
    /// which is the queue, or 0 where every queue shares one port.
    queue: u16,
    port_offset: u16,
    /// The worker's socket is IPv6: IPv4 peers are `::ffff:a.b.c.d` to it.
    v6_socket: bool,
    encap: Encap,
    /// `--allow-src`: inner source prefixes accepted from the peer (empty:
    /// any).
    allowed_src: Vec<Prefix>,
    /// A reflector: answers packets from the device, accepts nothing from
    /// the network.
    reflect: bool,
}

impl Forwarder {
    /// `mtu` is the largest inner IP packet in bytes; `peer` the only UDP
    /// source whose datagrams reach the TUN device, and where every packet
    /// goes (a point-to-point tunnel).
    pub fn new(mtu: usize, peer: SocketAddr) -> Self {
        Forwarder::with_encap(mtu, Arc::new(PeerTable::single(peer, false)), Encap::Ip)
    }

    fn with_encap(mtu: usize, peers: Arc<PeerTable>, encap: Encap) -> Self {
        Forwarder {
            mtu,
            peers,
            queue: 0,
            port_offset: 0,
            v6_socket: false,
            encap,
            allowed_src: Vec::new(),
            reflect: false,
        }
    }

    /// The forwarder for a configured mode, talking to `peers`.
    pub fn for_mode(mode: &crate::config::Mode, mtu: usize, peers: Arc<PeerTable>) -> Self {
        use crate::config::Mode;
        let mut f = Forwarder::with_encap(mtu, peers, mode.encap());
        match mode {
            Mode::Tun { allowed_src } => f.allowed_src = allowed_src.clone(),
            Mode::Reflect => f.reflect = true,
            Mode::Tap { .. } | Mode::WireGuard { .. } => {}
        }
        f
    }

    /// Talks to the peers of `table` (TAP mode: one, matched by address).
    pub fn with_peers(mut self, table: Arc<PeerTable>) -> Self {
        self.peers = table;
        self
    }

    /// Replaces the peer table (a reload); nothing else changes.
    pub fn set_peers(&mut self, table: Arc<PeerTable>) {
        self.peers = table;
    }

    pub fn peers(&self) -> &Arc<PeerTable> {
        &self.peers
    }

    /// The worker of TUN queue `queue`: it talks to every peer's port +
    /// `queue`.
    pub fn with_queue(mut self, queue: usize) -> Self {
        self.queue = u16::try_from(queue).unwrap_or(u16::MAX);
        self.port_offset = self.queue;
        self
    }

    /// Every queue binds the one port (and reaches each peer's own port):
    /// no port arithmetic.
    pub fn sharing_port(mut self) -> Self {
        self.port_offset = 0;
        self
    }

    /// The worker's UDP socket is bound to `local` (an IPv6 socket reaches
    /// IPv4 peers as `::ffff:a.b.c.d`).
    pub fn set_socket(&mut self, local: SocketAddr) {
        self.v6_socket = local.is_ipv6();
    }

    /// The queue this forwarder's worker serves.
    pub fn queue(&self) -> usize {
        usize::from(self.queue)
    }

    /// Accept from the peer only packets whose source address is inside one
    /// of `prefixes` (`--allow-src`, like WireGuard's AllowedIPs); the rest
    /// are dropped as `source_not_allowed`. Empty: any source. Only where
    /// IP packets are carried.
    pub fn with_allowed_sources(mut self, prefixes: Vec<Prefix>) -> Self {
        if self.encap.carries_ip() {
            self.allowed_src = prefixes;
        }
        self
    }

    /// TAP mode: Ethernet frames (up to `mtu` + 18 bytes: header and a
    /// VLAN tag) carried in VXLAN with network identifier `vni`. The engine
    /// writes [`Forwarder::encap_len`] header bytes in front of every frame
    /// it sends ([`Forwarder::write_encap`]) and strips as many from every
    /// datagram it writes to the device.
    pub fn vxlan(mtu: usize, peer: SocketAddr, vni: u32) -> Self {
        Forwarder::with_encap(
            mtu,
            Arc::new(PeerTable::single(peer, true)),
            Encap::Vxlan { vni },
        )
    }

    /// How packets are carried.
    pub fn encap(&self) -> Encap {
        self.encap
    }

    /// Bytes of encapsulation before each packet on the wire.
    pub fn encap_len(&self) -> usize {
        self.encap.header_len()
    }

    /// The largest packet or frame the device hands over or accepts
    /// ([`Encap::max_inner_len`]).
    pub fn max_frame_len(&self) -> usize {
        self.encap.max_inner_len(self.mtu)
    }

    /// The largest datagram accepted from the peer: a largest frame behind
    /// the encapsulation header. Receive buffers are sized from this.
    pub fn max_datagram_len(&self) -> usize {
        self.encap.max_datagram_len(self.mtu)
    }

    /// Writes the encapsulation header into `out[..encap_len()]`.
    pub fn write_encap(&self, out: &mut [u8]) {
        self.encap.write_header(out);
    }

    /// A reflector (`tunfwd reflect`): packets from the TUN device are
    /// answered back into it (see [`crate::reflect`]); nothing is accepted
    /// from the network (`peer` only names the unused socket's partner).
    pub fn reflector(mtu: usize, peer: SocketAddr) -> Self {
        let mut f = Forwarder::new(mtu, peer);
        f.reflect = true;
        f
    }

    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Where datagrams to peer `id` go from this worker's socket: its port
    /// plus the queue (unless the queues share a port), an IPv4 peer mapped
    /// for an IPv6 socket.
    #[inline]
    pub fn peer_addr(&self, id: PeerId) -> SocketAddr {
        let mut a = self.peers.peer(id).addr;
        if self.port_offset > 0 && a.port() != 0 {
            a.set_port(a.port().saturating_add(self.port_offset));
        }
        match a {
            SocketAddr::V4(v4) if self.v6_socket => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            a => a,
        }
    }

    /// The peer a packet read from the TUN device goes to: the longest
    /// prefix holding its destination (IP packets; the one peer
    /// otherwise). The packet passed [`Forwarder::handle_from_tun`].
    #[inline]
    pub fn route(&self, packet: &[u8]) -> Result<PeerId, DropReason> {
        if self.encap.carries_ip() && !self.reflect {
            self.peers.route_packet(packet).ok_or(DropReason::NoRoute)
        } else {
            Ok(0)
        }
    }

    /// True if packets from the peer are IP packets, which an AQM can
    /// mark.
    pub fn carries_ip(&self) -> bool {
        self.encap.carries_ip() && !self.reflect
    }

    /// A packet the kernel routed into the TUN device (a frame, in TAP
    /// mode), checked for forwarding. A reflector answers packets, which
    /// needs [`Forwarder::handle_from_tun_mut`].
    pub fn handle_from_tun(&self, packet: &[u8]) -> TunVerdict {
        match self.encap.check_inner(packet, self.mtu) {
            Ok(_) => TunVerdict::ToPeer,
            Err(reason) => TunVerdict::Drop(reason),
        }
    }

    /// A packet from the TUN device that the verdict may rewrite in place
    /// (the reflector answers it); otherwise as [`Forwarder::handle_from_tun`].
    pub fn handle_from_tun_mut(&self, packet: &mut [u8]) -> TunVerdict {
        if !self.reflect {
            return self.handle_from_tun(packet);
        }
        if let Err(reason) = self.encap.check_inner(packet, self.mtu) {
            return TunVerdict::Drop(reason);
        }
        match crate::reflect::reflect(packet) {
            Ok(()) => TunVerdict::Reflect,
            Err(_) => TunVerdict::Drop(DropReason::NotReflected),
        }
    }

    /// A datagram received on the UDP socket from `src`.
    pub fn handle_from_peer(&self, src: SocketAddr, datagram: &[u8]) -> PeerVerdict {
        self.handle_from(self.source_peer(src), datagram)
    }

    /// A datagram from `peer` (as [`Forwarder::source_peer`] found it; None:
    /// from no peer).
    pub fn handle_from(&self, peer: Option<PeerId>, datagram: &[u8]) -> PeerVerdict {
        match self.accept(peer, datagram) {
            Ok(()) => PeerVerdict::ToTun,
            Err(reason) => PeerVerdict::Drop(reason),
        }
    }

    fn accept(&self, peer: Option<PeerId>, datagram: &[u8]) -> Result<(), DropReason> {
        let peer = peer
            .filter(|_| !self.reflect)
            .ok_or(DropReason::NotFromPeer)?;
        let inner = self.encap.open(datagram)?;
        match self.encap.check_inner(inner, self.mtu)? {
            Inner::Ip(p) if !source_allowed(&self.allowed_src, &p) => {
                Err(DropReason::SourceNotAllowed)
            }
            Inner::Ip(p) if !self.peers.accepts(peer, p.src()) => Err(DropReason::SourceNotAllowed),
            Inner::Ip(_) | Inner::Frame => Ok(()),
        }
    }

    /// A packet opened from `peer`'s WireGuard message: well-formed, within
    /// the MTU, and from an inner source in the peer's AllowedIPs.
    pub fn check_opened(&self, peer: PeerId, packet: &[u8]) -> Result<(), DropReason> {
        match self.encap.check_inner(packet, self.mtu)? {
            Inner::Ip(p) if self.peers.accepts(peer, p.src()) => Ok(()),
            _ => Err(DropReason::SourceNotAllowed),
        }
    }

    /// The peer a datagram from `src` came from: its address and, where the
    /// way of carrying fixes it ([`Encap::fixed_source_port`]), its port
    /// (the peer's port + this worker's queue, unless the queues share a
    /// port).
    #[inline]
    pub fn source_peer(&self, src: SocketAddr) -> Option<PeerId> {
        let mut src = canonical(src);
        if self.port_offset > 0 && self.encap.fixed_source_port() {
            src.set_port(src.port().checked_sub(self.port_offset)?);
        }
        self.peers.find(src)
    }

    /// True if `src` is a peer's address (see [`Forwarder::source_peer`]).
    pub fn is_peer(&self, src: SocketAddr) -> bool {
        self.source_peer(src).is_some()
    }
}

/// `--allow-src`: true if no prefixes are set or one holds the source.
fn source_allowed(allowed: &[Prefix], packet: &IpPacket<'_>) -> bool {
    allowed.is_empty() || {
        let src = packet.src();
        allowed.iter().any(|prefix| prefix.contains(src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ip::tests::{ipv4_udp, ipv6_udp};

    fn fwd() -> Forwarder {
        Forwarder::new(1400, "198.18.0.2:5000".parse().unwrap())
    }

    const PEER: &str = "198.18.0.2:5000";

    #[test]
    fn tun_to_peer_both_versions() {
        assert_eq!(fwd().handle_from_tun(&ipv4_udp(100)), TunVerdict::ToPeer);
        assert_eq!(fwd().handle_from_tun(&ipv6_udp(100)), TunVerdict::ToPeer);
    }

    #[test]
    fn peer_to_tun_both_versions() {
        let peer = PEER.parse().unwrap();
        assert_eq!(
            fwd().handle_from_peer(peer, &ipv4_udp(100)),
            PeerVerdict::ToTun
        );
        assert_eq!(
            fwd().handle_from_peer(peer, &ipv6_udp(100)),
            PeerVerdict::ToTun
        );
    }

    #[test]
    fn mtu_is_inclusive() {
        let peer = PEER.parse().unwrap();
        let at_mtu = ipv4_udp(1400 - 28);
        let over = ipv6_udp(1400 - 48 + 1);
        assert_eq!(fwd().handle_from_tun(&at_mtu), TunVerdict::ToPeer);
        assert_eq!(fwd().handle_from_peer(peer, &at_mtu), PeerVerdict::ToTun);
        assert_eq!(
            fwd().handle_from_tun(&over),
            TunVerdict::Drop(DropReason::OverMtu)
        );
        assert_eq!(
            fwd().handle_from_peer(peer, &over),
            PeerVerdict::Drop(DropReason::OverMtu)
        );
    }

    #[test]
    fn not_from_peer() {
        let f = fwd();
        for src in ["198.18.0.2:5001", "198.18.0.3:5000", "[2001:db8::2]:5000"] {
            assert_eq!(
                f.handle_from_peer(src.parse().unwrap(), &ipv4_udp(10)),
                PeerVerdict::Drop(DropReason::NotFromPeer),
                "{src}"
            );
        }
    }

    #[test]
    fn allowed_sources() {
        let peer = PEER.parse().unwrap();
        let mut v4 = ipv4_udp(20);
        let mut v6 = ipv6_udp(20);
        let f = fwd().with_allowed_sources(vec![
            "198.19.0.0/24".parse().unwrap(),
            "2001:db8:19::/48".parse().unwrap(),
        ]);
        // Inside the prefixes: through, unchanged.
        v4[12..16].copy_from_slice(&[198, 19, 0, 2]);
        v6[8..24].copy_from_slice(
            &"2001:db8:19::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(f.handle_from_peer(peer, &v4), PeerVerdict::ToTun);
        assert_eq!(f.handle_from_peer(peer, &v6), PeerVerdict::ToTun);
        // Spoofed sources: dropped and counted as such.
        v4[12..16].copy_from_slice(&[198, 19, 1, 2]);
        v6[8..24].copy_from_slice(
            &"2001:db8:20::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(
            f.handle_from_peer(peer, &v4),
            PeerVerdict::Drop(DropReason::SourceNotAllowed)
        );
        assert_eq!(
            f.handle_from_peer(peer, &v6),
            PeerVerdict::Drop(DropReason::SourceNotAllowed)
        );
        // Malformed packets keep their own reason; the TUN direction and an
        // empty list are not filtered.
        assert_eq!(
            f.handle_from_peer(peer, &[0x45, 0, 0]),
            PeerVerdict::Drop(DropReason::Truncated)
        );
        assert_eq!(f.handle_from_tun(&v4), TunVerdict::ToPeer);
        assert_eq!(fwd().handle_from_peer(peer, &v4), PeerVerdict::ToTun);
        // An IPv4-only list refuses every IPv6 source.
        let only4 = fwd().with_allowed_sources(vec!["0.0.0.0/0".parse().unwrap()]);
        assert_eq!(only4.handle_from_peer(peer, &v4), PeerVerdict::ToTun);
        assert_eq!(
            only4.handle_from_peer(peer, &v6),
            PeerVerdict::Drop(DropReason::SourceNotAllowed)
        );
    }

    #[test]
    fn destinations_per_queue_and_socket_family() {
        let peer: SocketAddr = PEER.parse().unwrap();
        let mut f = fwd().with_queue(2);
        assert_eq!(f.peer_addr(0), "198.18.0.2:5002".parse().unwrap());
        f.set_socket("[::]:5000".parse().unwrap());
        assert_eq!(f.peer_addr(0), "[::ffff:198.18.0.2]:5002".parse().unwrap());
        // Queue 2 hears from the peer's port + 2 only.
        assert_eq!(f.source_peer("198.18.0.2:5002".parse().unwrap()), Some(0));
        assert_eq!(f.source_peer(peer), None);
        assert_eq!(f.source_peer("198.18.0.2:1".parse().unwrap()), None);
        // Queues sharing one port: the peer's own port, both ways, and the
        // worker keeps its queue (its per-peer counters).
        let shared = fwd().with_queue(2).sharing_port();
        assert_eq!(shared.queue(), 2);
        assert_eq!(shared.peer_addr(0), peer);
        assert_eq!(shared.source_peer(peer), Some(0));
        assert_eq!(shared.source_peer("198.18.0.2:5002".parse().unwrap()), None);
        // TAP: any port of the address.
        let tap = Forwarder::vxlan(1450, peer, 42).with_queue(1);
        assert_eq!(
            tap.source_peer("198.18.0.2:40000".parse().unwrap()),
            Some(0)
        );
    }

    #[test]
    fn routes_and_filters_by_peer_prefixes() {
        use crate::peers::{PeerSpec, PeerTable};
        let specs: Vec<PeerSpec> = [
            "198.18.0.11:5000=198.19.0.11/32,2001:db8:19::11/128",
            "198.18.0.12:5000=198.19.0.12/32,198.19.1.0/24",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let f = fwd().with_peers(Arc::new(PeerTable::build(&specs, 1, false, None).unwrap()));
        let mut to12 = ipv4_udp(10);
        to12[16..20].copy_from_slice(&[198, 19, 1, 7]);
        assert_eq!(f.route(&to12), Ok(1));
        let mut nowhere = ipv4_udp(10);
        nowhere[16..20].copy_from_slice(&[198, 19, 2, 7]);
        assert_eq!(f.route(&nowhere), Err(DropReason::NoRoute));
        let mut to11 = ipv6_udp(10);
        to11[24..40].copy_from_slice(
            &"2001:db8:19::11"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(f.route(&to11), Ok(0));
        // From spoke 12 with its own source, then with spoke 11's.
        let s12: SocketAddr = "198.18.0.12:5000".parse().unwrap();
        let mut from12 = ipv4_udp(10);
        from12[12..16].copy_from_slice(&[198, 19, 0, 12]);
        assert_eq!(f.handle_from_peer(s12, &from12), PeerVerdict::ToTun);
        from12[12..16].copy_from_slice(&[198, 19, 0, 11]);
        assert_eq!(
            f.handle_from_peer(s12, &from12),
            PeerVerdict::Drop(DropReason::SourceNotAllowed)
        );
        assert_eq!(
            f.handle_from_peer(PEER.parse().unwrap(), &from12),
            PeerVerdict::Drop(DropReason::NotFromPeer)
        );
    }

    #[test]
    fn not_from_peer_wins_over_malformed() {
        // A stranger's garbage is counted as a stranger, not as garbage.
        let src = "198.18.0.9:5000".parse().unwrap();
        assert_eq!(
            fwd().handle_from_peer(src, &[]),
            PeerVerdict::Drop(DropReason::NotFromPeer)
        );
    }

    #[test]
    fn ipv4_mapped_peer_matches() {
        let f = Forwarder::new(1400, "[::ffff:198.18.0.2]:5000".parse().unwrap());
        let src = PEER.parse().unwrap();
        assert_eq!(f.handle_from_peer(src, &ipv4_udp(1)), PeerVerdict::ToTun);
        let f = fwd();
        let src = "[::ffff:198.18.0.2]:5000".parse().unwrap();
        assert_eq!(f.handle_from_peer(src, &ipv4_udp(1)), PeerVerdict::ToTun);
    }

    #[test]
    fn ipv6_peer() {
        let f = Forwarder::new(1400, "[2001:db8::2]:5000".parse().unwrap());
        let src = "[2001:db8::2]:5000".parse().unwrap();
        assert_eq!(f.handle_from_peer(src, &ipv6_udp(1)), PeerVerdict::ToTun);
    }

    #[test]
    fn every_parse_drop_reason_both_directions() {
        let peer = PEER.parse().unwrap();
        let mut bad_ihl = ipv4_udp(10);
        bad_ihl[0] = 0x44;
        let mut long = ipv4_udp(10);
        long.push(0);
        let mut long6 = ipv6_udp(10);
        long6.push(0);
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            (vec![], DropReason::Empty),
            (vec![0x45; 10], DropReason::Truncated),
            (ipv6_udp(0)[..30].to_vec(), DropReason::Truncated),
            (vec![0x35; 40], DropReason::BadVersion),
            (bad_ihl, DropReason::BadHeaderLength),
            (long, DropReason::LengthMismatch),
            (long6, DropReason::LengthMismatch),
            (ipv4_udp(2000), DropReason::OverMtu),
        ];
        for (bytes, reason) in cases {
            assert_eq!(
                fwd().handle_from_tun(&bytes),
                TunVerdict::Drop(reason),
                "tun {reason}"
            );
            assert_eq!(
                fwd().handle_from_peer(peer, &bytes),
                PeerVerdict::Drop(reason),
                "peer {reason}"
            );
        }
    }

    #[test]
    fn reason_names_and_indices_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
        }
    }
}

#[cfg(test)]
mod vxlan_tests {
    use super::*;

    #[test]
    fn tap_mode_checks_frames_and_vxlan() {
        let peer: SocketAddr = "198.18.0.2:4789".parse().unwrap();
        let f = Forwarder::vxlan(1450, peer, 42);
        assert_eq!(f.encap_len(), 8);
        let frame = vec![0xaa; 60];
        assert_eq!(f.handle_from_tun(&frame), TunVerdict::ToPeer);
        assert_eq!(
            f.handle_from_tun(&frame[..10]),
            TunVerdict::Drop(DropReason::Truncated)
        );
        assert_eq!(
            f.handle_from_tun(&vec![0; 1450 + 19]),
            TunVerdict::Drop(DropReason::OverMtu)
        );
        let mut d = vec![0u8; 8];
        f.write_encap(&mut d);
        d.extend_from_slice(&frame);
        assert_eq!(f.handle_from_peer(peer, &d), PeerVerdict::ToTun);
        let other = Forwarder::vxlan(1450, peer, 43);
        assert_eq!(
            other.handle_from_peer(peer, &d),
            PeerVerdict::Drop(DropReason::WrongVni)
        );
        let mut bad = d.clone();
        bad[0] = 0;
        assert_eq!(
            f.handle_from_peer(peer, &bad),
            PeerVerdict::Drop(DropReason::BadVxlan)
        );
        assert_eq!(
            f.handle_from_peer(peer, &d[..20]),
            PeerVerdict::Drop(DropReason::Truncated)
        );
        let stranger: SocketAddr = "198.18.0.9:4789".parse().unwrap();
        assert_eq!(
            f.handle_from_peer(stranger, &d),
            PeerVerdict::Drop(DropReason::NotFromPeer)
        );
        // Any source port of the peer's address (VXLAN source-port entropy).
        let other_port: SocketAddr = "198.18.0.2:53123".parse().unwrap();
        assert_eq!(f.handle_from_peer(other_port, &d), PeerVerdict::ToTun);
        // A TUN-mode forwarder has no encapsulation.
        assert_eq!(Forwarder::new(1450, peer).encap_len(), 0);
    }
}
