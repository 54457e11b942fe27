//! Ways of carrying a packet in a UDP datagram: what differs between them,
//! and nothing else. The forwarding policy ([`crate::forward`]) and the
//! datapath ask an [`Encap`] how long its header is, how large a datagram
//! gets for an MTU, what to write in front of a packet, and what to check
//! and strip from a datagram; they never match on the way itself.
//!
//! - [`Encap::Ip`]: one IP packet per datagram, nothing added (the format
//!   of `socat TUN:... UDP:...` and of Linux FOU direct encapsulation).
//! - [`Encap::Vxlan`]: one Ethernet frame behind the 8-byte VXLAN header
//!   (RFC 7348), so a Linux `vxlan` device is a peer.
//! - [`Encap::WireGuard`]: one IP packet, padded and sealed, in a
//!   WireGuard data message (a 16-byte header in front, a 16-byte tag
//!   behind). The keys and sessions are per peer ([`Encap::per_peer_state`]):
//!   the datapath seals and opens through `crate::wg::Device`, so
//!   [`Encap::write_header`] and [`Encap::open`] do not apply to it.
//!
//! Adding a way: a variant here, its cases in these few functions, and
//! (for a way with keys and sessions) the per-peer state the datapath keeps
//! where [`Encap::per_peer_state`] says so.

use crate::packet::IpPacket;
use crate::packet::vxlan::{self, VxlanError};
use crate::types::DropReason;

/// A way of carrying packets over UDP; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// IP packets, nothing added.
    Ip,
    /// Ethernet frames behind a VXLAN header with this network identifier.
    Vxlan { vni: u32 },
    /// IP packets sealed in WireGuard data messages.
    WireGuard,
}

/// A packet or frame that passed [`Encap::check_inner`]: an IP packet
/// (whose addresses the policy may look at), or an Ethernet frame.
#[derive(Clone, Copy, Debug)]
pub enum Inner<'a> {
    Ip(IpPacket<'a>),
    Frame,
}

impl Encap {
    /// Bytes written in front of each packet on the wire.
    pub fn header_len(&self) -> usize {
        match self {
            Encap::Ip => 0,
            Encap::Vxlan { .. } => vxlan::HEADER_LEN,
            Encap::WireGuard => crate::wg::device::HEADER_LEN,
        }
    }

    /// Bytes a sealed packet may grow behind its end, and room a read
    /// buffer needs there: WireGuard's tag (padding stays within the MTU),
    /// and enough for a handshake initiation to be written in its place.
    pub fn trailer_room(&self, mtu: usize) -> usize {
        match self {
            Encap::Ip | Encap::Vxlan { .. } => 0,
            Encap::WireGuard => {
                let tag = crate::wg::device::OVERHEAD - crate::wg::device::HEADER_LEN;
                let initiation = crate::wg::device::MAX_HANDSHAKE_LEN;
                tag.max(initiation.saturating_sub(self.header_len() + mtu))
            }
        }
    }

    /// The largest packet or frame the device hands over or accepts for an
    /// inner `mtu`: the MTU, plus an Ethernet header and one VLAN tag for
    /// frames.
    pub fn max_inner_len(&self, mtu: usize) -> usize {
        match self {
            Encap::Ip | Encap::WireGuard => mtu,
            Encap::Vxlan { .. } => mtu + vxlan::ETH_HEADER_LEN + 4,
        }
    }

    /// The largest datagram for an inner `mtu`: a largest packet behind
    /// the header (and WireGuard's tag; at least a handshake initiation).
    /// Receive buffers are sized from this.
    pub fn max_datagram_len(&self, mtu: usize) -> usize {
        match self {
            Encap::Ip | Encap::Vxlan { .. } => self.header_len() + self.max_inner_len(mtu),
            Encap::WireGuard => {
                (crate::wg::device::OVERHEAD + mtu).max(crate::wg::device::MAX_HANDSHAKE_LEN)
            }
        }
    }

    /// True if what it carries are IP packets (which routing by inner
    /// address, source filters, queue management and offload look into).
    pub fn carries_ip(&self) -> bool {
        matches!(self, Encap::Ip | Encap::WireGuard)
    }

    /// True if a peer sends from one fixed UDP port (the one it listens
    /// on). VXLAN senders pick the source port from a flow hash (RFC
    /// 7348): only the address identifies them.
    pub fn fixed_source_port(&self) -> bool {
        matches!(self, Encap::Ip)
    }

    /// True if the way keeps state per peer (keys, sessions, counters of
    /// its own) that the datapath must hold: WireGuard.
    pub fn per_peer_state(&self) -> bool {
        matches!(self, Encap::WireGuard)
    }

