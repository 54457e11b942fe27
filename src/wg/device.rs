//! The WireGuard state of one tunnel: the interface's key pair, the rate
//! limiter every peer shares (cookie replies under load), and per peer
//! boringtun's `Tunn` (handshake, sessions, replay window, timers) with the
//! peer's current endpoint. It does no I/O: the datapath seals and opens
//! data messages through a [`PeerSet`] ([`PeerSet::seal`],
//! [`PeerSet::open`]); handshake messages the datapath hands over
//! ([`PeerSet::open`] queues them) and the timers are the runtime's control
//! thread's ([`Device::handle_handshake`], [`Device::tick`]), which sends
//! what they return.
//!
//! The peers change while the tunnel runs (`wg set`, `wg syncconf`):
//! [`Device::apply`] makes a new [`PeerSet`] in which every peer whose key,
//! preshared key and keepalive did not change is the same object, sessions
//! and all; the runtime attaches it to the peer table it routes with, so a
//! worker always seals with the set its table's peer numbers name.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

use super::conf::{WgConf, WgPeer};
use super::key::{PublicKey, Secret};
use crate::peers::PeerId;
use crate::types::{DropReason, canonical};

pub use super::wire::*;

/// The interface's key pair and the rate limiters made for it.
struct Identity {
    key: Secret,
    private: boringtun::x25519::StaticSecret,
    public: boringtun::x25519::PublicKey,
    /// Counts handshake messages (once each, before any Diffie-Hellman)
    /// and answers with a cookie beyond [`HANDSHAKES_PER_SECOND`].
    limiter: Arc<RateLimiter>,
    /// boringtun checks mac1 again inside each peer's Tunn: with no limit
    /// there, so a message is counted against the limit once.
    unlimited: Arc<RateLimiter>,
}

impl Identity {
    fn new(key: &Secret) -> Identity {
        let private = key.to_x25519();
        let public = boringtun::x25519::PublicKey::from(&private);
        Identity {
            key: key.clone(),
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
            private,
            public,
        }
    }
}

/// One peer: its key and settings, and (behind one lock) its sessions and
/// endpoint.
struct Peer {
    key: PublicKey,
    /// The top 24 bits of this peer's session indexes: fixed for the
    /// peer's life and never given to another, so a message for a removed
    /// or replaced peer finds nobody.
    slot: u32,
    preshared_key: Option<Secret>,
    persistent_keepalive: Option<u16>,
    state: Mutex<PeerState>,
}

struct PeerState {
    tunn: Tunn,
    /// Where its messages go: as configured, then its latest authenticated
    /// datagram's source (roaming).
    endpoint: Option<SocketAddr>,
}

/// The interface and its peers at one moment: peer `i` of the set is
/// `PeerId` i of the peer table built with it. What the datapath seals and
/// opens with; see the module docs.
pub struct PeerSet {
    /// None: no private key yet, and so no peers (the table's peers route
    /// to nobody: packets are dropped as `no_route`).
    identity: Option<Arc<Identity>>,
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, PeerId>,
    by_slot: HashMap<u32, PeerId>,
    handshakes: crossbeam::channel::Sender<HandshakeMsg>,
    /// The worker sockets are IPv6: IPv4 endpoints are mapped.
    v6_socket: bool,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wg::PeerSet({} peers)", self.peers.len())
    }
}

/// A tunnel's WireGuard state; see the module docs.
pub struct Device {
    current: Mutex<Arc<PeerSet>>,
    /// The next peer's slot.
    next_slot: Mutex<u32>,
    handshakes: (
        crossbeam::channel::Sender<HandshakeMsg>,
        crossbeam::channel::Receiver<HandshakeMsg>,
    ),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wg::Device({} peers)", self.current().peers.len())
    }
}

/// Slots are 24 bits.
const MAX_SLOT: u32 = 1 << 24;

/// A drop reason for boringtun's error.
fn reason(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidAeadTag | WireGuardError::InvalidMac | WireGuardError::WrongKey => {
            DropReason::WgBadAuth
        }
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp => DropReason::WgReplay,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => DropReason::WgUnknownIndex,
        WireGuardError::ConnectionExpired => DropReason::WgExpired,
        _ => DropReason::WgBadMessage,
    }
}

