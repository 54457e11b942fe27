//! IPv4 and IPv6 header views: version, header length and total length are
//! checked against the bytes actually present, so a view always covers exactly
//! one whole packet.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers (the IPv4 protocol / IPv6 next-header field).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Minimum IPv4 header length in bytes (IHL = 5).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Fixed IPv6 header length in bytes.
pub const IPV6_HEADER_LEN: usize = 40;

/// Why a byte slice is not one well-formed IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Zero bytes.
    Empty,
    /// Fewer bytes than the fixed header of the claimed version.
    Truncated,
    /// Version nibble is neither 4 nor 6.
    BadVersion,
    /// IPv4 IHL below 5, or a header longer than the packet.
    BadHeaderLength,
    /// The header's total length disagrees with the number of bytes received.
    LengthMismatch,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::Empty => "empty packet",
            ParseError::Truncated => "truncated header",
            ParseError::BadVersion => "IP version is neither 4 nor 6",
            ParseError::BadHeaderLength => "bad IPv4 header length",
            ParseError::LengthMismatch => "total length differs from the bytes received",
        })
    }
}

/// A validated IPv4 packet: `bytes.len()` equals the header's total length.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Packet<'a> {
    bytes: &'a [u8],
}

impl<'a> Ipv4Packet<'a> {
    /// Validates version, IHL and total length against `bytes`.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.is_empty() {
            return Err(ParseError::Empty);
        }
        if bytes[0] >> 4 != 4 {
            return Err(ParseError::BadVersion);
        }
        if bytes.len() < IPV4_MIN_HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        let header_len = usize::from(bytes[0] & 0x0f) * 4;
        if header_len < IPV4_MIN_HEADER_LEN || header_len > bytes.len() {
            return Err(ParseError::BadHeaderLength);
        }
        let total_len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if total_len != bytes.len() || total_len < header_len {
            return Err(ParseError::LengthMismatch);
        }
        Ok(Ipv4Packet { bytes })
    }

    /// Header length in bytes (IHL * 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.bytes[0] & 0x0f) * 4
    }

    /// The IP protocol number of the payload (6 TCP, 17 UDP, 1 ICMP, ...).
    pub fn protocol(&self) -> u8 {
        self.bytes[9]
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[12],
            self.bytes[13],
            self.bytes[14],
            self.bytes[15],
        )
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[16],
            self.bytes[17],
            self.bytes[18],
            self.bytes[19],
        )
    }

    /// Bytes after the header (options excluded).
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[self.header_len()..]
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// A validated IPv6 packet: 40 + payload length equals `bytes.len()`.
#[derive(Clone, Copy, Debug)]
pub struct Ipv6Packet<'a> {
    bytes: &'a [u8],
}

