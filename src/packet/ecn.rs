//! The ECN field of an IP header (RFC 3168): reading it, marking CE, and
//! carrying it across a tunnel the way the kernel's WireGuard does (RFC
//! 6040's normal mode as Linux implements it: `INET_ECN_encapsulate` and
//! `INET_ECN_decapsulate`).

/// ECN field values (RFC 3168).
pub const NOT_ECT: u8 = 0b00;
pub const ECT_1: u8 = 0b01;
pub const ECT_0: u8 = 0b10;
pub const CE: u8 = 0b11;
pub const MASK: u8 = 0b11;

/// The ECN field of an IPv4 or IPv6 packet; None if it is neither (or too
/// short to say).
pub fn of(pkt: &[u8]) -> Option<u8> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => Some(pkt[1] & MASK),
        // Traffic class: low 4 bits of byte 0, high 4 bits of byte 1; ECN
        // is its low 2 bits, bits 4..6 of byte 1.
        Some(6) if pkt.len() >= 40 => Some((pkt[1] >> 4) & MASK),
        _ => None,
    }
}

/// Writes `ecn` into the packet's ECN field (fixing the IPv4 header
/// checksum incrementally, RFC 1624). False if the packet is not IPv4 or
/// IPv6.
fn set(pkt: &mut [u8], ecn: u8) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let tos = pkt[1];
            let new_tos = (tos & !MASK) | (ecn & MASK);
            if new_tos == tos {
                return true;
            }
            let old = u16::from_be_bytes([pkt[0], tos]);
            let new = u16::from_be_bytes([pkt[0], new_tos]);
            pkt[1] = new_tos;
            // HC' = ~(~HC + ~m + m')
            let hc = u16::from_be_bytes([pkt[10], pkt[11]]);
            let mut s = u32::from(!hc) + u32::from(!old) + u32::from(new);
            s = (s & 0xffff) + (s >> 16);
            s = (s & 0xffff) + (s >> 16);
            pkt[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
            true
        }
        Some(6) if pkt.len() >= 40 => {
            pkt[1] = (pkt[1] & !(MASK << 4)) | ((ecn & MASK) << 4);
            true
        }
        _ => false,
    }
}

/// Marks an ECN-capable IP packet with CE in place. Returns false, leaving
/// the packet alone, if it is not ECN-capable (Not-ECT) or not IPv4/IPv6.
pub fn mark_ce(pkt: &mut [u8]) -> bool {
    match of(pkt) {
        Some(NOT_ECT) | None => false,
        Some(_) => set(pkt, CE),
    }
}

/// The outer header's TOS byte (or traffic class) for a datagram carrying
/// `inner`: no DSCP, and the inner ECN field copied, except that CE goes
/// out as ECT(0) (the kernel's `INET_ECN_encapsulate`, which WireGuard
/// calls with an outer TOS of 0).
pub fn outer_tos(inner: &[u8]) -> u8 {
    match of(inner) {
        Some(CE) => ECT_0,
        Some(e) => e,
        None => NOT_ECT,
    }
}

/// Carries the outer header's ECN field (`outer`, the TOS byte or traffic
/// class the datagram arrived with) into the `inner` packet it carried, as
/// the kernel's WireGuard does: an ECN-capable inner packet becomes CE if
/// the outer one is CE, and ECT(1) if the outer one is ECT(1); a Not-ECT
/// inner packet is left alone (and delivered: the kernel's WireGuard
/// ignores RFC 6040's advice to drop it when the outer one is CE). Returns
/// true if the outer CE mark reached the packet.
pub fn decapsulate(outer: u8, inner: &mut [u8]) -> bool {
    match (of(inner), outer & MASK) {
        (Some(ECT_0 | ECT_1 | CE), CE) => set(inner, CE),
        (Some(ECT_0), ECT_1) => {
            set(inner, ECT_1);
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum::checksum;

    fn ipv4(tos: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[1] = tos;
        p[2..4].copy_from_slice(&20u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn ipv6(tclass: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60 | (tclass >> 4);
        p[1] = tclass << 4;
        p
    }

    #[test]
    fn marks_ect_packets_with_a_valid_checksum_and_leaves_not_ect_alone() {
        for ect in [ECT_1, ECT_0, CE] {
            let mut p = ipv4(0xb8 | ect);
            assert!(mark_ce(&mut p));
            assert_eq!(p[1], 0xb8 | CE);
            assert_eq!(checksum(&p[..20]), 0, "header checksum");
        }
        let mut not_ect = ipv4(0xb8);
        let before = not_ect.clone();
        assert!(!mark_ce(&mut not_ect));
        assert_eq!(not_ect, before);
        // IPv6: traffic class 0x02 (ECT(0)) becomes 0x03.
        let mut v6 = ipv6(ECT_0);
        assert!(mark_ce(&mut v6));
        assert_eq!((v6[0] & 0x0f) << 4 | v6[1] >> 4, CE);
        assert!(!mark_ce(&mut ipv6(0xb8)));
        assert!(!mark_ce(&mut [0x45, 0, 0]), "too short");
    }

    #[test]
    fn outer_tos_copies_ecn_but_not_dscp_and_ce_leaves_as_ect0() {
        for (inner, outer) in [
            (NOT_ECT, NOT_ECT),
            (ECT_1, ECT_1),
            (ECT_0, ECT_0),
            (CE, ECT_0),
        ] {
            assert_eq!(outer_tos(&ipv4(0xb8 | inner)), outer, "v4 {inner}");
            assert_eq!(outer_tos(&ipv6(0xb8 | inner)), outer, "v6 {inner}");
        }
        assert_eq!(outer_tos(&[]), NOT_ECT);
        assert_eq!(outer_tos(&[0x45; 10]), NOT_ECT);
    }

    #[test]
    fn decapsulation_follows_the_kernel() {
        // (inner, outer) -> inner after, marked CE
        let table = [
            (NOT_ECT, NOT_ECT, NOT_ECT, false),
            (NOT_ECT, ECT_0, NOT_ECT, false),
            (NOT_ECT, CE, NOT_ECT, false),
            (ECT_0, NOT_ECT, ECT_0, false),
            (ECT_0, ECT_0, ECT_0, false),
            (ECT_0, ECT_1, ECT_1, false),
            (ECT_0, CE, CE, true),
            (ECT_1, ECT_0, ECT_1, false),
            (ECT_1, CE, CE, true),
            (CE, NOT_ECT, CE, false),
            (CE, ECT_0, CE, false),
            (CE, CE, CE, true),
        ];
        for (inner, outer, after, marked) in table {
            // DSCP bits in the outer byte change nothing.
            let mut p = ipv4(0x28 | inner);
            assert_eq!(
                decapsulate(0xfc | outer, &mut p),
                marked,
                "v4 {inner} {outer}"
            );
            assert_eq!(p[1], 0x28 | after, "v4 {inner} {outer}");
            assert_eq!(checksum(&p), 0, "v4 checksum {inner} {outer}");
            let mut p = ipv6(0x28 | inner);
            assert_eq!(decapsulate(outer, &mut p), marked, "v6 {inner} {outer}");
            assert_eq!(of(&p), Some(after), "v6 {inner} {outer}");
            assert_eq!(p[0] & 0x0f, 0x2, "v6 DSCP kept");
        }
        let mut junk = vec![0x15u8; 30];
        assert!(!decapsulate(CE, &mut junk));
        assert_eq!(junk, vec![0x15u8; 30]);
    }
}