/// Opens a data message of peer `id` (whose state is `st`) from `src` into
/// `out`; an authenticated one moves the peer's endpoint to `src`
/// (roaming).
fn open_with(
    st: &mut PeerState,
    id: PeerId,
    src: SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
) -> Opened {
    let opened = match st.tunn.decapsulate(Some(src.ip()), datagram, out) {
        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => Opened::Packet {
            peer: id,
            len: p.len(),
        },
        TunnResult::Done => Opened::Keepalive { peer: id },
        TunnResult::Err(e) => return Opened::Dropped(reason(&e)),
        // A data message never asks for an answer.
        TunnResult::WriteToNetwork(_) => return Opened::Dropped(DropReason::WgBadMessage),
    };
    // Authenticated: the peer is where it sent from.
    st.endpoint = Some(src);
    opened
}

/// The message type of a datagram (little-endian u32 in the first four
/// bytes), if it has one.
fn message_type(datagram: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(datagram.get(..4)?.try_into().ok()?))
}

/// The receiver index of a data message (or a cookie reply).
fn receiver_index(datagram: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(datagram.get(4..8)?.try_into().ok()?))
}

impl Device {
    /// The state for `conf`'s interface and peers; peer `i` of the file is
    /// `PeerId` i (the peer table is built in the same order). Never fails
    /// here (it does where the `wireguard` feature is not built in).
    pub fn new(conf: &WgConf) -> Result<Device, String> {
        let handshakes = crossbeam::channel::bounded(HANDSHAKE_BACKLOG);
        let empty = PeerSet {
            identity: conf
                .private_key
                .as_ref()
                .map(|k| Arc::new(Identity::new(k))),
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_slot: HashMap::new(),
            handshakes: handshakes.0.clone(),
            v6_socket: false,
        };
        let dev = Device {
            current: Mutex::new(Arc::new(empty)),
            next_slot: Mutex::new(0),
            handshakes,
        };
        dev.apply(conf, |_| true)?;
        Ok(dev)
    }

