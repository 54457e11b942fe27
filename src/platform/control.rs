//! The UDP socket's message codec, one for both engines: the sender
//! address a `recvmsg` wrote, the control data it left (UDP GRO segment
//! size, `SO_TIMESTAMPNS` arrival time, the outer TOS byte or traffic
//! class), and the control messages a send carries ([`SendControl`]:
//! `UDP_SEGMENT` for a GSO send, `IP_TOS`/`IPV6_TCLASS` for its ECN bits). Pure code over bytes in the kernel's layout
//! (native byte order, `cmsghdr`s 8-byte aligned on 64-bit Linux); the
//! calls themselves are the engines' (io_uring) or [`super::recv_segments`]
//! and [`super::send_gather`] (poll).

use std::net::SocketAddr;

/// Room for the sender's address (a `sockaddr_in6`).
pub const SOCKADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Room for one `cmsghdr` carrying one int (`UDP_GRO`, `UDP_SEGMENT`)...
pub const CMSG_SPACE_INT: usize = 24;
/// ...and for one carrying a `struct timespec` (`SCM_TIMESTAMPNS`).
pub const CMSG_SPACE_TIMESPEC: usize = 32;

/// Control data room a receive needs: the UDP GRO size (`gro`), the
/// arrival time (`timestamps`), and always the outer TOS byte or traffic
/// class (which the kernel only gives where the socket asked for it:
/// [`super::enable_rx_tos`]).
pub const fn control_len(gro: bool, timestamps: bool) -> usize {
    let gro = if gro { CMSG_SPACE_INT } else { 0 };
    let ts = if timestamps { CMSG_SPACE_TIMESPEC } else { 0 };
    gro + ts + CMSG_SPACE_INT
}

/// Writes one `cmsghdr` of `level`/`kind` carrying `value` (an int) at
/// `b[..CMSG_SPACE_INT]`.
fn put_int_cmsg(b: &mut [u8], level: i32, kind: i32, value: i32) {
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    b[..8].copy_from_slice(&((hdr_len + 4) as u64).to_ne_bytes());
    b[8..12].copy_from_slice(&level.to_ne_bytes());
    b[12..16].copy_from_slice(&kind.to_ne_bytes());
    b[16..20].copy_from_slice(&value.to_ne_bytes());
    b[20..CMSG_SPACE_INT].fill(0);
}

/// The control messages of one send: `UDP_SEGMENT` for a GSO send, and
/// the outer header's TOS byte when it is not 0: `IP_TOS` to an IPv4 peer
/// (IPv4-mapped ones included: the kernel sends those through its IPv4
/// path, which reads `IP_TOS` even on an IPv6 socket), `IPV6_TCLASS` to an
/// IPv6 one. As 8-byte words ready to point `msg_control` at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendControl {
    words: [u64; 2 * CMSG_SPACE_INT / 8],
    len: usize,
}

impl SendControl {
    pub fn new(gso_size: Option<u16>, tos: u8, dest: &SocketAddr) -> SendControl {
        let mut b = [0u8; 2 * CMSG_SPACE_INT];
        let mut len = 0;
        if let Some(seg) = gso_size {
            b[..CMSG_SPACE_INT].copy_from_slice(&udp_segment_bytes(seg));
            len += CMSG_SPACE_INT;
        }
        if tos != 0 {
            let v4 = match dest {
                SocketAddr::V4(_) => true,
                SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
            };
            let (level, kind) = if v4 {
                (libc::SOL_IP, libc::IP_TOS)
            } else {
                (libc::SOL_IPV6, libc::IPV6_TCLASS)
            };
            put_int_cmsg(&mut b[len..], level, kind, i32::from(tos));
            len += CMSG_SPACE_INT;
        }
        let mut words = [0u64; 2 * CMSG_SPACE_INT / 8];
        for (w, chunk) in words.iter_mut().zip(b.chunks_exact(8)) {
            *w = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
        }
        SendControl { words, len }
    }

    /// The control data as words (empty: the send carries none).
    pub fn words(&self) -> &[u64] {
        &self.words[..self.len / 8]
    }

    /// Its bytes (0: the send carries none).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }
}

/// The most control bytes a send carries ([`SendControl::len`]).
pub const SEND_CONTROL_MAX: usize = 2 * CMSG_SPACE_INT;

