//! What the worker submits: operation tags in `user_data`, the stable
//! message headers sendmsg/recvmsg point to, and the control data they carry.
//! Plain data and parsing: nothing here touches the ring.
#![allow(unsafe_code)]

use std::net::SocketAddr;

/// What an operation is: bits 32.. of user_data; bits 16..32 hold an index
/// (which coalesced TUN write), bits 0..16 the buffer id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    TunRead = 0,
    UdpRecv = 1,
    /// A send to the peer (one datagram, or one UDP GSO send).
    Send = 2,
    /// A write to the TUN device: a received packet, a reflected one, or
    /// one of a buffer's coalesced writes.
    TunWrite = 3,
    Wake = 4,
    Cancel = 5,
    /// POLLERR on the UDP socket: ICMP errors on its error queue.
    ErrPoll = 6,
    /// POLLOUT on the TUN queue, heading a chain of TUN writes that waited
    /// for room.
    TunPollOut = 7,
}

const OP_SHIFT: u32 = 32;
/// Set in user_data on a TUN write that is part of a retry chain.
pub(super) const CHAINED: u64 = 1 << 40;
/// The index of a TUN write that is not one of the coalescer's.
pub(super) const SINGLE_WRITE: u16 = u16::MAX;

pub(super) fn user_data(op: Op, bid: u16, index: u16) -> u64 {
    ((op as u64) << OP_SHIFT) | (u64::from(index) << 16) | u64::from(bid)
}

/// (operation, buffer id, index).
pub(super) fn decode(ud: u64) -> (Option<Op>, u16, u16) {
    let op = match (ud >> OP_SHIFT) & 0xff {
        0 => Some(Op::TunRead),
        1 => Some(Op::UdpRecv),
        2 => Some(Op::Send),
        3 => Some(Op::TunWrite),
        4 => Some(Op::Wake),
        5 => Some(Op::Cancel),
        6 => Some(Op::ErrPoll),
        7 => Some(Op::TunPollOut),
        _ => None,
    };
    (op, ud as u16, (ud >> 16) as u16)
}

/// Room for a sockaddr_in6.
pub(super) const SOCKADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// `struct io_uring_recvmsg_out` (16 bytes) + the sender address we ask for.
pub(super) const RECVMSG_PREFIX: usize = 16 + SOCKADDR_LEN;
/// Control data we ask for or send: one cmsghdr with one int (UDP_GRO,
/// UDP_SEGMENT)...
pub(super) const CMSG_SPACE_INT: usize = 24;
/// ...and one with a struct timespec (SCM_TIMESTAMPNS).
pub(super) const CMSG_SPACE_TIMESPEC: usize = 32;

/// The message header of one buffer's sendmsg or single-shot recvmsg. Kept
/// in a Vec that is never resized, so the kernel's pointers into it stay
/// valid while the operation is in flight.
pub(super) struct MsgSlot {
    pub(super) msg: libc::msghdr,
    pub(super) iov: libc::iovec,
    /// Control data, 8-byte aligned: UDP_SEGMENT out, or SCM_TIMESTAMPNS
    /// in.
    pub(super) cmsg: [u64; 4],
    pub(super) name: libc::sockaddr_in6,
    /// Where a send goes (its plan's destination), pointed to by `msg`.
    dest: nix::sys::socket::SockaddrStorage,
}