    /// The peers now.
    pub fn current(&self) -> Arc<PeerSet> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `conf` current and returns its set: a peer whose key,
    /// preshared key and keepalive are unchanged (and the interface's key
    /// too) keeps its sessions, and its endpoint unless `endpoint_set` says
    /// `conf` sets it; any other peer starts afresh (the configured
    /// endpoint, else where the old one was). Peer `i` of `conf` is
    /// `PeerId` i of the new set.
    pub fn apply(
        &self,
        conf: &WgConf,
        endpoint_set: impl Fn(&PublicKey) -> bool,
    ) -> Result<Arc<PeerSet>, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let old = current.clone();
        let same_identity = old.identity.as_ref().map(|i| &i.key) == conf.private_key.as_ref();
        let identity = if same_identity {
            old.identity.clone()
        } else {
            conf.private_key
                .as_ref()
                .map(|k| Arc::new(Identity::new(k)))
        };
        let mut next_slot = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers = Vec::with_capacity(conf.peers.len());
        for p in conf.peers.iter().filter(|_| identity.is_some()) {
            let before = old.find(&p.public_key).map(|id| &old.peers[id as usize]);
            let kept = before.filter(|b| {
                same_identity
                    && b.preshared_key == p.preshared_key
                    && b.persistent_keepalive == p.persistent_keepalive
            });
            let peer = match kept {
                Some(b) => {
                    if endpoint_set(&p.public_key) {
                        let mut st = b.state.lock().unwrap_or_else(|e| e.into_inner());
                        st.endpoint = p.endpoint.map(canonical);
                    }
                    b.clone()
                }
                None => {
                    if *next_slot >= MAX_SLOT {
                        return Err("no session index left for a new peer: restart tunfwd".into());
                    }
                    let slot = *next_slot;
                    *next_slot += 1;
                    let endpoint = if endpoint_set(&p.public_key) || before.is_none() {
                        p.endpoint.map(canonical)
                    } else {
                        before.and_then(|b| b.state.lock().ok()?.endpoint)
                    };
                    let Some(me) = &identity else { break };
                    Arc::new(new_peer(me, p, slot, endpoint))
                }
            };
            peers.push(peer);
        }
        let by_key = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key, i as PeerId))
            .collect();
        let by_slot = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.slot, i as PeerId))
            .collect();
        let set = Arc::new(PeerSet {
            identity,
            peers,
            by_key,
            by_slot,
            handshakes: self.handshakes.0.clone(),
            v6_socket: old.v6_socket,
        });
        *current = set.clone();
        Ok(set)
    }

    /// The workers' sockets are bound to `local`: an IPv6 socket reaches
    /// IPv4 endpoints as `::ffff:a.b.c.d`.
    pub fn set_socket(&mut self, local: SocketAddr) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let old = current.clone();
        *current = Arc::new(PeerSet {
            identity: old.identity.clone(),
            peers: old.peers.clone(),
            by_key: old.by_key.clone(),
            by_slot: old.by_slot.clone(),
            handshakes: old.handshakes.clone(),
            v6_socket: local.is_ipv6(),
        });
    }

    pub fn peer_count(&self) -> usize {
        self.current().peers.len()
    }

    /// The peer with public key `key`.
    pub fn find(&self, key: &PublicKey) -> Option<PeerId> {
        self.current().find(key)
    }

    /// Peer `id`'s public key.
    pub fn key(&self, id: PeerId) -> Option<PublicKey> {
        self.current().key(id)
    }

    /// Peer `id`'s current endpoint.
    pub fn endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        self.current().endpoint(id)
    }

    /// [`PeerSet::seal`] with the current set.
    pub fn seal(&self, id: PeerId, plain: &[u8], out: &mut [u8]) -> Sealed {
        self.current().seal(id, plain, out)
    }

    /// [`PeerSet::seal_segments`] with the current set.
    pub fn seal_segments(&self, id: PeerId, plain: &[u8], seg: usize, out: &mut [u8]) -> Sealed {
        self.current().seal_segments(id, plain, seg, out)
    }

    /// [`PeerSet::open`] with the current set.
    pub fn open(&self, src: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Opened {
        self.current().open(src, datagram, out)
    }

    /// [`PeerSet::open_batch`] with the current set.
    pub fn open_batch(
        &self,
        src: SocketAddr,
        datagrams: impl Iterator<Item = Range<usize>>,
        buf: &mut [u8],
        scratch: &mut [u8],
        each: impl FnMut(&mut [u8], Range<usize>, Opened),
    ) {
        self.current()
            .open_batch(src, datagrams, buf, scratch, each)
    }

    /// The handshake messages the datapath queued.
    pub fn handshakes(&self) -> &crossbeam::channel::Receiver<HandshakeMsg> {
        &self.handshakes.1
    }

    /// Handles one queued handshake message (the control thread): mac1,
    /// the rate limit (a cookie reply under load), the handshake itself;
    /// `send` gets each datagram to send and where (the answer, and the
    /// packets that waited for the session). Returns the reason it was
    /// dropped, if it was.
    pub fn handle_handshake(
        &self,
        msg: &HandshakeMsg,
        out: &mut [u8],
        mut send: impl FnMut(&[u8], SocketAddr),
    ) -> Option<DropReason> {
        let set = self.current();
        let Some(me) = &set.identity else {
            return Some(DropReason::NotFromPeer);
        };
        let bytes = msg.bytes();
        let id = match me.limiter.verify_packet(Some(msg.src.ip()), bytes, out) {
            Err(TunnResult::WriteToNetwork(cookie)) => {
                send(cookie, set.socket_addr(msg.src));
                return None;
            }
            Err(TunnResult::Err(e)) => return Some(reason(&e)),
            Err(_) => return Some(DropReason::WgBadMessage),
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&me.private, &me.public, &init) {
                    Ok(half) => match set.find(&PublicKey(half.peer_static_public)) {
                        Some(id) => id,
                        None => return Some(DropReason::NotFromPeer),
                    },
                    Err(e) => return Some(reason(&e)),
                }
            }
            // Our index for the peer, in the top 24 bits (a response
            // carries the sender's index first).
            Ok(Packet::HandshakeResponse(r)) => match set.by_slot.get(&(r.receiver_idx >> 8)) {
                Some(&id) => id,
                None => return Some(DropReason::WgUnknownIndex),
            },
            Ok(Packet::PacketCookieReply(c)) => match set.by_slot.get(&(c.receiver_idx >> 8)) {
                Some(&id) => id,
                None => return Some(DropReason::WgUnknownIndex),
            },
            Ok(Packet::PacketData(_)) => return Some(DropReason::WgBadMessage),
        };
        let Some(peer) = set.peers.get(id as usize) else {
            return Some(DropReason::WgUnknownIndex);
        };
        let Ok(mut st) = peer.state.lock() else {
            return Some(DropReason::WgBadMessage);
        };
        match st.tunn.decapsulate(Some(msg.src.ip()), bytes, out) {
            TunnResult::Err(e) => return Some(reason(&e)),
            TunnResult::WriteToNetwork(answer) => {
                send(answer, set.socket_addr(msg.src));
            }
            _ => {}
        }
        // Authenticated (a cookie reply is too): the peer is there.
        if !matches!(message_type(bytes), Some(3)) {
            st.endpoint = Some(msg.src);
        }
        // The packets that waited for this session.
        let to = set.socket_addr(msg.src);
        while let TunnResult::WriteToNetwork(d) = st.tunn.decapsulate(None, &[], out) {
            send(d, to);
        }
        None
    }

    /// The timers of every peer (the control thread, a few times a
    /// second): handshake retries and rekeys, keepalives, expiry. `send`
    /// gets each datagram and where.
    pub fn tick(&self, out: &mut [u8], mut send: impl FnMut(&[u8], SocketAddr)) {
        let set = self.current();
        if let Some(me) = &set.identity {
            me.limiter.reset_count();
        }
        for peer in &set.peers {
            let Ok(mut st) = peer.state.lock() else {
                continue;
            };
            let endpoint = st.endpoint;
            if let TunnResult::WriteToNetwork(d) = st.tunn.update_timers(out) {
                if let Some(to) = endpoint {
                    send(d, set.socket_addr(to));
                }
            }
        }
    }

    /// The inner source of an opened packet, for the AllowedIPs check.
    pub fn inner_source(packet: &[u8]) -> Option<IpAddr> {
        crate::peers::packet_addr(packet, true)
    }
}

