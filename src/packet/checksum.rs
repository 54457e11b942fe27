//! The Internet checksum (RFC 1071) and the TCP/UDP pseudo-header sums.
//!
//! Sums are kept unfolded in a `u32` (or `u64` for long inputs) so partial
//! sums can be combined; [`fold`] turns one into the 16-bit field value.

use std::net::IpAddr;

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is
/// padded with zero). Returns the unfolded sum.
///
/// The one's-complement sum does not depend on byte order (RFC 1071 1.2.B):
/// 8-byte words are added in native order with end-around carry into four
/// independent accumulators (four dependency chains the CPU runs side by
/// side, instead of one), which are then combined, folded to 16 bits and
/// swapped back to big-endian once.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    #[inline(always)]
    fn add(acc: u64, w: u64) -> u64 {
        let (s, carry) = acc.overflowing_add(w);
        s + u64::from(carry)
    }
    #[inline(always)]
    fn word(b: &[u8]) -> u64 {
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    let mut acc = [0u64; 4];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        acc[0] = add(acc[0], word(&b[0..8]));
        acc[1] = add(acc[1], word(&b[8..16]));
        acc[2] = add(acc[2], word(&b[16..24]));
        acc[3] = add(acc[3], word(&b[24..32]));
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        acc[0] = add(acc[0], word(w));
    }
    let total = add(add(acc[0], acc[1]), add(acc[2], acc[3]));
    // Fold the native-order accumulator to 16 bits, then to big-endian.
    let mut folded = (total & 0xffff_ffff) + (total >> 32);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let mut out = initial + u64::from(u16::from_be_bytes((folded as u16).to_ne_bytes()));
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        out += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        out += u64::from(u16::from_be_bytes([*last, 0]));
    }
    out
}

/// Folds carries into 16 bits without complementing (a "partial" checksum,
/// as virtio-net's NEEDS_CSUM expects in the checksum field).
pub fn fold_partial(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum field value: folded and complemented.
pub fn fold(s: u64) -> u16 {
    !fold_partial(s)
}

/// The checksum of `data` alone (e.g. an IPv4 header with its checksum
/// field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(data, 0))
}

/// Sum of the TCP/UDP pseudo-header: addresses, protocol and L4 length.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, protocol: u8, l4_len: usize) -> u64 {
    let mut s = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => sum(&a.octets(), sum(&b.octets(), 0)),
        (a, b) => {
            let a = match a {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            let b = match b {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            sum(&a.octets(), sum(&b.octets(), 0))
        }
    };
    s += u64::from(protocol);
    s += l4_len as u64 & 0xffff;
    s += (l4_len as u64) >> 16;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 1071 example: 0001 f203 f4f5 f6f7 sums to ddf2 (folded).
    /// RFC 1071's definition, 16 bits at a time: the reference.
    fn reference(data: &[u8], initial: u64) -> u16 {
        let mut s = initial;
        for c in data.chunks(2) {
            s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        fold_partial(s)
    }

    #[test]
    fn matches_the_reference_at_every_length_and_alignment() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let ones = vec![0xffu8; 70_000];
        for input in [&data, &ones] {
            for len in (0..300).chain([1499, 1500, 65535, 65536, 65537, 69_990]) {
                for start in [0, 1, 3] {
                    let d = &input[start..start + len];
                    for initial in [0u64, 0x1_2345, u64::from(u32::MAX)] {
                        assert_eq!(
                            fold_partial(sum(d, initial)),
                            reference(d, initial),
                            "len {len}, start {start}, initial {initial}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold_partial(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_and_split_sums_agree() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = fold_partial(sum(&data, 0));
        // Splitting at an even offset gives the same sum.
        for at in [600, 602, 2, 998] {
            let split = fold_partial(sum(&data[at..], sum(&data[..at], 0)));
            assert_eq!(whole, split, "split at {at}");
        }
        // A bytewise reference.
        let mut r: u32 = 0;
        for (i, b) in data.iter().enumerate() {
            r += if i % 2 == 0 {
                u32::from(*b) << 8
            } else {
                u32::from(*b)
            };
        }
        while r >> 16 != 0 {
            r = (r & 0xffff) + (r >> 16);
        }
        assert_eq!(whole, r as u16);
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        // A captured IPv4 header (ping 198.19.0.1 -> 198.19.0.2).
        let mut h = [
            0x45, 0x00, 0x00, 0x54, 0x6a, 0x15, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 198, 19, 0, 1,
            198, 19, 0, 2,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0);
    }
}
