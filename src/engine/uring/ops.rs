//! What the worker submits: operation tags in `user_data`, the stable
//! message headers sendmsg/recvmsg point to (their control data and
//! addresses read and written by `crate::platform::control`, the codec the
//! poll engine uses too). Plain data: nothing here touches the ring.
#![allow(unsafe_code)]

use std::net::SocketAddr;

use crate::platform::control::{SOCKADDR_LEN, SendControl, control_len, parse_sockaddr};

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

/// `struct io_uring_recvmsg_out` (16 bytes) + the sender address we ask for.
pub(super) const RECVMSG_PREFIX: usize = 16 + SOCKADDR_LEN;

/// Room for a send's or a single-shot receive's control data, in words.
const CMSG_WORDS: usize = 8;
const _: () = assert!(
    crate::platform::control::SEND_CONTROL_MAX <= CMSG_WORDS * 8
        && control_len(false, true) <= CMSG_WORDS * 8
);

/// The message header of one buffer's sendmsg or single-shot recvmsg. Kept
/// in a Vec that is never resized, so the kernel's pointers into it stay
/// valid while the operation is in flight.
pub(super) struct MsgSlot {
    pub(super) msg: libc::msghdr,
    pub(super) iov: libc::iovec,
    /// Control data, 8-byte aligned: UDP_SEGMENT and the TOS byte out, or
    /// SCM_TIMESTAMPNS and the TOS byte in.
    pub(super) cmsg: [u64; CMSG_WORDS],
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
            cmsg: [0; CMSG_WORDS],
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

    /// Points the header at `len` bytes at `data`, to `dest`, with the
    /// control messages `control`. Returns the header for SENDMSG.
    pub(super) fn prepare_send(
        &mut self,
        data: *mut u8,
        len: usize,
        dest: (*const libc::sockaddr, u32),
        control: &SendControl,
    ) -> *const libc::msghdr {
        self.iov = libc::iovec {
            iov_base: data.cast(),
            iov_len: len,
        };
        let iov = &mut self.iov as *mut libc::iovec;
        self.prepare_gather(iov, 1, dest, control)
    }

    /// Points the header at the `n` iovecs at `iov` (kept alive by the
    /// caller until the send completes), to `dest`, with the control
    /// messages `control`. Returns the header for SENDMSG.
    pub(super) fn prepare_gather(
        &mut self,
        iov: *mut libc::iovec,
        n: usize,
        dest: (*const libc::sockaddr, u32),
        control: &SendControl,
    ) -> *const libc::msghdr {
        self.msg.msg_name = dest.0 as *mut libc::c_void;
        self.msg.msg_namelen = dest.1;
        self.msg.msg_iov = iov;
        self.msg.msg_iovlen = n as _;
        let words = control.words();
        if words.is_empty() {
            self.msg.msg_control = std::ptr::null_mut();
            self.msg.msg_controllen = 0;
        } else {
            self.cmsg[..words.len()].copy_from_slice(words);
            self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
            self.msg.msg_controllen = control.len() as _;
        }
        &self.msg
    }

    /// Points the header at `len` bytes at `data` and at its own address
    /// field and control area (the outer TOS byte, and an arrival time if
    /// `timestamps`).
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
        self.cmsg = [0; CMSG_WORDS];
        self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
        self.msg.msg_controllen = control_len(false, timestamps) as _;
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
        // SAFETY: `cmsg` is CMSG_WORDS * 8 plain bytes owned by self
        // (zeroed before each receive, so only what the kernel wrote is
        // there).
        unsafe { std::slice::from_raw_parts(self.cmsg.as_ptr().cast::<u8>(), CMSG_WORDS * 8) }
    }

    /// The completed single-shot recvmsg was truncated.
    pub(super) fn truncated(&self) -> bool {
        self.msg.msg_flags & libc::MSG_TRUNC != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