/// Parses the sender address a recvmsg wrote (sockaddr_in or sockaddr_in6).
pub fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([name[0], name[1]]));
    if family == libc::AF_INET && name.len() >= 8 {
        let port = u16::from_be_bytes([name[2], name[3]]);
        let ip = std::net::Ipv4Addr::new(name[4], name[5], name[6], name[7]);
        Some(SocketAddr::from((ip, port)))
    } else if family == libc::AF_INET6 && name.len() >= 28 {
        let port = u16::from_be_bytes([name[2], name[3]]);
        let octets: [u8; 16] = name[8..24].try_into().ok()?;
        let scope = u32::from_ne_bytes(name[24..28].try_into().ok()?);
        let flow = u32::from_be_bytes(name[4..8].try_into().ok()?);
        Some(SocketAddr::V6(std::net::SocketAddrV6::new(
            octets.into(),
            port,
            flow,
            scope,
        )))
    } else {
        None
    }
}

/// A `cmsghdr` carrying `UDP_SEGMENT = seg` (a GSO send's datagram size;
/// the kernel reads a u16).
fn udp_segment_bytes(seg: u16) -> [u8; CMSG_SPACE_INT] {
    let mut b = [0u8; CMSG_SPACE_INT];
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    b[..8].copy_from_slice(&((hdr_len + 2) as u64).to_ne_bytes());
    b[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    b[12..16].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
    b[16..18].copy_from_slice(&seg.to_ne_bytes());
    b
}

/// What recvmsg control data says: the UDP_GRO segment size, the
/// arrival time (SCM_TIMESTAMPNS, ns since the Unix epoch) and the outer
/// TOS byte or traffic class (IP_TOS, IPV6_TCLASS), where present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub gro_size: Option<usize>,
    pub arrived_ns: Option<u64>,
    pub tos: Option<u8>,
}

