//! The reflector: turns a packet the kernel routed into the TUN device into
//! the answer the far end would give, in place, so it can be written back.
//!
//! - ICMP echo request -> echo reply, ICMPv6 echo request -> echo reply
//!   (addresses swapped, type changed, checksum recomputed);
//! - UDP datagram -> the same payload back to its sender (addresses and
//!   ports swapped, checksum recomputed).
//!
//! Anything else is not answered. Pure code over bytes: `tunfwd reflect`
//! runs it in either engine, as the seed's echo made useful (the seed wrote
//! packets back unchanged, so pings timed out).

use crate::packet::checksum::{fold, pseudo_header_sum, sum};
use crate::packet::ip::{IpPacket, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP};
/// TTL / hop limit of answers.
const REPLY_TTL: u8 = 64;

/// Why a packet was not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReflected {
    /// Not one whole IP packet.
    Malformed,
    /// A protocol or ICMP type the reflector does not answer.
    Unsupported,
}

/// Rewrites `pkt` (one validated-or-not IP packet) into its answer.
pub fn reflect(pkt: &mut [u8]) -> Result<(), NotReflected> {
    let (v6, l4, proto) = match IpPacket::new_checked(pkt) {
        Ok(IpPacket::V4(p)) => (false, p.header_len(), p.protocol()),
        Ok(IpPacket::V6(p)) => (true, 40, p.next_header()),
        Err(_) => return Err(NotReflected::Malformed),
    };
    if !v6 && u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        // A fragment: its L4 header may not be here.
        return Err(NotReflected::Unsupported);
    }
    let l4_len = pkt.len() - l4;
    match (v6, proto) {
        (false, PROTO_ICMP) => {
            if l4_len < 8 || pkt[l4] != 8 || pkt[l4 + 1] != 0 {
                return Err(NotReflected::Unsupported);
            }
            pkt[l4] = 0; // echo reply
            pkt[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
            let c = fold(sum(&pkt[l4..], 0));
            pkt[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
        (true, PROTO_ICMPV6) => {
            if l4_len < 8 || pkt[l4] != 128 || pkt[l4 + 1] != 0 {
                return Err(NotReflected::Unsupported);
            }
            pkt[l4] = 129; // echo reply
        }
        (_, PROTO_UDP) => {
            if l4_len < 8 || usize::from(u16::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5]])) != l4_len {
                return Err(NotReflected::Malformed);
            }
            let (sport, dport) = ([pkt[l4], pkt[l4 + 1]], [pkt[l4 + 2], pkt[l4 + 3]]);
            pkt[l4..l4 + 2].copy_from_slice(&dport);
            pkt[l4 + 2..l4 + 4].copy_from_slice(&sport);
        }
        _ => return Err(NotReflected::Unsupported),
    }
    swap_addresses(pkt, v6);
    if v6 {
        pkt[7] = REPLY_TTL;
    } else {
        pkt[8] = REPLY_TTL;
        pkt[10..12].copy_from_slice(&[0, 0]);
        let c = fold(sum(&pkt[..l4], 0));
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
    // Checksums over the pseudo-header (after the swap, which does not
    // change the sum, but the type/port changes do).
    let with_pseudo = |pkt: &mut [u8], field: usize, zero_means_none: bool| {
        if zero_means_none && pkt[field..field + 2] == [0, 0] {
            return;
        }
        let (src, dst) = match IpPacket::new_checked(pkt) {
            Ok(p) => (p.src(), p.dst()),
            Err(_) => return,
        };
        pkt[field..field + 2].copy_from_slice(&[0, 0]);
        let proto = if v6 && proto == PROTO_ICMPV6 {
            PROTO_ICMPV6
        } else {
            proto
        };
        let mut c = fold(sum(&pkt[l4..], pseudo_header_sum(src, dst, proto, l4_len)));
        if proto == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    };
    match proto {
        PROTO_ICMPV6 => with_pseudo(pkt, l4 + 2, false),
        // IPv4 UDP may carry no checksum (0); IPv6 UDP always does.
        PROTO_UDP => with_pseudo(pkt, l4 + 6, !v6),
        _ => {}
    }
    Ok(())
}