/// A peer of `identity` as `p` configures it, with session indexes in
/// `slot`, sending to `endpoint` until it is heard from.
fn new_peer(identity: &Identity, p: &WgPeer, slot: u32, endpoint: Option<SocketAddr>) -> Peer {
    Peer {
        key: p.public_key,
        slot,
        preshared_key: p.preshared_key.clone(),
        persistent_keepalive: p.persistent_keepalive,
        state: Mutex::new(PeerState {
            tunn: Tunn::new(
                identity.private.clone(),
                p.public_key.to_x25519(),
                p.preshared_key.as_ref().map(|k| *k.bytes()),
                p.persistent_keepalive,
                slot,
                Some(identity.unlimited.clone()),
            ),
            endpoint,
        }),
    }
}

impl crate::peers::Attachment for PeerSet {
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn session(&self, id: PeerId, now_ns: u64) -> Option<crate::peers::Session> {
        let f = self.facts(id);
        Some(crate::peers::Session {
            endpoint: f.endpoint,
            handshake_ns: f
                .since_handshake
                .map_or(0, |d| now_ns.saturating_sub(d.as_nanos() as u64)),
        })
    }
}

/// What `wg show` says of a peer besides its configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    pub endpoint: Option<SocketAddr>,
    /// Time since its latest handshake.
    pub since_handshake: Option<std::time::Duration>,
}

impl PeerSet {
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The peer with public key `key`.
    pub fn find(&self, key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// Peer `id`'s public key.
    pub fn key(&self, id: PeerId) -> Option<PublicKey> {
        self.peers.get(id as usize).map(|p| p.key)
    }

    /// Peer `id`'s current endpoint.
    pub fn endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        let p = self.peers.get(id as usize)?;
        p.state.lock().ok()?.endpoint
    }

    /// Peer `id`'s endpoint and latest handshake.
    pub fn facts(&self, id: PeerId) -> PeerFacts {
        let Some(p) = self.peers.get(id as usize) else {
            return PeerFacts::default();
        };
        let Ok(st) = p.state.lock() else {
            return PeerFacts::default();
        };
        PeerFacts {
            endpoint: st.endpoint,
            since_handshake: st.tunn.time_since_last_handshake(),
        }
    }