/// Parses recvmsg control data: the `cmsghdr`s in `control` up to the
/// first whose length is too short (a zeroed tail ends the walk, so the
/// whole buffer may be passed if it was zeroed before the receive).
pub fn parse_control(control: &[u8]) -> Control {
    let mut out = Control::default();
    let mut at = 0;
    let word = |i: usize| -> Option<[u8; 8]> { control.get(i..i + 8)?.try_into().ok() };
    let int = |i: usize| -> Option<i32> {
        Some(i32::from_ne_bytes(control.get(i..i + 4)?.try_into().ok()?))
    };
    while at + 16 <= control.len() {
        let Some(len) = word(at)
            .map(u64::from_ne_bytes)
            .and_then(|l| usize::try_from(l).ok())
        else {
            break;
        };
        if len < 16 {
            break;
        }
        match (int(at + 8), int(at + 12)) {
            (Some(libc::SOL_UDP), Some(libc::UDP_GRO)) => {
                out.gro_size = int(at + 16)
                    .and_then(|v| usize::try_from(v).ok())
                    .filter(|&v| v > 0);
            }
            // IPv4 gives the TOS byte as one byte, IPv6 the class as an int.
            (Some(libc::SOL_IP), Some(libc::IP_TOS)) if len > 16 => {
                out.tos = control.get(at + 16).copied();
            }
            (Some(libc::SOL_IPV6), Some(libc::IPV6_TCLASS)) => {
                out.tos = int(at + 16).map(|v| v as u8);
            }
            (Some(libc::SOL_SOCKET), Some(libc::SCM_TIMESTAMPNS)) => {
                let sec = word(at + 16).map(i64::from_ne_bytes);
                let nsec = word(at + 24).map(i64::from_ne_bytes);
                out.arrived_ns = sec
                    .and_then(|s| u64::try_from(s).ok())
                    .zip(nsec.and_then(|n| u64::try_from(n).ok()))
                    .map(|(s, n)| s * 1_000_000_000 + n);
            }
            _ => {}
        }
        at += len.next_multiple_of(8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `addr` laid out as the kernel writes it (sockaddr_in or
    /// sockaddr_in6, native-endian family, network-order port).
    fn sockaddr(addr: SocketAddr) -> Vec<u8> {
        let mut b = Vec::new();
        match addr {
            SocketAddr::V4(a) => {
                b.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                b.extend_from_slice(&a.port().to_be_bytes());
                b.extend_from_slice(&a.ip().octets());
                b.extend_from_slice(&[0; 8]);
            }
            SocketAddr::V6(a) => {
                b.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                b.extend_from_slice(&a.port().to_be_bytes());
                b.extend_from_slice(&a.flowinfo().to_be_bytes());
                b.extend_from_slice(&a.ip().octets());
                b.extend_from_slice(&a.scope_id().to_ne_bytes());
            }
        }
        b
    }

    #[test]
    fn sockaddr_parsing() {
        for a in ["198.18.0.2:5000", "[2001:db8::2]:6000", "[fe80::1%3]:7"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(parse_sockaddr(&sockaddr(addr)), Some(addr), "{a}");
        }
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[0, 0, 1, 2]), None);
        let v6 = sockaddr("[2001:db8::2]:6000".parse().unwrap());
        assert_eq!(v6.len(), SOCKADDR_LEN);
        assert_eq!(parse_sockaddr(&v6[..27]), None, "a short sockaddr_in6");
    }

    #[test]
    fn segment_cmsg_roundtrips_through_the_gro_parser() {
        // The same layout carries UDP_SEGMENT out and UDP_GRO in.
        let dest = "198.18.0.2:5000".parse().unwrap();
        let c = SendControl::new(Some(1400), 0, &dest);
        assert_eq!(c.len(), CMSG_SPACE_INT);
        let mut bytes: Vec<u8> = c.words().iter().flat_map(|w| w.to_ne_bytes()).collect();
        bytes[12..16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        bytes[16..20].copy_from_slice(&1400i32.to_ne_bytes());
        assert_eq!(parse_control(&bytes).gro_size, Some(1400));
        assert_eq!(parse_control(&bytes[..10]), Control::default());
        // A timestamp after it, then a zeroed tail.
        let mut ts = vec![0u8; 32];
        ts[..8].copy_from_slice(&32u64.to_ne_bytes());
        ts[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        ts[12..16].copy_from_slice(&libc::SCM_TIMESTAMPNS.to_ne_bytes());
        ts[16..24].copy_from_slice(&1_700_000_000i64.to_ne_bytes());
        ts[24..32].copy_from_slice(&123i64.to_ne_bytes());
        bytes.extend_from_slice(&ts);
        bytes.extend_from_slice(&[0; 24]);
        assert_eq!(
            parse_control(&bytes),
            Control {
                gro_size: Some(1400),
                arrived_ns: Some(1_700_000_000 * 1_000_000_000 + 123),
                tos: None,
            }
        );
        assert_eq!(control_len(true, true), bytes.len());
    }

    /// The control messages of a send, as (level, type, value) triples.
    fn cmsgs(c: &SendControl) -> Vec<(i32, i32, i32)> {
        let b: Vec<u8> = c.words().iter().flat_map(|w| w.to_ne_bytes()).collect();
        b.chunks(CMSG_SPACE_INT)
            .map(|m| {
                let int = |i: usize| i32::from_ne_bytes(m[i..i + 4].try_into().unwrap());
                (int(8), int(12), int(16))
            })
            .collect()
    }

    #[test]
    fn send_control_carries_the_tos_by_the_destination_family() {
        let v4: SocketAddr = "198.18.0.2:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:5000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::2]:5000".parse().unwrap();
        assert_eq!(SendControl::new(None, 0, &v4).len(), 0);
        assert_eq!(
            cmsgs(&SendControl::new(None, 2, &v4)),
            [(libc::SOL_IP, libc::IP_TOS, 2)]
        );
        assert_eq!(
            cmsgs(&SendControl::new(None, 1, &mapped)),
            [(libc::SOL_IP, libc::IP_TOS, 1)]
        );
        let both = SendControl::new(Some(1452), 2, &v6);
        assert_eq!(both.len(), SEND_CONTROL_MAX);
        let [lo, hi] = 1452u16.to_ne_bytes();
        let seg = i32::from_ne_bytes([lo, hi, 0, 0]);
        assert_eq!(
            cmsgs(&both),
            [
                (libc::SOL_UDP, libc::UDP_SEGMENT, seg),
                (libc::SOL_IPV6, libc::IPV6_TCLASS, 2)
            ]
        );
    }

    #[test]
    fn received_tos_of_either_family() {
        let mut b = vec![0u8; 2 * CMSG_SPACE_INT];
        // IPv4: the kernel's IP_TOS cmsg carries one byte (cmsg_len 17).
        b[..8].copy_from_slice(&17u64.to_ne_bytes());
        b[8..12].copy_from_slice(&libc::SOL_IP.to_ne_bytes());
        b[12..16].copy_from_slice(&libc::IP_TOS.to_ne_bytes());
        b[16] = 0xb9;
        assert_eq!(parse_control(&b).tos, Some(0xb9));
        put_int_cmsg(&mut b, libc::SOL_IPV6, libc::IPV6_TCLASS, 3);
        assert_eq!(parse_control(&b).tos, Some(3));
    }
}
