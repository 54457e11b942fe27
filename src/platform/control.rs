//! The UDP socket's message codec, one for both engines: the sender
//! address a `recvmsg` wrote, the control data it left (UDP GRO segment
//! size, `SO_TIMESTAMPNS` arrival time), and the `UDP_SEGMENT` control
//! message a GSO send carries. Pure code over bytes in the kernel's layout
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

/// Control data room a receive needs: the UDP GRO size (`gro`) and the
/// arrival time (`timestamps`).
pub fn control_len(gro: bool, timestamps: bool) -> usize {
    let gro = if gro { CMSG_SPACE_INT } else { 0 };
    let ts = if timestamps { CMSG_SPACE_TIMESPEC } else { 0 };
    gro + ts
}

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

/// A `cmsghdr` carrying `UDP_SEGMENT = seg` (a GSO send's datagram size),
/// as 8-byte words ready to point `msg_control` at.
pub fn udp_segment_cmsg(seg: u16) -> [u64; 3] {
    let mut b = [0u8; CMSG_SPACE_INT];
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    b[..8].copy_from_slice(&((hdr_len + 2) as u64).to_ne_bytes());
    b[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    b[12..16].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
    b[16..18].copy_from_slice(&seg.to_ne_bytes());
    let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    [w(0), w(1), w(2)]
}

/// What recvmsg control data says: the UDP_GRO segment size and the
/// arrival time (SCM_TIMESTAMPNS, ns since the Unix epoch), where present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub gro_size: Option<usize>,
    pub arrived_ns: Option<u64>,
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
        let c = udp_segment_cmsg(1400);
        let mut bytes: Vec<u8> = c.iter().flat_map(|w| w.to_ne_bytes()).collect();
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
                arrived_ns: Some(1_700_000_000 * 1_000_000_000 + 123)
            }
        );
        assert_eq!(control_len(true, true), bytes.len() - 24);
    }
}