impl MsgSlot {
    pub(super) fn new() -> MsgSlot {
        MsgSlot {
            // SAFETY: msghdr is plain data (integers and raw pointers), for
            // which all-zero bytes are valid.
            msg: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            cmsg: [0; 4],
            // SAFETY: as above: a plain C struct.
            name: unsafe { std::mem::zeroed() },
            dest: nix::sys::socket::SockaddrStorage::from(SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }

    /// Keeps `dest` in the slot for a send; returns the address for
    /// [`MsgSlot::prepare_send`] or [`MsgSlot::prepare_gather`].
    pub(super) fn set_dest(&mut self, dest: SocketAddr) -> (*const libc::sockaddr, u32) {
        use nix::sys::socket::SockaddrLike as _;
        self.dest = nix::sys::socket::SockaddrStorage::from(dest);
        (self.dest.as_ptr(), self.dest.len())
    }

    /// Points the header at `len` bytes at `data`, to `dest`, with
    /// UDP_SEGMENT = `gso_size` if given. Returns the header for SENDMSG.
    pub(super) fn prepare_send(
        &mut self,
        data: *mut u8,
        len: usize,
        dest: (*const libc::sockaddr, u32),
        gso_size: Option<u16>,
    ) -> *const libc::msghdr {
        self.iov = libc::iovec {
            iov_base: data.cast(),
            iov_len: len,
        };
        let iov = &mut self.iov as *mut libc::iovec;
        self.prepare_gather(iov, 1, dest, gso_size)
    }

    /// Points the header at the `n` iovecs at `iov` (kept alive by the
    /// caller until the send completes), to `dest`, with UDP_SEGMENT =
    /// `gso_size` if given. Returns the header for SENDMSG.
    pub(super) fn prepare_gather(
        &mut self,
        iov: *mut libc::iovec,
        n: usize,
        dest: (*const libc::sockaddr, u32),
        gso_size: Option<u16>,
    ) -> *const libc::msghdr {
        self.msg.msg_name = dest.0 as *mut libc::c_void;
        self.msg.msg_namelen = dest.1;
        self.msg.msg_iov = iov;
        self.msg.msg_iovlen = n as _;
        match gso_size {
            Some(seg) => {
                let c = udp_segment_cmsg(seg);
                self.cmsg[..3].copy_from_slice(&c);
                self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
                self.msg.msg_controllen = CMSG_SPACE_INT as _;
            }
            None => {
                self.msg.msg_control = std::ptr::null_mut();
                self.msg.msg_controllen = 0;
            }
        }
        &self.msg
    }

    /// Points the header at `len` bytes at `data` and at its own address
    /// field (and control area, for an arrival time if `timestamps`).
    /// Returns the header for a single-shot RECVMSG.
    pub(super) fn prepare_recv(
        &mut self,
        data: *mut u8,
        len: usize,
        timestamps: bool,
    ) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: data.cast(),
            iov_len: len,
        };
        self.msg.msg_name = (&mut self.name as *mut libc::sockaddr_in6).cast();
        self.msg.msg_namelen = SOCKADDR_LEN as u32;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        if timestamps {
            self.cmsg = [0; 4];
            self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
            self.msg.msg_controllen = CMSG_SPACE_TIMESPEC as _;
        } else {
            self.msg.msg_control = std::ptr::null_mut();
            self.msg.msg_controllen = 0;
        }
        self.msg.msg_flags = 0;
        &mut self.msg
    }

    /// The sender a completed single-shot recvmsg wrote.
    pub(super) fn sender(&self) -> Option<SocketAddr> {
        let len = (self.msg.msg_namelen as usize).min(SOCKADDR_LEN);
        // SAFETY: `name` is a plain sockaddr_in6 the kernel filled; viewing
        // its first `len <= size_of` bytes is always valid.
        let bytes = unsafe {
            std::slice::from_raw_parts((&self.name as *const libc::sockaddr_in6).cast::<u8>(), len)
        };
        parse_sockaddr(bytes)
    }

    /// The control data a completed single-shot recvmsg left.
    pub(super) fn control(&self) -> &[u8] {
        if self.msg.msg_control.is_null() || self.msg.msg_controllen == 0 {
            return &[];
        }
        // SAFETY: `cmsg` is 32 plain bytes owned by self (zeroed before
        // each receive, so only what the kernel wrote is there).
        unsafe { std::slice::from_raw_parts(self.cmsg.as_ptr().cast::<u8>(), CMSG_SPACE_TIMESPEC) }
    }

