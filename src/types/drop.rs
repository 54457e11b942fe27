//! The reasons a packet is dropped: one counter each, wherever drops are
//! counted (per direction, per peer) and reported (text, JSON, Prometheus).

use std::fmt;

/// Why a packet was not forwarded. Every drop is counted under exactly one
/// reason; the engine adds the I/O reasons (`SendFailed`, `TunWriteFailed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A zero-length read or datagram.
    Empty,
    /// Shorter than the fixed IP header of its version.
    Truncated,
    /// Version nibble neither 4 nor 6.
    BadVersion,
    /// IPv4 IHL below 5 or beyond the packet.
    BadHeaderLength,
    /// IP total length differs from the datagram length.
    LengthMismatch,
    /// Larger than the tunnel MTU.
    OverMtu,
    /// A datagram whose source is not a configured peer.
    NotFromPeer,
    /// The UDP send failed with an error other than "try again".
    SendFailed,
    /// The TUN write failed with an error other than "try again".
    TunWriteFailed,
    /// A TUN super-packet that could not be segmented (bad virtio-net
    /// header or layout).
    BadOffload,
    /// Reflect mode: a packet the reflector does not answer.
    NotReflected,
    /// TAP mode: a datagram without the VXLAN I flag.
    BadVxlan,
    /// TAP mode: a VXLAN datagram for another VNI.
    WrongVni,
    /// From a peer, but the inner source address is outside `--allow-src`
    /// or does not route back to that peer (another peer's prefix, or none).
    SourceNotAllowed,
    /// A TCP segment from the peer whose IPv4 header or TCP checksum does
    /// not verify (checked before segments are coalesced: the kernel takes
    /// a coalesced super-packet's checksum as already verified).
    BadChecksum,
    /// CoDel found it in a standing queue and it could not carry an ECN
    /// mark: dropped to tell its sender to slow down.
    Aqm,
    /// tunfwd could not keep up: its flow queues had no free buffer for
    /// the next TUN read, and the head of the flow with the most bytes
    /// queued was dropped (before any work was spent on it).
    Overload,
    /// A packet from the TUN device whose destination is in no peer's
    /// prefixes.
    NoRoute,
    /// WireGuard: a message that failed authentication (its AEAD tag, or
    /// a handshake's mac1).
    WgBadAuth,
    /// WireGuard: a data message whose counter was already received or is
    /// too old for the replay window, or a replayed handshake initiation.
    WgReplay,
    /// WireGuard: a message for a receiver index with no session.
    WgUnknownIndex,
    /// WireGuard: not a WireGuard message (type or length), or one whose
    /// plaintext is not an IP packet.
    WgBadMessage,
    /// WireGuard: a message for a session past its lifetime.
    WgExpired,
    /// WireGuard: a packet for a peer that has no endpoint yet (no
    /// Endpoint configured and not yet heard from).
    WgNoEndpoint,
    /// WireGuard: handshake messages arriving faster than they are
    /// handled (the control thread's queue was full).
    WgHandshakeBacklog,
}

impl DropReason {
    pub const COUNT: usize = 25;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Empty,
        DropReason::Truncated,
        DropReason::BadVersion,
        DropReason::BadHeaderLength,
        DropReason::LengthMismatch,
        DropReason::OverMtu,
        DropReason::NotFromPeer,
        DropReason::SendFailed,
        DropReason::TunWriteFailed,
        DropReason::BadOffload,
        DropReason::NotReflected,
        DropReason::BadVxlan,
        DropReason::WrongVni,
        DropReason::SourceNotAllowed,
        DropReason::BadChecksum,
        DropReason::Aqm,
        DropReason::Overload,
        DropReason::NoRoute,
        DropReason::WgBadAuth,
        DropReason::WgReplay,
        DropReason::WgUnknownIndex,
        DropReason::WgBadMessage,
        DropReason::WgExpired,
        DropReason::WgNoEndpoint,
        DropReason::WgHandshakeBacklog,
    ];

    /// Stable snake_case name used in stats output.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::Truncated => "truncated",
            DropReason::BadVersion => "bad_version",
            DropReason::BadHeaderLength => "bad_header_length",
            DropReason::LengthMismatch => "length_mismatch",
            DropReason::OverMtu => "over_mtu",
            DropReason::NotFromPeer => "not_from_peer",
            DropReason::SendFailed => "send_failed",
            DropReason::TunWriteFailed => "tun_write_failed",
            DropReason::BadOffload => "bad_offload",
            DropReason::NotReflected => "not_reflected",
            DropReason::BadVxlan => "bad_vxlan",
            DropReason::WrongVni => "wrong_vni",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Aqm => "aqm",
            DropReason::Overload => "overload",
            DropReason::NoRoute => "no_route",
            DropReason::WgBadAuth => "wg_bad_auth",
            DropReason::WgReplay => "wg_replay",
            DropReason::WgUnknownIndex => "wg_unknown_index",
            DropReason::WgBadMessage => "wg_bad_message",
            DropReason::WgExpired => "wg_expired",
            DropReason::WgNoEndpoint => "wg_no_endpoint",
            DropReason::WgHandshakeBacklog => "wg_handshake_backlog",
        }
    }

    /// Index into per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