    /// Where to send to `endpoint` from the workers' sockets.
    fn socket_addr(&self, endpoint: SocketAddr) -> SocketAddr {
        match endpoint {
            SocketAddr::V4(v4) if self.v6_socket => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            a => a,
        }
    }
    /// Seals `plain` (an IP packet, already padded) for peer `id` into
    /// `out` (at least `plain.len() + OVERHEAD` and
    /// [`MAX_HANDSHAKE_LEN`] bytes).
    pub fn seal(&self, id: PeerId, plain: &[u8], out: &mut [u8]) -> Sealed {
        let Some(peer) = self.peers.get(id as usize) else {
            return Sealed::Dropped(DropReason::NoRoute);
        };
        let Ok(mut st) = peer.state.lock() else {
            return Sealed::Dropped(DropReason::SendFailed);
        };
        let Some(to) = st.endpoint else {
            return Sealed::Dropped(DropReason::WgNoEndpoint);
        };
        match st.tunn.encapsulate(plain, out) {
            TunnResult::WriteToNetwork(d) => Sealed::Datagram {
                len: d.len(),
                to: self.socket_addr(to),
            },
            TunnResult::Done => Sealed::Queued,
            TunnResult::Err(e) => Sealed::Dropped(reason(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Sealed::Dropped(DropReason::WgBadMessage)
            }
        }
    }

    /// Seals the segments of a super-packet for peer `id` under one lock:
    /// `plain` holds them back to back, each `seg` bytes (already padded;
    /// the last may be shorter), and message `i` is written at
    /// `i * (seg + OVERHEAD)` of `out`, so all but the last have one size
    /// (one UDP GSO send). Without a session, the first segment's place
    /// holds a handshake initiation and every segment waits for it.
    pub fn seal_segments(&self, id: PeerId, plain: &[u8], seg: usize, out: &mut [u8]) -> Sealed {
        let Some(peer) = self.peers.get(id as usize) else {
            return Sealed::Dropped(DropReason::NoRoute);
        };
        let Ok(mut st) = peer.state.lock() else {
            return Sealed::Dropped(DropReason::SendFailed);
        };
        let Some(to) = st.endpoint.map(|e| self.socket_addr(e)) else {
            return Sealed::Dropped(DropReason::WgNoEndpoint);
        };
        let stride = seg + OVERHEAD;
        let mut len = 0;
        for (i, p) in plain.chunks(seg.max(1)).enumerate() {
            let at = i * stride;
            match st.tunn.encapsulate(p, &mut out[at..]) {
                TunnResult::WriteToNetwork(d) if d.len() == p.len() + OVERHEAD => {
                    len = at + d.len()
                }
                TunnResult::WriteToNetwork(d) if i == 0 => {
                    // An initiation; the rest wait with the first.
                    let n = d.len();
                    for rest in plain.chunks(seg.max(1)).skip(1) {
                        let _ = st.tunn.encapsulate(rest, &mut out[n..]);
                    }
                    return Sealed::Datagram { len: n, to };
                }
                TunnResult::Done if i == 0 => {
                    for rest in plain.chunks(seg.max(1)).skip(1) {
                        let _ = st.tunn.encapsulate(rest, &mut out[stride..]);
                    }
                    return Sealed::Queued;
                }
                TunnResult::Err(e) => return Sealed::Dropped(reason(&e)),
                _ => return Sealed::Dropped(DropReason::WgBadMessage),
            }
        }
        Sealed::Datagrams {
            len,
            seg: stride,
            to,
        }
    }

    /// Opens a datagram from `src` into `out` (at least as long as the
    /// datagram). Data messages are opened here; handshake messages are
    /// queued for the control thread.
    pub fn open(&self, src: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Opened {
        let src = canonical(src);
        let (id, peer) = match self.route(src, datagram) {
            Ok(p) => p,
            Err(done) => return done,
        };
        match peer.state.lock() {
            Ok(mut st) => open_with(&mut st, id, src, datagram, out),
            Err(_) => Opened::Dropped(DropReason::WgBadMessage),
        }
    }

    /// Opens the datagrams of one receive (`datagrams`: ranges of `buf`,
    /// each copied into `scratch` and opened back where it lay), taking a
    /// peer's lock once for its datagrams in a row (a GRO batch is one
    /// peer's: one lock per batch); `each` gets `buf`, the datagram's range
    /// and what it gave, in order.
    pub fn open_batch(
        &self,
        src: SocketAddr,
        datagrams: impl Iterator<Item = Range<usize>>,
        buf: &mut [u8],
        scratch: &mut [u8],
        mut each: impl FnMut(&mut [u8], Range<usize>, Opened),
    ) {
        let src = canonical(src);
        let mut held: Option<(PeerId, std::sync::MutexGuard<'_, PeerState>)> = None;
        for d in datagrams {
            let n = d.len();
            scratch[..n].copy_from_slice(&buf[d.clone()]);
            let datagram = &scratch[..n];
            let opened = match self.route(src, datagram) {
                Err(done) => done,
                Ok((id, peer)) => {
                    if held.as_ref().map(|h| h.0) != Some(id) {
                        // One peer's lock at a time.
                        drop(held.take());
                        held = peer.state.lock().ok().map(|g| (id, g));
                    }
                    match held.as_mut() {
                        Some((_, st)) => open_with(st, id, src, datagram, &mut buf[d.start..]),
                        None => Opened::Dropped(DropReason::WgBadMessage),
                    }
                }
            };
            each(buf, d, opened);
        }
    }

    /// The peer a data message is for; Err: what became of anything else
    /// (a handshake message queued, or dropped).
    fn route(&self, src: SocketAddr, datagram: &[u8]) -> Result<(PeerId, &Peer), Opened> {
        match message_type(datagram) {
            Some(4) => {}
            Some(1..=3) => {
                let Some(msg) = HandshakeMsg::new(src, datagram) else {
                    return Err(Opened::Dropped(DropReason::WgBadMessage));
                };
                return Err(match self.handshakes.try_send(msg) {
                    Ok(()) => Opened::Handshake,
                    Err(_) => Opened::Dropped(DropReason::WgHandshakeBacklog),
                });
            }
            _ => return Err(Opened::Dropped(DropReason::WgBadMessage)),
        }
        // boringtun's index: the peer's slot in the top 24 bits.
        let Some(slot) = receiver_index(datagram).map(|i| i >> 8) else {
            return Err(Opened::Dropped(DropReason::WgBadMessage));
        };
        match self.by_slot.get(&slot) {
            Some(&id) => Ok((id, &self.peers[id as usize])),
            None => Err(Opened::Dropped(DropReason::WgUnknownIndex)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::key::Secret;

    /// Two devices that know each other, as two wg setconf files. A is
    /// B's second peer (B's first is a stranger), so the two sides' peer
    /// numbers, which WireGuard's indexes carry, differ.
    fn pair() -> (Device, Device) {
        let (a, b) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        let stranger = Secret::generate().unwrap().public_key();
        let conf = |own: &Secret, peers: &[(PublicKey, &str)]| {
            let mut text = format!("[Interface]\nPrivateKey = {}\n", own.to_base64());
            for (i, (key, at)) in peers.iter().enumerate() {
                text.push_str(&format!(
                    "[Peer]\nPublicKey = {key}\nEndpoint = {at}\nAllowedIPs = 198.19.{i}.0/24\n"
                ));
            }
            crate::wg::conf::parse(&text, |s| s.parse().map_err(|_| s.to_string())).unwrap()
        };
        (
            Device::new(&conf(&a, &[(b.public_key(), B)])).unwrap(),
            Device::new(&conf(
                &b,
                &[(stranger, "198.18.0.7:1"), (a.public_key(), A)],
            ))
            .unwrap(),
        )
    }

    const A: &str = "198.18.0.1:51820";
    const B: &str = "198.18.0.2:51820";

    /// Runs the control thread's part by hand: every queued handshake
    /// message of `dev`, its answers delivered to `other` with `open`.
    fn pump(dev: &Device, other: &Device, from: &str) -> usize {
        let mut n = 0;
        let mut out = vec![0u8; 2048];
        let mut answers = Vec::new();
        while let Ok(msg) = dev.handshakes().try_recv() {
            assert_eq!(
                dev.handle_handshake(&msg, &mut out, |d, _| answers.push(d.to_vec())),
                None
            );
            n += 1;
        }
        for a in answers {
            let mut o = vec![0u8; 2048];
            other.open(from.parse().unwrap(), &a, &mut o);
        }
        n
    }

    /// A session between `a` and `b` (A is B's peer 1): returns a data
    /// message from A that B has not opened yet.
    fn session(a: &Device, b: &Device) -> Vec<u8> {
        let pkt = crate::packet::ip::tests::ipv4_udp(100);
        let (mut out, mut o) = (vec![0u8; 2048], vec![0u8; 2048]);
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("an initiation")
        };
        assert_eq!(
            b.open(A.parse().unwrap(), &out[..len], &mut o),
            Opened::Handshake
        );
        pump(b, a, B);
        pump(a, b, A);
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("sealed")
        };
        out[..len].to_vec()
    }

    #[test]
    fn a_change_of_peers_keeps_the_sessions_of_peers_left_alone() {
        let (a, b) = pair();
        let data = session(&a, &b);
        let a_key = a.current().identity.as_ref().unwrap().key.public_key();
        let b_conf = |keepalive: Option<u16>, extra: bool| {
            let mut peers = vec![WgPeer {
                public_key: a_key,
                preshared_key: None,
                endpoint: None,
                allowed_ips: vec!["198.19.1.0/24".parse().unwrap()],
                persistent_keepalive: keepalive,
                line: 0,
            }];
            if extra {
                let mut other = peers[0].clone();
                other.public_key = Secret::generate().unwrap().public_key();
                other.allowed_ips = vec!["198.19.9.0/24".parse().unwrap()];
                peers.insert(0, other);
            }
            WgConf {
                private_key: Some(b.current().identity.as_ref().unwrap().key.clone()),
                listen_port: None,
                fwmark: None,
                peers,
            }
        };
        // The stranger removed, a new peer first: A is now peer 1 of a new
        // set, and its session (and endpoint) went on.
        let set = b.apply(&b_conf(None, true), |_| false).unwrap();
        assert_eq!(set.find(&a_key), Some(1));
        assert_eq!(
            set.endpoint(1),
            Some(A.parse().unwrap()),
            "roamed endpoint kept"
        );
        let mut o = vec![0u8; 2048];
        assert!(matches!(
            set.open(A.parse().unwrap(), &data, &mut o),
            Opened::Packet { peer: 1, .. }
        ));
        // A's keepalive changed: a new peer object, its old session gone.
        let mut out = vec![0u8; 2048];
        let pkt = crate::packet::ip::tests::ipv4_udp(100);
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("sealed")
        };
        let data = out[..len].to_vec();
        let set = b.apply(&b_conf(Some(25), false), |_| false).unwrap();
        assert_eq!(set.find(&a_key), Some(0));
        assert_eq!(
            set.open(A.parse().unwrap(), &data, &mut o),
            Opened::Dropped(DropReason::WgUnknownIndex)
        );
        // An old set (a worker that has not taken the new table yet) still
        // names the peers it had.
        assert_eq!(b.current().peer_count(), 1);
    }

    #[test]
    fn a_handshake_then_data_both_ways_and_attacks_are_counted() {
        let (a, b) = pair();
        let pkt = crate::packet::ip::tests::ipv4_udp(100);
        let mut out = vec![0u8; 2048];
        // No session: the packet waits, a handshake initiation goes out.
        let Sealed::Datagram { len, to } = a.seal(0, &pkt, &mut out) else {
            panic!("an initiation")
        };
        assert_eq!((len, to), (148, B.parse().unwrap()));
        let init = out[..len].to_vec();
        let mut o = vec![0u8; 2048];
        assert_eq!(b.open(A.parse().unwrap(), &init, &mut o), Opened::Handshake);
        // B answers; A takes the response and sends the waiting packet.
        assert_eq!(pump(&b, &a, B), 1);
        assert_eq!(pump(&a, &b, A), 1);
        // Data A -> B through the session.
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("sealed")
        };
        assert_eq!(len, pkt.len() + OVERHEAD);
        let data = out[..len].to_vec();
        assert_eq!(
            b.open(A.parse().unwrap(), &data, &mut o),
            Opened::Packet {
                peer: 1,
                len: pkt.len()
            }
        );
        assert_eq!(&o[..pkt.len()], &pkt[..]);
        // Replayed: refused.
        assert_eq!(
            b.open(A.parse().unwrap(), &data, &mut o),
            Opened::Dropped(DropReason::WgReplay)
        );
        // One bit flipped in the ciphertext: refused.
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("sealed")
        };
        let mut flipped = out[..len].to_vec();
        flipped[40] ^= 1;
        assert_eq!(
            b.open(A.parse().unwrap(), &flipped, &mut o),
            Opened::Dropped(DropReason::WgBadAuth)
        );
        // An unknown receiver index.
        let mut unknown = data.clone();
        unknown[4..8].copy_from_slice(&(77u32 << 8).to_le_bytes());
        assert_eq!(
            b.open(A.parse().unwrap(), &unknown, &mut o),
            Opened::Dropped(DropReason::WgUnknownIndex)
        );
        // Not a WireGuard message.
        assert_eq!(
            b.open(A.parse().unwrap(), &[9, 0, 0, 0, 1], &mut o),
            Opened::Dropped(DropReason::WgBadMessage)
        );
        // B -> A, from a new address: A's endpoint for B follows (roaming).
        let Sealed::Datagram { len, .. } = b.seal(1, &pkt, &mut out) else {
            panic!("sealed")
        };
        let moved: SocketAddr = "198.18.0.9:4000".parse().unwrap();
        assert!(matches!(
            a.open(moved, &out[..len], &mut o),
            Opened::Packet { peer: 0, .. }
        ));
        assert_eq!(a.endpoint(0), Some(moved));
    }

    #[test]
    fn segments_seal_into_equal_strides_and_each_opens() {
        let (a, b) = pair();
        let mut out = vec![0u8; 8192];
        let mut o = vec![0u8; 2048];
        let pkt = crate::packet::ip::tests::ipv4_udp(100);
        // Before a session: an initiation, and every segment waits.
        let last = crate::packet::ip::tests::ipv4_udp(36);
        assert_eq!(last.len(), 64);
        let plain: Vec<u8> = [pkt.clone(), pkt.clone(), last].concat();
        let seg = pkt.len();
        let Sealed::Datagram { len, .. } = a.seal_segments(0, &plain, seg, &mut out) else {
            panic!("an initiation")
        };
        assert_eq!(len, MAX_HANDSHAKE_LEN);
        b.open(A.parse().unwrap(), &out[..len], &mut o);
        assert_eq!(pump(&b, &a, B), 1);
        assert_eq!(pump(&a, &b, A), 1, "the three waited and went after it");
        // With a session: three messages at strides of seg + 32.
        let Sealed::Datagrams {
            len, seg: stride, ..
        } = a.seal_segments(0, &plain, seg, &mut out)
        else {
            panic!("sealed")
        };
        assert_eq!((stride, len), (seg + OVERHEAD, 2 * stride + 64 + OVERHEAD));
        for (i, want) in [seg, seg, 64].into_iter().enumerate() {
            let m = &out[i * stride..(i * stride + want + OVERHEAD)];
            assert_eq!(
                b.open(A.parse().unwrap(), m, &mut o),
                Opened::Packet {
                    peer: 1,
                    len: want.min(pkt.len())
                },
                "segment {i}"
            );
        }
    }

    /// A receive's datagrams opened in place, in order, whatever each is.
    #[test]
    fn a_batch_opens_in_place_in_order() {
        let (a, b) = pair();
        let mut out = vec![0u8; 8192];
        let pkt = crate::packet::ip::tests::ipv4_udp(100);
        let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
            panic!("an initiation")
        };
        b.open(A.parse().unwrap(), &out[..len], &mut vec![0u8; 2048]);
        pump(&b, &a, B);
        pump(&a, &b, A);
        // Two data messages, garbage, and a third, back to back.
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for i in 0..4 {
            let m = if i == 2 {
                vec![9u8; 40]
            } else {
                let Sealed::Datagram { len, .. } = a.seal(0, &pkt, &mut out) else {
                    panic!("sealed")
                };
                out[..len].to_vec()
            };
            ranges.push(buf.len()..buf.len() + m.len());
            buf.extend_from_slice(&m);
        }
        let mut scratch = vec![0u8; 4096];
        let mut seen = Vec::new();
        b.open_batch(
            A.parse().unwrap(),
            ranges.clone().into_iter(),
            &mut buf,
            &mut scratch,
            |buf, d, o| {
                if let Opened::Packet { len, .. } = o {
                    assert_eq!(
                        &buf[d.start..d.start + len],
                        &pkt[..],
                        "opened where it lay"
                    );
                }
                seen.push(o);
            },
        );
        let p = Opened::Packet {
            peer: 1,
            len: pkt.len(),
        };
        assert_eq!(
            seen,
            [
                p.clone(),
                p.clone(),
                Opened::Dropped(DropReason::WgBadMessage),
                p
            ]
        );
    }

