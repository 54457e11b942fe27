//! WireGuard's wire sizes and what the datapath and the runtime exchange
//! with a [`super::Device`]: the same whether the `wireguard` feature (and
//! with it boringtun and ring) is built in or not.

use std::net::SocketAddr;

use crate::peers::PeerId;
use crate::types::DropReason;

/// Bytes WireGuard adds to a packet: the data message header (type,
/// receiver index, counter) and the AEAD tag.
pub const OVERHEAD: usize = 32;
/// The data message header in front of the ciphertext.
pub const HEADER_LEN: usize = 16;
/// The longest message: a handshake initiation.
pub const MAX_HANDSHAKE_LEN: usize = 148;
/// A cookie reply's length.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Handshake initiations a second before the responder asks for cookies
/// (wireguard-go and boringtun's device use the same order of magnitude).
pub const HANDSHAKES_PER_SECOND: u64 = 100;
/// Handshake messages waiting for the control thread; more are dropped
/// (`wg_handshake_backlog`).
pub const HANDSHAKE_BACKLOG: usize = 1024;

/// The first byte of a transport data message (its type, little-endian
/// 4 in a 32-bit field).
pub const DATA_MESSAGE_TYPE: u8 = 4;

/// True if `msg` is a transport data message (not a handshake message):
/// only those carry the inner packet's ECN bits outside.
pub fn is_data_message(msg: &[u8]) -> bool {
    msg.first() == Some(&DATA_MESSAGE_TYPE)
}

/// The plaintext length a data message carries for a packet of `len`
/// bytes: padded to a multiple of 16 (the WireGuard paper, 5.4.6), but
/// not beyond `mtu`.
pub fn padded_len(len: usize, mtu: usize) -> usize {
    len.next_multiple_of(16).min(mtu.max(len))
}

/// A handshake message for the control thread.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeMsg {
    pub src: SocketAddr,
    len: u8,
    bytes: [u8; MAX_HANDSHAKE_LEN],
}

impl HandshakeMsg {
    /// A copy of `datagram` from `src`; None if it is longer than any
    /// handshake message.
    pub fn new(src: SocketAddr, datagram: &[u8]) -> Option<HandshakeMsg> {
        let len = u8::try_from(datagram.len())
            .ok()
            .filter(|&l| usize::from(l) <= MAX_HANDSHAKE_LEN)?;
        let mut bytes = [0; MAX_HANDSHAKE_LEN];
        bytes[..datagram.len()].copy_from_slice(datagram);
        Some(HandshakeMsg { src, len, bytes })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// What sealing a packet for a peer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    /// Send `len` bytes of the output to `to`: the data message, or (no
    /// session yet) a handshake initiation, the packet (or packets) waiting
    /// inside until the handshake completes.
    Datagram { len: usize, to: SocketAddr },
    /// Send `len` bytes of the output to `to` as datagrams of `seg` bytes
    /// (the last may be shorter): one data message per segment.
    Datagrams {
        len: usize,
        seg: usize,
        to: SocketAddr,
    },
    /// A handshake is under way: the packet waits for it.
    Queued,
    /// Not sent; counted under this reason.
    Dropped(DropReason),
}

/// What opening a datagram gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// From `peer`: the inner packet is the first `len` bytes of the
    /// output (its source not yet checked against the peer's AllowedIPs).
    Packet { peer: PeerId, len: usize },
    /// An authenticated keepalive from `peer` (nothing to write).
    Keepalive { peer: PeerId },
    /// A handshake message, queued for the control thread.
    Handshake,
    /// Dropped; counted under this reason.
    Dropped(DropReason),
}