fn swap_addresses(pkt: &mut [u8], v6: bool) {
    let (src, len) = if v6 { (8, 16) } else { (12, 4) };
    let dst = src + len;
    for i in 0..len {
        pkt.swap(src + i, dst + i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::offload::tests::verify;

    /// `ping -c1 198.19.0.2` from 198.19.0.1 as the TUN device sees it.
    fn echo_request_v4() -> Vec<u8> {
        let mut p = vec![
            0x45, 0x00, 0x00, 0x54, 0x6a, 0x15, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 198, 19, 0, 1,
            198, 19, 0, 2, 0x08, 0x00, 0x00, 0x00, 0x7f, 0x0e, 0x00, 0x01,
        ];
        p.extend((0..56u8).map(|i| i.wrapping_mul(3)));
        let c = fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let c = fold(sum(&p[20..], 0));
        p[22..24].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn udp(v6: bool, payload: &[u8]) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        let total = ip + 8 + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = PROTO_UDP;
            p[7] = 3;
            p[8..24].copy_from_slice(
                &"2001:db8:19::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            p[24..40].copy_from_slice(
                &"2001:db8:19::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 3;
            p[9] = PROTO_UDP;
            p[12..16].copy_from_slice(&[198, 19, 0, 1]);
            p[16..20].copy_from_slice(&[198, 19, 0, 2]);
            let c = fold(sum(&p[..20], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p[ip..ip + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[ip + 2..ip + 4].copy_from_slice(&7u16.to_be_bytes());
        p[ip + 4..ip + 6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[ip + 8..].copy_from_slice(payload);
        let pkt = IpPacket::new_checked(&p).unwrap();
        let (src, dst) = (pkt.src(), pkt.dst());
        let c = fold(sum(
            &p[ip..],
            pseudo_header_sum(src, dst, PROTO_UDP, total - ip),
        ));
        p[ip + 6..ip + 8].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn icmp_echo_reply() {
        let req = echo_request_v4();
        let mut p = req.clone();
        reflect(&mut p).unwrap();
        assert_eq!(p[20], 0, "echo reply");
        assert_eq!(&p[12..16], &[198, 19, 0, 2]);
        assert_eq!(&p[16..20], &[198, 19, 0, 1]);
        assert_eq!(&p[24..], &req[24..], "id, sequence and data kept");
        assert_eq!(fold(sum(&p[..20], 0)), 0, "IPv4 header checksum");
        assert_eq!(fold(sum(&p[20..], 0)), 0, "ICMP checksum");
    }

    #[test]
    fn icmpv6_echo_reply() {
        let mut p = udp(true, &[0; 12]);
        p[6] = PROTO_ICMPV6;
        p[40] = 128;
        p[41] = 0;
        let before = p.clone();
        reflect(&mut p).unwrap();
        assert_eq!(p[40], 129);
        assert_eq!(&p[8..24], &before[24..40]);
        assert_eq!(&p[24..40], &before[8..24]);
        assert_eq!(p[7], REPLY_TTL);
        verify(&p);
    }

    #[test]
    fn udp_back_to_sender() {
        for v6 in [false, true] {
            let req = udp(v6, b"hello, reflector");
            let mut p = req.clone();
            reflect(&mut p).unwrap();
            let ip = if v6 { 40 } else { 20 };
            assert_eq!(&p[ip..ip + 2], &req[ip + 2..ip + 4], "ports swapped");
            assert_eq!(&p[ip + 2..ip + 4], &req[ip..ip + 2]);
            assert_eq!(&p[ip + 8..], b"hello, reflector");
            verify(&p);
        }
        // IPv4 UDP without a checksum stays without one.
        let mut p = udp(false, b"x");
        p[26..28].copy_from_slice(&[0, 0]);
        reflect(&mut p).unwrap();
        assert_eq!(&p[26..28], &[0, 0]);
    }

    #[test]
    fn not_answered() {
        let mut reply = echo_request_v4();
        reply[20] = 0; // an echo reply is not answered again
        assert_eq!(reflect(&mut reply), Err(NotReflected::Unsupported));
        let mut tcp = udp(false, b"x");
        tcp[9] = 6;
        assert_eq!(reflect(&mut tcp), Err(NotReflected::Unsupported));
        assert_eq!(reflect(&mut [0x45, 0, 0]), Err(NotReflected::Malformed));
        let mut bad_len = udp(false, b"abc");
        bad_len[24..26].copy_from_slice(&5u16.to_be_bytes());
        assert_eq!(reflect(&mut bad_len), Err(NotReflected::Malformed));
        let mut frag = echo_request_v4();
        frag[6] = 0x20; // MF
        assert_eq!(reflect(&mut frag), Err(NotReflected::Unsupported));
    }
}
