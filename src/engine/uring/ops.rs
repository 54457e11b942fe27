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
/// Control data we ask for or send: one cmsghdr with one int.
pub(super) const CMSG_SPACE_INT: usize = 24;

/// The message header of one buffer's sendmsg or single-shot recvmsg. Kept
/// in a Vec that is never resized, so the kernel's pointers into it stay
/// valid while the operation is in flight.
pub(super) struct MsgSlot {
    pub(super) msg: libc::msghdr,
    pub(super) iov: libc::iovec,
    /// One cmsghdr with UDP_SEGMENT, 8-byte aligned.
    pub(super) cmsg: [u64; 3],
    pub(super) name: libc::sockaddr_in6,
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
            cmsg: [0; 3],
            // SAFETY: as above: a plain C struct.
            name: unsafe { std::mem::zeroed() },
        }
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
        self.msg.msg_name = dest.0 as *mut libc::c_void;
        self.msg.msg_namelen = dest.1;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        match gso_size {
            Some(seg) => {
                self.cmsg = udp_segment_cmsg(seg);
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
    /// field. Returns the header for a single-shot RECVMSG.
    pub(super) fn prepare_recv(&mut self, data: *mut u8, len: usize) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: data.cast(),
            iov_len: len,
        };
        self.msg.msg_name = (&mut self.name as *mut libc::sockaddr_in6).cast();
        self.msg.msg_namelen = SOCKADDR_LEN as u32;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = std::ptr::null_mut();
        self.msg.msg_controllen = 0;
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

/// The UDP_GRO segment size in recvmsg control data, if present.
pub fn gro_segment(control: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + 16 <= control.len() {
        let len = usize::try_from(u64::from_ne_bytes(control[at..at + 8].try_into().ok()?)).ok()?;
        let level = i32::from_ne_bytes(control[at + 8..at + 12].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + 12..at + 16].try_into().ok()?);
        if len < 16 {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO && at + 20 <= control.len() {
            let v = i32::from_ne_bytes(control[at + 16..at + 20].try_into().ok()?);
            return usize::try_from(v).ok().filter(|&v| v > 0);
        }
        at += len.next_multiple_of(8);
    }
    None
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
    }
}