impl<'a> Ipv6Packet<'a> {
    /// Validates version and payload length against `bytes`. Jumbograms
    /// (payload length 0 with a hop-by-hop option) are not supported and fail
    /// with `LengthMismatch`.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.is_empty() {
            return Err(ParseError::Empty);
        }
        if bytes[0] >> 4 != 6 {
            return Err(ParseError::BadVersion);
        }
        if bytes.len() < IPV6_HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        let payload_len = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
        if IPV6_HEADER_LEN + payload_len != bytes.len() {
            return Err(ParseError::LengthMismatch);
        }
        Ok(Ipv6Packet { bytes })
    }

    /// The first next-header value (not walking extension headers).
    pub fn next_header(&self) -> u8 {
        self.bytes[6]
    }

    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.bytes[8..24]).expect("16 bytes"))
    }

    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.bytes[24..40]).expect("16 bytes"))
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[IPV6_HEADER_LEN..]
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// One validated IP packet of either version, told apart by the version nibble.
#[derive(Clone, Copy, Debug)]
pub enum IpPacket<'a> {
    V4(Ipv4Packet<'a>),
    V6(Ipv6Packet<'a>),
}

impl<'a> IpPacket<'a> {
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, ParseError> {
        match bytes.first().map(|b| b >> 4) {
            None => Err(ParseError::Empty),
            Some(4) => Ipv4Packet::new_checked(bytes).map(IpPacket::V4),
            Some(6) => Ipv6Packet::new_checked(bytes).map(IpPacket::V6),
            Some(_) => Err(ParseError::BadVersion),
        }
    }

    pub fn src(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.src().into(),
            IpPacket::V6(p) => p.src().into(),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.dst().into(),
            IpPacket::V6(p) => p.dst().into(),
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Always false: a validated packet has at least a fixed header.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            IpPacket::V4(p) => p.as_bytes(),
            IpPacket::V6(p) => p.as_bytes(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal IPv4/UDP packet with `payload_len` payload bytes.
    pub(crate) fn ipv4_udp(payload_len: usize) -> Vec<u8> {
        let total = IPV4_MIN_HEADER_LEN + 8 + payload_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 19, 0, 1]);
        p[16..20].copy_from_slice(&[198, 19, 0, 2]);
        p
    }

    /// A minimal IPv6/UDP packet with `payload_len` payload bytes.
    pub(crate) fn ipv6_udp(payload_len: usize) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER_LEN + 8 + payload_len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&"2001:db8:19::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"2001:db8:19::2".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn ipv4_valid() {
        let bytes = ipv4_udp(100);
        let p = IpPacket::new_checked(&bytes).unwrap();
        assert_eq!(p.len(), 128);
        assert_eq!(p.src(), IpAddr::from([198, 19, 0, 1]));
        assert_eq!(p.dst(), IpAddr::from([198, 19, 0, 2]));
        let IpPacket::V4(v4) = p else {
            panic!("not v4")
        };
        assert_eq!(v4.protocol(), 17);
        assert_eq!(v4.payload().len(), 108);
    }

    #[test]
    fn ipv4_with_options() {
        let mut bytes = ipv4_udp(0);
        bytes.splice(20..20, [1u8, 1, 1, 0]); // NOP, NOP, NOP, EOL
        bytes[0] = 0x46;
        let len = bytes.len() as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        let p = Ipv4Packet::new_checked(&bytes).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn ipv6_valid() {
        let bytes = ipv6_udp(10);
        let p = IpPacket::new_checked(&bytes).unwrap();
        assert_eq!(p.len(), 58);
        assert_eq!(p.dst(), "2001:db8:19::2".parse::<IpAddr>().unwrap());
        let IpPacket::V6(v6) = p else {
            panic!("not v6")
        };
        assert_eq!(v6.next_header(), 17);
        assert_eq!(v6.payload().len(), 18);
    }

    #[test]
    fn empty() {
        assert_eq!(IpPacket::new_checked(&[]).unwrap_err(), ParseError::Empty);
        assert_eq!(Ipv4Packet::new_checked(&[]).unwrap_err(), ParseError::Empty);
        assert_eq!(Ipv6Packet::new_checked(&[]).unwrap_err(), ParseError::Empty);
    }

    #[test]
    fn bad_version() {
        for first in [0x00u8, 0x15, 0x55, 0x75, 0xf5] {
            let mut bytes = ipv4_udp(4);
            bytes[0] = first;
            assert_eq!(
                IpPacket::new_checked(&bytes).unwrap_err(),
                ParseError::BadVersion
            );
        }
        assert_eq!(
            Ipv4Packet::new_checked(&ipv6_udp(0)).unwrap_err(),
            ParseError::BadVersion
        );
        assert_eq!(
            Ipv6Packet::new_checked(&ipv4_udp(20)).unwrap_err(),
            ParseError::BadVersion
        );
    }

    #[test]
    fn truncated() {
        let bytes = ipv4_udp(0);
        assert_eq!(
            IpPacket::new_checked(&bytes[..19]).unwrap_err(),
            ParseError::Truncated
        );
        assert_eq!(
            IpPacket::new_checked(&bytes[..1]).unwrap_err(),
            ParseError::Truncated
        );
        let bytes = ipv6_udp(0);
        assert_eq!(
            IpPacket::new_checked(&bytes[..39]).unwrap_err(),
            ParseError::Truncated
        );
    }

    #[test]
    fn bad_header_length() {
        for ihl in 0..5u8 {
            let mut bytes = ipv4_udp(40);
            bytes[0] = 0x40 | ihl;
            assert_eq!(
                IpPacket::new_checked(&bytes).unwrap_err(),
                ParseError::BadHeaderLength
            );
        }
        // IHL 15 = 60 bytes of header in a 28-byte packet.
        let mut bytes = ipv4_udp(0);
        bytes[0] = 0x4f;
        assert_eq!(
            IpPacket::new_checked(&bytes).unwrap_err(),
            ParseError::BadHeaderLength
        );
    }

    #[test]
    fn length_mismatch() {
        // Datagram longer than the header says (trailing bytes).
        let mut bytes = ipv4_udp(10);
        bytes.push(0);
        assert_eq!(
            IpPacket::new_checked(&bytes).unwrap_err(),
            ParseError::LengthMismatch
        );
        // Datagram shorter than the header says.
        let bytes = ipv4_udp(10);
        assert_eq!(
            IpPacket::new_checked(&bytes[..bytes.len() - 1]).unwrap_err(),
            ParseError::LengthMismatch
        );
        // Total length smaller than the header itself.
        let mut bytes = ipv4_udp(0);
        bytes[0] = 0x46;
        bytes.extend_from_slice(&[0; 4]);
        bytes[2..4].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            IpPacket::new_checked(&bytes).unwrap_err(),
            ParseError::LengthMismatch
        );

        let mut bytes = ipv6_udp(10);
        bytes.push(0);
        assert_eq!(
            IpPacket::new_checked(&bytes).unwrap_err(),
            ParseError::LengthMismatch
        );
        // Jumbogram-style zero payload length.
        let mut bytes = ipv6_udp(10);
        bytes[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(
            IpPacket::new_checked(&bytes).unwrap_err(),
            ParseError::LengthMismatch
        );
    }

    /// Every prefix of a valid packet and every single-byte corruption of its
    /// header either parses to exactly that many bytes or fails: never panics.
    #[test]
    fn exhaustive_prefixes_and_header_bytes() {
        for base in [ipv4_udp(30), ipv6_udp(30)] {
            for cut in 0..=base.len() {
                if let Ok(p) = IpPacket::new_checked(&base[..cut]) {
                    assert_eq!(p.len(), cut);
                    assert_eq!(cut, base.len());
                }
            }
            for pos in 0..IPV6_HEADER_LEN.min(base.len()) {
                for v in 0..=255u8 {
                    let mut b = base.clone();
                    b[pos] = v;
                    if let Ok(p) = IpPacket::new_checked(&b) {
                        assert_eq!(p.len(), b.len());
                    }
                }
            }
        }
    }
}