    #[test]
    fn a_forged_initiation_is_dropped_and_a_flood_gets_cookies() {
        let (a, b) = pair();
        let mut out = vec![0u8; 2048];
        let Sealed::Datagram { len, .. } = a.seal(0, &[0x45; 20], &mut out) else {
            panic!("an initiation")
        };
        let mut init = out[..len].to_vec();
        // A bad mac1: dropped as unauthenticated before any DH.
        init[120] ^= 1;
        let mut o = vec![0u8; 2048];
        b.open(A.parse().unwrap(), &init, &mut o);
        let msg = b.handshakes().try_recv().unwrap();
        assert_eq!(
            b.handle_handshake(&msg, &mut o, |_, _| panic!("no answer")),
            Some(DropReason::WgBadAuth)
        );
        init[120] ^= 1;
        // More valid initiations than the limit: cookie replies after it.
        let mut cookies = 0;
        for _ in 0..HANDSHAKES_PER_SECOND + 20 {
            b.open(A.parse().unwrap(), &init, &mut o);
            let msg = b.handshakes().try_recv().unwrap();
            b.handle_handshake(&msg, &mut o, |d, _| {
                if d.len() == COOKIE_REPLY_LEN {
                    cookies += 1;
                }
            });
        }
        assert_eq!(
            cookies, 20,
            "a cookie reply for each initiation beyond the limit"
        );
    }
}