    /// True if the outer header carries the packet's ECN bits, both ways
    /// (WireGuard, as the kernel's does: [`crate::packet::ecn`]). The
    /// plain ways leave the outer TOS byte 0 and ignore it on arrival, as
    /// socat and Linux FOU do.
    pub fn carries_ecn(&self) -> bool {
        matches!(self, Encap::WireGuard)
    }

    /// Writes the header into `out[..header_len()]` (WireGuard's is
    /// written when the packet is sealed).
    pub fn write_header(&self, out: &mut [u8]) {
        match self {
            Encap::Ip | Encap::WireGuard => {}
            Encap::Vxlan { vni } => vxlan::write_header(out, *vni),
        }
    }

    /// Checks the header of a received `datagram` and returns what it
    /// carries (the datagram without its header).
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], DropReason> {
        match self {
            Encap::Ip => Ok(datagram),
            // Opened with the peer's keys (crate::wg::Device), never here.
            Encap::WireGuard => Err(DropReason::WgBadMessage),
            Encap::Vxlan { vni } => match vxlan::check(datagram, *vni) {
                Ok(()) => Ok(&datagram[vxlan::HEADER_LEN..]),
                Err(VxlanError::Truncated) => Err(DropReason::Truncated),
                Err(VxlanError::BadFlags) => Err(DropReason::BadVxlan),
                Err(VxlanError::WrongVni) => Err(DropReason::WrongVni),
            },
        }
    }

    /// Checks a packet (or frame) from the device or out of a datagram:
    /// well-formed, and at most [`Encap::max_inner_len`] for `mtu`.
    pub fn check_inner<'a>(&self, bytes: &'a [u8], mtu: usize) -> Result<Inner<'a>, DropReason> {
        match self {
            Encap::Ip | Encap::WireGuard => {
                let packet = IpPacket::new_checked(bytes)?;
                if packet.len() > mtu {
                    return Err(DropReason::OverMtu);
                }
                Ok(Inner::Ip(packet))
            }
            Encap::Vxlan { .. } => {
                if bytes.is_empty() {
                    return Err(DropReason::Empty);
                }
                if bytes.len() < vxlan::ETH_HEADER_LEN {
                    return Err(DropReason::Truncated);
                }
                if bytes.len() > self.max_inner_len(mtu) {
                    return Err(DropReason::OverMtu);
                }
                Ok(Inner::Frame)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_per_way() {
        assert_eq!(Encap::Ip.header_len(), 0);
        assert_eq!(Encap::Ip.max_datagram_len(1400), 1400);
        let v = Encap::Vxlan { vni: 42 };
        assert_eq!(v.header_len(), 8);
        assert_eq!(v.max_inner_len(1450), 1450 + 14 + 4);
        assert_eq!(v.max_datagram_len(1450), 8 + 1450 + 18);
        assert!(Encap::Ip.carries_ip() && !v.carries_ip());
        assert!(Encap::Ip.fixed_source_port() && !v.fixed_source_port());
        let w = Encap::WireGuard;
        assert_eq!((w.header_len(), w.max_inner_len(1420)), (16, 1420));
        assert_eq!(w.max_datagram_len(1420), 1452);
        assert_eq!(w.max_datagram_len(68), 148, "a handshake initiation fits");
        assert_eq!(w.trailer_room(1420), 16);
        assert_eq!(w.trailer_room(68), 148 - 16 - 68);
        assert!(w.carries_ip() && w.per_peer_state() && !v.per_peer_state());
    }

    #[test]
    fn vxlan_header_round_trip() {
        let v = Encap::Vxlan { vni: 42 };
        let mut d = vec![0u8; 8 + 60];
        v.write_header(&mut d);
        assert_eq!(v.open(&d).unwrap().len(), 60);
        assert_eq!(Encap::Vxlan { vni: 7 }.open(&d), Err(DropReason::WrongVni));
        assert_eq!(v.open(&d[..4]), Err(DropReason::Truncated));
        d[0] = 0;
        assert_eq!(v.open(&d), Err(DropReason::BadVxlan));
        assert!(matches!(v.check_inner(&[0; 14], 1450), Ok(Inner::Frame)));
        assert_eq!(
            v.check_inner(&[0; 13], 1450).unwrap_err(),
            DropReason::Truncated
        );
        assert_eq!(v.check_inner(&[], 1450).unwrap_err(), DropReason::Empty);
        assert_eq!(
            v.check_inner(&vec![0; 1469], 1450).unwrap_err(),
            DropReason::OverMtu
        );
    }
}