    /// The completed single-shot recvmsg was truncated.
    pub(super) fn truncated(&self) -> bool {
        self.msg.msg_flags & libc::MSG_TRUNC != 0
    }
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

/// A cmsghdr carrying `UDP_SEGMENT = seg`, laid out in native byte order.
fn udp_segment_cmsg(seg: u16) -> [u64; 3] {
    let mut b = [0u8; 24];
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

/// Parses recvmsg control data (native-endian cmsghdrs, 8-byte aligned).
pub fn parse_control(control: &[u8]) -> Control {
    let mut out = Control::default();
    let mut at = 0;
    let field = |b: &[u8], i: usize, n: usize| b.get(i..i + n).map(|s| s.to_vec());
    while at + 16 <= control.len() {
        let Some(len) = field(control, at, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
            .and_then(|l| usize::try_from(l).ok())
        else {
            break;
        };
        if len < 16 {
            break;
        }
        let int = |i: usize| {
            field(control, at + i, 4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_ne_bytes)
        };
        let i64_at = |i: usize| {
            field(control, at + i, 8)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_ne_bytes)
        };
        match (int(8), int(12)) {
            (Some(libc::SOL_UDP), Some(libc::UDP_GRO)) => {
                out.gro_size = int(16)
                    .and_then(|v| usize::try_from(v).ok())
                    .filter(|&v| v > 0);
            }
            (Some(libc::SOL_SOCKET), Some(libc::SCM_TIMESTAMPNS)) => {
                if let (Some(sec), Some(nsec)) = (i64_at(16), i64_at(24)) {
                    out.arrived_ns = u64::try_from(sec)
                        .ok()
                        .zip(u64::try_from(nsec).ok())
                        .map(|(s, n)| s * 1_000_000_000 + n);
                }
            }
            _ => {}
        }
        at += len.next_multiple_of(8);
    }
    out
}

/// The UDP_GRO segment size in recvmsg control data, if present.
pub fn gro_segment(control: &[u8]) -> Option<usize> {
    parse_control(control).gro_size
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{SockaddrLike, SockaddrStorage};

    #[test]
    fn user_data_roundtrip() {
        for op in [
            Op::TunRead,
            Op::UdpRecv,
            Op::Send,
            Op::TunWrite,
            Op::Wake,
            Op::Cancel,
            Op::ErrPoll,
            Op::TunPollOut,
        ] {
            for bid in [0u16, 1, 4095, u16::MAX] {
                for index in [0u16, 7, SINGLE_WRITE] {
                    assert_eq!(decode(user_data(op, bid, index)), (Some(op), bid, index));
                    let chained = user_data(op, bid, index) | CHAINED;
                    assert_eq!(decode(chained), (Some(op), bid, index));
                }
            }
        }
        assert_eq!(decode(99 << OP_SHIFT).0, None);
    }

    #[test]
    fn sockaddr_parsing() {
        for a in ["198.18.0.2:5000", "[2001:db8::2]:6000"] {
            let addr: SocketAddr = a.parse().unwrap();
            let s = SockaddrStorage::from(addr);
            // SAFETY: test-only view of a live sockaddr of `len()` bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len() as usize) };
            assert_eq!(parse_sockaddr(bytes), Some(addr));
        }
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[0, 0, 1, 2]), None);
    }

    #[test]
    fn segment_cmsg_roundtrips_through_the_gro_parser() {
        // The same layout carries UDP_SEGMENT out and UDP_GRO in.
        let c = udp_segment_cmsg(1400);
        let mut bytes: Vec<u8> = c.iter().flat_map(|w| w.to_ne_bytes()).collect();
        bytes[12..16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        bytes[16..20].copy_from_slice(&1400i32.to_ne_bytes());
        assert_eq!(gro_segment(&bytes), Some(1400));
        assert_eq!(gro_segment(&bytes[..10]), None);
        // A timestamp after it.
        let mut ts = vec![0u8; 32];
        ts[..8].copy_from_slice(&32u64.to_ne_bytes());
        ts[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        ts[12..16].copy_from_slice(&libc::SCM_TIMESTAMPNS.to_ne_bytes());
        ts[16..24].copy_from_slice(&1_700_000_000i64.to_ne_bytes());
        ts[24..32].copy_from_slice(&123i64.to_ne_bytes());
        bytes.extend_from_slice(&ts);
        assert_eq!(
            parse_control(&bytes),
            Control {
                gro_size: Some(1400),
                arrived_ns: Some(1_700_000_000 * 1_000_000_000 + 123)
            }
        );
    }
}
