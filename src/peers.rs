//! Many peers: which peer an inner address belongs to, which peer a
//! datagram came from, and what each peer moved.
//!
//! A [`PeerTable`] is built once from [`PeerSpec`]s (`--peer ADDR:PORT=CIDR,...`,
//! `--peers-file`) and never changes; a reload builds a new one and swaps it
//! in whole ([`SharedPeers`]). The prefixes have WireGuard's AllowedIPs
//! meaning: one list both routes and filters.
//! - **Outgoing**: the inner destination picks the peer whose prefix is the
//!   longest match ([`PeerTable::route`]); none is a `no_route` drop.
//! - **Incoming**: the UDP source (address and port) finds the peer in a
//!   hash map ([`PeerTable::find`]); the inner source must route back to
//!   that same peer ([`PeerTable::accepts`]), so a peer cannot send with
//!   another peer's inner addresses.
//!
//! A single peer without prefixes is the point-to-point tunnel: everything
//! goes to it and anything from it is accepted (subject to `--allow-src`),
//! with no lookup at all.
//!
//! The longest-prefix match ([`Lpm`]) turns the nested prefixes into
//! disjoint address ranges, each owned by the longest prefix covering it,
//! kept as a sorted array of range starts; a lookup finds the last start at
//! or below the address. A 65,536-entry index on the 16 bits after the
//! starts' common leading bits narrows that to the few starts in the
//! address's bucket, so a lookup is two or three memory reads and a short
//! binary search, without allocation, for any table size.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::stats::{Counter, Max};
use crate::types::DropReason;
use crate::types::Prefix;

/// Most peers one table may hold.
pub const MAX_PEERS: usize = 1 << 20;
/// Most per-peer counter sets (peers x queues: every worker counts for
/// every peer in a set of its own, [`PeerCounters`], 256 bytes): 256 MiB.
/// A reload builds the new table while the old one lives, so a running
/// forwarder may briefly hold twice that.
pub const MAX_PEER_COUNTER_SETS: usize = 1 << 20;

/// One peer as configured: its UDP address and the inner prefixes it owns
/// (empty only for the single peer of a point-to-point tunnel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub addr: SocketAddr,
    pub prefixes: Vec<Prefix>,
}

impl PeerSpec {
    /// `ADDR:PORT`, `ADDR:PORT=CIDR,CIDR...`; `endpoint` parses the address
    /// (it knows interface names for link-local scopes).
    pub fn parse_with(
        s: &str,
        endpoint: impl Fn(&str) -> Result<SocketAddr, String>,
    ) -> Result<PeerSpec, String> {
        let (addr, list) = match s.split_once('=') {
            Some((a, l)) => (a.trim(), Some(l)),
            None => (s.trim(), None),
        };
        let addr = endpoint(addr)?;
        let mut prefixes = Vec::new();
        if let Some(list) = list {
            for p in list.split([',', ' ', '\t']).filter(|p| !p.is_empty()) {
                prefixes.push(Prefix::parse_exact(p)?);
            }
            if prefixes.is_empty() {
                return Err(format!(
                    "{s:?}: no prefixes after '=' (ADDR:PORT=CIDR,CIDR...)"
                ));
            }
        }
        Ok(PeerSpec { addr, prefixes })
    }
}

impl FromStr for PeerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        PeerSpec::parse_with(s, |a| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("{a:?} is not ADDR:PORT (e.g. 198.18.0.2:5000)"))
        })
    }
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        for (i, p) in self.prefixes.iter().enumerate() {
            write!(f, "{}{p}", if i == 0 { '=' } else { ',' })?;
        }
        Ok(())
    }
}

/// Parses a peers file: one peer per line as `ADDR:PORT CIDR,CIDR...` (or
/// `ADDR:PORT=CIDR,...`, the `--peer` form; prefixes separated by commas or
/// blanks), `#` starts a comment, blank lines are skipped. Errors name the
/// line.
pub fn parse_peers_file(
    text: &str,
    endpoint: impl Fn(&str) -> Result<SocketAddr, String>,
) -> Result<Vec<PeerSpec>, String> {
    let mut peers = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        // `ADDR:PORT CIDR,...` or `ADDR:PORT = CIDR,...`: one '=' at most
        // (a second one is left in place, where the prefix parser refuses
        // it).
        let normal = match line.split_once([' ', '\t']) {
            Some((a, rest)) if !a.contains('=') => {
                let rest = rest.trim_start();
                let rest = rest.strip_prefix('=').unwrap_or(rest);
                format!("{a}={}", rest.trim_start())
            }
            _ => line.to_string(),
        };
        let spec =
            PeerSpec::parse_with(&normal, &endpoint).map_err(|e| format!("line {}: {e}", n + 1))?;
        if spec.prefixes.is_empty() {
            return Err(format!(
                "line {}: peer {} has no prefixes (a peers-file line is ADDR:PORT CIDR,CIDR...)",
                n + 1,
                spec.addr
            ));
        }
        peers.push(spec);
    }
    Ok(peers)
}

/// An address as an unsigned integer of its family's width.
pub trait Key: Copy + Ord + Default + fmt::Debug + std::hash::Hash {
    const BITS: u32;
    const MAX: Self;
    /// The bits `[from, from + n)` counted from the most significant one.
    fn window(self, from: u32, n: u32) -> usize;
    /// Leading bits that `self` and `other` share.
    fn common(self, other: Self) -> u32;
    /// The first and last address of the prefix of `len` bits at `net`.
    fn range(net: Self, len: u8) -> (Self, Self);
    fn succ(self) -> Self;
    fn pred(self) -> Self;
}

macro_rules! key_impl {
    ($t:ty) => {
        impl Key for $t {
            const BITS: u32 = <$t>::BITS;
            const MAX: Self = <$t>::MAX;
            #[inline]
            fn window(self, from: u32, n: u32) -> usize {
                if n == 0 {
                    return 0;
                }
                let v = self.checked_shl(from).unwrap_or(0);
                (v >> (Self::BITS - n)) as usize
            }
            #[inline]
            fn common(self, other: Self) -> u32 {
                (self ^ other).leading_zeros()
            }
            fn range(net: Self, len: u8) -> (Self, Self) {
                let host = <$t>::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                (net & !host, net | host)
            }
            fn succ(self) -> Self {
                self.wrapping_add(1)
            }
            fn pred(self) -> Self {
                self.wrapping_sub(1)
            }
        }
    };
}
key_impl!(u32);
key_impl!(u128);

/// No owner: an address range no prefix covers.
const NONE: u32 = u32::MAX;

/// Bits of the bucket index.
const INDEX_BITS: u32 = 16;
/// Below this many ranges a binary search over all of them is as quick as
/// the index.
const INDEX_MIN: usize = 64;

/// Longest-prefix match over one address family: disjoint ranges (each
/// start and the owner of the addresses from it to the next start), plus a
/// bucket index over the starts.
#[derive(Clone, Debug)]
pub struct Lpm<K: Key> {
    starts: Vec<K>,
    owners: Vec<u32>,
    /// Leading bits every start but the first (0) shares; the index reads
    /// the INDEX_BITS bits after them.
    common: u32,
    bits: u32,
    /// `index[k]`: the first start (from 1) whose bucket is at least `k`;
    /// `index.len()` is `2^bits + 1`. Empty: no index.
    index: Vec<u32>,
}

impl<K: Key> Default for Lpm<K> {
    fn default() -> Self {
        Lpm {
            starts: vec![K::default()],
            owners: vec![NONE],
            common: 0,
            bits: 0,
            index: Vec::new(),
        }
    }
}

impl<K: Key> Lpm<K> {
    /// Builds the ranges from `(network, length, owner)`; networks have no
    /// host bits. Two entries for the same prefix: Err with the prefix
    /// and both owners.
    #[allow(clippy::type_complexity)]
    pub fn build(mut prefixes: Vec<(K, u8, u32)>) -> Result<Lpm<K>, (K, u8, u32, u32)> {
        prefixes.sort_unstable_by_key(|&(net, len, _)| (net, len));
        for w in prefixes.windows(2) {
            if (w[0].0, w[0].1) == (w[1].0, w[1].1) {
                return Err((w[0].0, w[0].1, w[0].2, w[1].2));
            }
        }
        let mut out = Ranges::default();
        out.emit(K::default(), NONE);
        // Open prefixes, innermost last: (last address, owner).
        let mut open: Vec<(K, u32)> = Vec::new();
        let close = |open: &mut Vec<(K, u32)>, out: &mut Ranges<K>| {
            if let Some((end, _)) = open.pop() {
                if end != K::MAX {
                    out.emit(end.succ(), open.last().map_or(NONE, |o| o.1));
                }
            }
        };
        for (net, len, owner) in prefixes {
            let (first, last) = K::range(net, len);
            while open.last().is_some_and(|&(end, _)| end < first) {
                close(&mut open, &mut out);
            }
            out.emit(first, owner);
            open.push((last, owner));
        }
        while !open.is_empty() {
            close(&mut open, &mut out);
        }
        let mut lpm = Lpm {
            starts: out.starts,
            owners: out.owners,
            common: 0,
            bits: 0,
            index: Vec::new(),
        };
        lpm.build_index();
        Ok(lpm)
    }

    fn build_index(&mut self) {
        let n = self.starts.len();
        if n < INDEX_MIN {
            return;
        }
        let (lo, hi) = (self.starts[1], self.starts[n - 1]);
        self.common = lo.common(hi).min(K::BITS);
        self.bits = INDEX_BITS.min(K::BITS - self.common);
        let buckets = 1usize << self.bits;
        let mut index = vec![0u32; buckets + 1];
        // index[k] = 1 + number of starts (from 1) in buckets below k.
        let mut i = 1;
        for (k, slot) in index.iter_mut().enumerate() {
            while i < n && self.starts[i].window(self.common, self.bits) < k {
                i += 1;
            }
            *slot = i as u32;
        }
        self.index = index;
    }

    /// The owner of `addr`: the longest prefix that holds it.
    #[inline]
    pub fn lookup(&self, addr: K) -> Option<u32> {
        let i = self.position(addr);
        let owner = self.owners[i];
        (owner != NONE).then_some(owner)
    }

    /// The last range whose start is at most `addr`.
    #[inline]
    fn position(&self, addr: K) -> usize {
        let s = &self.starts;
        if self.index.is_empty() {
            return s.partition_point(|&x| x <= addr) - 1;
        }
        let last = s.len() - 1;
        if addr < s[1] {
            return 0;
        }
        if addr >= s[last] {
            return last;
        }
        // Between the first and the last start, `addr` shares their common
        // leading bits: its bucket holds the answer's successor.
        let k = addr.window(self.common, self.bits);
        let from = self.index[k] as usize;
        let to = self.index[k + 1] as usize;
        from - 1 + s[from..to].partition_point(|&x| x <= addr)
    }

    /// Ranges (for sizing and tests).
    pub fn ranges(&self) -> usize {
        self.starts.len()
    }
}

#[derive(Default)]
struct Ranges<K> {
    starts: Vec<K>,
    owners: Vec<u32>,
}

impl<K: Key> Ranges<K> {
    /// Addresses from `start` on belong to `owner` (until the next emit).
    fn emit(&mut self, start: K, owner: u32) {
        if self.starts.last() == Some(&start) {
            self.owners.pop();
            self.starts.pop();
        }
        if self.owners.last() == Some(&owner) {
            return;
        }
        self.starts.push(start);
        self.owners.push(owner);
    }
}

/// Which peer, in one table.
pub type PeerId = u32;

/// What one worker counted for one peer (each worker writes only its own:
/// no locked instruction; padded so workers never share a cache line).
#[derive(Default, Debug)]
#[repr(align(64))]
pub struct PeerCounters {
    /// Datagrams handed to the socket for the peer, and their bytes.
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    /// Packets accepted from the peer (to be written to the TUN device),
    /// and their bytes.
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    /// When a datagram from the peer was last taken (ns since the Unix
    /// epoch), whatever became of it.
    pub last_rx_ns: Max,
    drops: [Counter; DropReason::COUNT],
}

impl PeerCounters {
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason.index()].add(1);
    }
}

/// A peer's counters, one set per worker; kept across reloads for a peer
/// whose address stays.
#[derive(Debug)]
pub struct PeerStats {
    workers: Box<[PeerCounters]>,
}

impl PeerStats {
    pub fn new(workers: usize) -> PeerStats {
        PeerStats {
            workers: (0..workers.max(1))
                .map(|_| PeerCounters::default())
                .collect(),
        }
    }

    /// Worker `w`'s counters.
    #[inline]
    pub fn worker(&self, w: usize) -> &PeerCounters {
        &self.workers[w.min(self.workers.len() - 1)]
    }

    /// Bytes both ways, summed over workers.
    pub fn bytes(&self) -> u64 {
        self.workers
            .iter()
            .map(|c| c.tx_bytes.get() + c.rx_bytes.get())
            .sum()
    }

    /// The sum over workers.
    pub fn snapshot(&self) -> PeerSnapshot {
        let mut s = PeerSnapshot::default();
        for c in self.workers.iter() {
            s.tx_packets += c.tx_packets.get();
            s.tx_bytes += c.tx_bytes.get();
            s.rx_packets += c.rx_packets.get();
            s.rx_bytes += c.rx_bytes.get();
            s.last_rx_ns = s.last_rx_ns.max(c.last_rx_ns.get());
            for (d, c) in s.drops.iter_mut().zip(&c.drops) {
                *d += c.get();
            }
        }
        s
    }
}

/// A peer's counters summed over workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub last_rx_ns: u64,
    pub drops: [u64; DropReason::COUNT],
    /// A way with sessions (WireGuard): the peer's current endpoint and
    /// its latest handshake (ns since the Unix epoch, 0 if none).
    pub session: Option<Session>,
}

/// What a way with sessions knows of a peer ([`Attachment::session`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub endpoint: Option<SocketAddr>,
    pub handshake_ns: u64,
}

/// Per-peer state an encapsulation keeps for a table's peer numbers
/// ([`PeerTable::attach`]): what it is, for the datapath to take back
/// ([`PeerTable::attached`]), and what reports say of each peer.
pub trait Attachment: std::any::Any + Send + Sync {
    /// Itself, as the type it is.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
    /// Peer `id`'s session facts, at `now_ns`.
    fn session(&self, id: PeerId, now_ns: u64) -> Option<Session>;
}

impl PeerSnapshot {
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    /// The same fields as [`PeerSnapshot::fields`], as JSON (`last_rx_s_ago`
    /// null when nothing came).
    pub fn to_json(&self, now_ns: u64) -> serde_json::Value {
        let ago =
            (self.last_rx_ns > 0).then(|| now_ns.saturating_sub(self.last_rx_ns) as f64 / 1e9);
        let mut v = serde_json::json!({
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "drops": self.dropped(),
            "drop_reasons": crate::stats::nonzero_drops_json(&self.drops),
            "last_rx_s_ago": ago,
        });
        if let Some(s) = &self.session {
            v["endpoint"] = s.endpoint.map(|e| e.to_string()).into();
            v["last_handshake_s_ago"] = (s.handshake_ns > 0)
                .then(|| now_ns.saturating_sub(s.handshake_ns) as f64 / 1e9)
                .into();
        }
        v
    }

    /// `key=value` fields, as the stats lines print them; `now_ns` (Unix
    /// epoch) dates the last receive.
    pub fn fields(&self, now_ns: u64) -> String {
        let mut s = format!(
            "tx_packets={} tx_bytes={} rx_packets={} rx_bytes={} drops={}",
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
            self.dropped()
        );
        let reasons: Vec<String> = crate::stats::nonzero_drops(&self.drops)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !reasons.is_empty() {
            s.push_str(&format!("[{}]", reasons.join(" ")));
        }
        if self.last_rx_ns == 0 {
            s.push_str(" last_rx=never");
        } else {
            let ago = now_ns.saturating_sub(self.last_rx_ns) as f64 / 1e9;
            s.push_str(&format!(" last_rx_s_ago={ago:.1}"));
        }
        if let Some(x) = &self.session {
            match x.endpoint {
                Some(e) => s.push_str(&format!(" endpoint={e}")),
                None => s.push_str(" endpoint=none"),
            }
            if x.handshake_ns == 0 {
                s.push_str(" handshake=never");
            } else {
                let ago = now_ns.saturating_sub(x.handshake_ns) as f64 / 1e9;
                s.push_str(&format!(" handshake_s_ago={ago:.1}"));
            }
        }
        s
    }
}

/// One peer of a table.
#[derive(Debug)]
pub struct Peer {
    /// As configured, canonical (see [`crate::types::canonical`]).
    pub addr: SocketAddr,
    /// How stats and metrics name it: its public key (WireGuard), or its
    /// address when None.
    pub name: Option<String>,
    pub prefixes: Vec<Prefix>,
    pub stats: Arc<PeerStats>,
}

/// Every peer of a tunnel, with the lookups the datapath makes. Built once
/// ([`PeerTable::build`]), shared by the workers, swapped whole.
#[derive(Debug)]
pub struct PeerTable {
    peers: Vec<Peer>,
    v4: Lpm<u32>,
    v6: Lpm<u128>,
    /// Peer by UDP source (canonical address and port); keyed SipHash, so
    /// a sender cannot choose colliding source addresses.
    by_addr: HashMap<SocketAddr, PeerId>,
    /// One peer without prefixes: everything routes to it.
    catch_all: bool,
    /// Match only the address of a datagram's source, not its port (TAP
    /// mode: VXLAN senders pick the source port from a flow hash).
    any_port: bool,
    prefixes: usize,
    attached: Option<Attached>,
}

/// Per-peer state of an encapsulation, kept with the table
/// ([`PeerTable::attach`]).
#[derive(Clone)]
struct Attached(Arc<dyn Attachment>);

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attached")
    }
}

/// Why a set of peers cannot be a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableError {
    NoPeers,
    TooMany(usize),
    /// peers x workers beyond [`MAX_PEER_COUNTER_SETS`].
    TooManyCounters {
        peers: usize,
        workers: usize,
    },
    /// The peer at `index` has the address of an earlier one.
    DuplicatePeer {
        addr: SocketAddr,
        index: usize,
    },
    /// The peer at `index` has a prefix an earlier peer (or itself) has.
    DuplicatePrefix {
        prefix: Prefix,
        first: SocketAddr,
        second: SocketAddr,
        index: usize,
    },
    /// Several peers, and the one at `index` has no prefixes to route by.
    NoPrefixes {
        addr: SocketAddr,
        index: usize,
    },
}

impl TableError {
    /// Which peer (its index in the list given to [`PeerTable::build`]) the
    /// error is about: the later of two that conflict.
    pub fn peer_index(&self) -> Option<usize> {
        match self {
            TableError::NoPeers | TableError::TooMany(_) | TableError::TooManyCounters { .. } => {
                None
            }
            TableError::DuplicatePeer { index, .. }
            | TableError::DuplicatePrefix { index, .. }
            | TableError::NoPrefixes { index, .. } => Some(*index),
        }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::NoPeers => f.write_str("no peers"),
            TableError::TooMany(n) => write!(f, "{n} peers: at most {MAX_PEERS}"),
            TableError::TooManyCounters { peers, workers } => {
                let set = std::mem::size_of::<PeerCounters>();
                let mib = |sets: usize| sets.saturating_mul(set) >> 20;
                write!(
                    f,
                    "{peers} peers x {workers} queues need {} per-peer counter sets ({} MiB): at \
                     most {MAX_PEER_COUNTER_SETS} ({} MiB); use fewer queues or fewer peers",
                    peers.saturating_mul(*workers),
                    mib(peers.saturating_mul(*workers)),
                    mib(MAX_PEER_COUNTER_SETS)
                )
            }
            TableError::DuplicatePeer { addr, .. } => write!(f, "peer {addr} is given twice"),
            TableError::DuplicatePrefix {
                prefix,
                first,
                second,
                ..
            } => {
                if first == second {
                    write!(f, "prefix {prefix} is given twice for peer {first}")
                } else {
                    write!(
                        f,
                        "prefix {prefix} is given to both peer {first} and peer {second}"
                    )
                }
            }
            TableError::NoPrefixes { addr: a, .. } => write!(
                f,
                "peer {a} has no prefixes: with several peers each needs its own (ADDR:PORT=CIDR,...)"
            ),
        }
    }
}

impl PeerTable {
    /// The table for `specs`, with counters for `workers` workers; a peer
    /// whose address is in `old` keeps its counters. `any_port`: match
    /// datagram sources by address only (TAP mode).
    pub fn build(
        specs: &[PeerSpec],
        workers: usize,
        any_port: bool,
        old: Option<&PeerTable>,
    ) -> Result<PeerTable, TableError> {
        PeerTable::assemble(specs, workers, any_port, false, old)
    }

    /// The table of WireGuard peers, told apart by key, not address: each
    /// `addr` is only the configured endpoint (or unspecified), may repeat,
    /// and is never matched against a datagram's source; a peer without
    /// prefixes (AllowedIPs) routes nothing and is sent nothing from.
    /// `names[i]` names peer `i` in stats and metrics (its public key); a
    /// peer whose name is in `old` keeps its counters. May be empty (a
    /// WireGuard interface before `wg` gives it peers).
    pub fn build_keyed(
        specs: &[PeerSpec],
        names: &[String],
        workers: usize,
        old: Option<&PeerTable>,
    ) -> Result<PeerTable, TableError> {
        let mut t = PeerTable::assemble(specs, workers, false, true, None)?;
        for (p, n) in t.peers.iter_mut().zip(names) {
            p.name = Some(n.clone());
            if let Some(o) = old.and_then(|o| o.peers.iter().find(|o| o.name.as_ref() == Some(n))) {
                p.stats = o.stats.clone();
            }
        }
        Ok(t)
    }

    /// Attaches what an encapsulation keeps per peer for this table's
    /// peer numbers (WireGuard's peer set), so that a worker takes the two
    /// together; see [`PeerTable::attached`].
    pub fn attach(&mut self, state: Arc<dyn Attachment>) {
        self.attached = Some(Attached(state));
    }

    /// What [`PeerTable::attach`] attached, if it is a `T`.
    pub fn attached<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.attached
            .as_ref()?
            .0
            .clone()
            .as_any()
            .downcast::<T>()
            .ok()
    }

    fn assemble(
        specs: &[PeerSpec],
        workers: usize,
        any_port: bool,
        keyed: bool,
        old: Option<&PeerTable>,
    ) -> Result<PeerTable, TableError> {
        if specs.is_empty() && !keyed {
            return Err(TableError::NoPeers);
        }
        if specs.len() > MAX_PEERS {
            return Err(TableError::TooMany(specs.len()));
        }
        let workers = workers.max(1);
        if specs.len().saturating_mul(workers) > MAX_PEER_COUNTER_SETS {
            return Err(TableError::TooManyCounters {
                peers: specs.len(),
                workers,
            });
        }
        let catch_all = !keyed && specs.len() == 1 && specs[0].prefixes.is_empty();
        let mut by_addr = HashMap::with_capacity(specs.len());
        let mut peers = Vec::with_capacity(specs.len());
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (id, spec) in specs.iter().enumerate() {
            let addr = key_addr(crate::types::canonical(spec.addr), any_port);
            if !keyed && by_addr.insert(addr, id as PeerId).is_some() {
                return Err(TableError::DuplicatePeer {
                    addr: spec.addr,
                    index: id,
                });
            }
            if spec.prefixes.is_empty() && !catch_all && !keyed {
                return Err(TableError::NoPrefixes {
                    addr: spec.addr,
                    index: id,
                });
            }
            for p in &spec.prefixes {
                match p.net() {
                    IpAddr::V4(n) => v4.push((u32::from(n), p.len(), id as u32)),
                    IpAddr::V6(n) => v6.push((u128::from(n), p.len(), id as u32)),
                }
            }
            let stats = old
                .and_then(|t| t.find_exact(addr))
                .map(|p| p.stats.clone())
                .unwrap_or_else(|| Arc::new(PeerStats::new(workers)));
            peers.push(Peer {
                addr: crate::types::canonical(spec.addr),
                name: None,
                prefixes: spec.prefixes.clone(),
                stats,
            });
        }
        let dup = |(net, len, a, b): (IpAddr, u8, u32, u32)| TableError::DuplicatePrefix {
            prefix: Prefix::new(net, len).expect("a prefix of the table"),
            first: specs[a.min(b) as usize].addr,
            second: specs[a.max(b) as usize].addr,
            index: a.max(b) as usize,
        };
        let prefixes = v4.len() + v6.len();
        let v4 = Lpm::build(v4)
            .map_err(|(n, l, a, b)| dup((IpAddr::from(std::net::Ipv4Addr::from(n)), l, a, b)))?;
        let v6 = Lpm::build(v6)
            .map_err(|(n, l, a, b)| dup((IpAddr::from(std::net::Ipv6Addr::from(n)), l, a, b)))?;
        Ok(PeerTable {
            peers,
            v4,
            v6,
            by_addr,
            catch_all,
            any_port,
            prefixes,
            attached: None,
        })
    }

    /// A point-to-point table: one peer, no prefixes.
    pub fn single(peer: SocketAddr, any_port: bool) -> PeerTable {
        PeerTable::build(
            &[PeerSpec {
                addr: peer,
                prefixes: Vec::new(),
            }],
            1,
            any_port,
            None,
        )
        .expect("one peer is a table")
    }

    fn find_exact(&self, key: SocketAddr) -> Option<&Peer> {
        self.by_addr.get(&key).map(|&i| &self.peers[i as usize])
    }

    /// True for a point-to-point table (one peer, no prefixes).
    pub fn is_single(&self) -> bool {
        self.catch_all
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn prefixes(&self) -> usize {
        self.prefixes
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn peer(&self, id: PeerId) -> &Peer {
        &self.peers[id as usize]
    }

    /// The peer a datagram from `src` (canonical, its port already
    /// shifted back by the worker's queue) came from.
    #[inline]
    pub fn find(&self, src: SocketAddr) -> Option<PeerId> {
        if self.catch_all {
            let p = &self.peers[0].addr;
            let hit = if self.any_port {
                src.ip() == p.ip()
            } else {
                src == *p
            };
            return hit.then_some(0);
        }
        self.by_addr.get(&key_addr(src, self.any_port)).copied()
    }

    /// The peer for inner destination `dst`: the longest prefix holding
    /// it.
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Option<PeerId> {
        if self.catch_all {
            return Some(0);
        }
        match dst {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// The same for the destination of a valid IP packet `pkt`.
    #[inline]
    pub fn route_packet(&self, pkt: &[u8]) -> Option<PeerId> {
        if self.catch_all {
            return Some(0);
        }
        self.route(packet_addr(pkt, false)?)
    }

    /// True if `peer` may send packets from inner source `src`: the source
    /// routes back to it (any source for a point-to-point peer).
    #[inline]
    pub fn accepts(&self, peer: PeerId, src: IpAddr) -> bool {
        self.catch_all || self.route(src) == Some(peer)
    }

    /// The names (see [`Peer::name`]) and counters of the `n` peers that
    /// moved the most bytes (both ways), most first, with their session
    /// facts at `now_ns` where the table has an [`Attachment`].
    ///
    /// Memory is O(n), not O(peers): a bounded heap keeps the best `n` by
    /// bytes (ties by address), and only those are snapshotted.
    pub fn top(&self, n: usize, now_ns: u64) -> Vec<(String, PeerSnapshot)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        if n == 0 {
            return Vec::new();
        }
        // The heap's top is the worst kept: fewest bytes, then the highest
        // address.
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<SocketAddr>, usize)>> =
            BinaryHeap::with_capacity(n.min(self.peers.len()) + 1);
        for (i, p) in self.peers.iter().enumerate() {
            let key = Reverse((p.stats.bytes(), Reverse(p.addr), i));
            if heap.len() < n {
                heap.push(key);
            } else if heap.peek().is_some_and(|worst| key < *worst) {
                heap.pop();
                heap.push(key);
            }
        }
        let mut best: Vec<_> = heap.into_iter().map(|Reverse(k)| k).collect();
        best.sort_by(|a, b| b.cmp(a));
        best.into_iter()
            .map(|(_, Reverse(addr), i)| {
                let p = &self.peers[i];
                let name = p.name.clone().unwrap_or_else(|| addr.to_string());
                let mut s = p.stats.snapshot();
                s.session = self
                    .attached
                    .as_ref()
                    .and_then(|a| a.0.session(i as PeerId, now_ns));
                (name, s)
            })
            .collect()
    }
}

/// A synthetic hub for benchmarks: `peers` peers with `per_peer` prefixes
/// each (a fifth IPv4 /32s, the rest IPv6 /64s and /128s), deterministic.
/// Peer addresses are in 198.18.128.0/17 (port 5000), prefixes in
/// 198.19.128.0/17 and 2001:db8:8000::/33: nothing is ever sent to them,
/// and they stay clear of the tunnels' own 198.19.0.0/24 and
/// 2001:db8:19::/64. At most 30,000 peers.
pub fn synthetic_hub(peers: usize, per_peer: usize) -> Vec<PeerSpec> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seen = std::collections::HashSet::new();
    let v4_each = per_peer / 5;
    (0..peers.min(30_000))
        .map(|i| {
            let addr =
                SocketAddr::from(([198, 18, 128 + (i / 250) as u8, 1 + (i % 250) as u8], 5000));
            let mut prefixes = Vec::with_capacity(per_peer);
            while prefixes.len() < per_peer {
                let (net, len) = if prefixes.len() < v4_each {
                    let a = 0xc613_8000u32 | (next() as u32 & 0x7fff);
                    (IpAddr::from(std::net::Ipv4Addr::from(a)), 32)
                } else {
                    let r = next();
                    let a = (0x2001_0db8_8000u128 << 80) | (u128::from(r) & ((1 << 79) - 1)) << 1;
                    (
                        IpAddr::from(std::net::Ipv6Addr::from(a)),
                        if r & 1 == 0 { 64 } else { 128 },
                    )
                };
                let p = Prefix::new(net, len).expect("valid length");
                if seen.insert(p.to_string()) {
                    prefixes.push(p);
                }
            }
            PeerSpec { addr, prefixes }
        })
        .collect()
}

/// The longest prefix holding `a`, found by looking at every one: the
/// reference the fuzz target checks [`Lpm`] against.
pub fn naive_lookup<K: Key>(prefixes: &[(K, u8, u32)], a: K) -> Option<u32> {
    prefixes
        .iter()
        .filter(|&&(net, len, _)| {
            let (lo, hi) = K::range(net, len);
            lo <= a && a <= hi
        })
        .max_by_key(|p| p.1)
        .map(|p| p.2)
}

/// The source or destination address of an IP packet whose version and
/// fixed header are there.
#[inline]
pub fn packet_addr(pkt: &[u8], source: bool) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let at = if source { 12 } else { 16 };
            let b: [u8; 4] = pkt.get(at..at + 4)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let at = if source { 8 } else { 24 };
            let b: [u8; 16] = pkt.get(at..at + 16)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The map key of a datagram source: the canonical address, its port
/// (0 when only addresses count).
fn key_addr(a: SocketAddr, any_port: bool) -> SocketAddr {
    if any_port {
        SocketAddr::new(a.ip(), 0)
    } else {
        a
    }
}

/// The current table, swapped whole on a reload. Workers compare the
/// generation (one atomic load per visit) and take the table (under the
/// lock, only when it changed); nothing on the hot path waits.
#[derive(Debug)]
pub struct SharedPeers {
    generation: AtomicU64,
    table: Mutex<Arc<PeerTable>>,
}

impl SharedPeers {
    pub fn new(table: Arc<PeerTable>) -> SharedPeers {
        SharedPeers {
            generation: AtomicU64::new(1),
            table: Mutex::new(table),
        }
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The table and its generation.
    pub fn load(&self) -> (u64, Arc<PeerTable>) {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Ordering::Acquire), t.clone())
    }

    /// Makes `table` current for every worker's next visit.
    pub fn store(&self, table: Arc<PeerTable>) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        *t = table;
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PeerSpec {
        s.parse().unwrap()
    }

    fn table(specs: &[&str]) -> PeerTable {
        let specs: Vec<PeerSpec> = specs.iter().map(|s| spec(s)).collect();
        PeerTable::build(&specs, 1, false, None).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_peer_flags() {
        let p = spec("198.18.0.2:5000=198.19.0.0/24, 2001:db8:19::/48");
        assert_eq!(p.addr, "198.18.0.2:5000".parse().unwrap());
        assert_eq!(p.prefixes.len(), 2);
        assert_eq!(
            p.to_string(),
            "198.18.0.2:5000=198.19.0.0/24,2001:db8:19::/48"
        );
        let p = spec("[2001:db8::2]:5000=198.19.0.9/32");
        assert_eq!(p.addr, "[2001:db8::2]:5000".parse().unwrap());
        assert!(spec("198.18.0.2:5000").prefixes.is_empty());
        for bad in [
            "198.18.0.2:5000=",
            "198.18.0.2=198.19.0.0/24",
            "198.18.0.2:5000=198.19.0.0",
            "198.18.0.2:5000=198.19.0.0/33",
        ] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_peers_files() {
        let text = "# hub\n\n198.18.0.11:5000 198.19.0.11/32, 2001:db8:19::11/128\n\
                    198.18.0.12:5000=198.19.0.12/32 # spoke 2\n  198.18.0.13:5000\t198.19.1.0/24 198.19.2.0/24\n";
        let peers = parse_peers_file(text, |a| a.parse().map_err(|_| "bad".to_string())).unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].prefixes.len(), 2);
        assert_eq!(peers[2].prefixes.len(), 2);
        let e = parse_peers_file("\n198.18.0.11:5000 198.19.0.11/32\nnonsense here\n", |a| {
            a.parse().map_err(|_| format!("{a:?} is not ADDR:PORT"))
        })
        .unwrap_err();
        assert_eq!(e, "line 3: \"nonsense\" is not ADDR:PORT");
        let e = parse_peers_file("198.18.0.11:5000\n", |a| {
            a.parse().map_err(|_| "bad".to_string())
        })
        .unwrap_err();
        assert!(
            e.starts_with("line 1: peer 198.18.0.11:5000 has no prefixes"),
            "{e}"
        );
    }

    #[test]
    fn longest_prefix_wins_both_families() {
        let t = table(&[
            "198.18.0.1:5000=198.19.0.0/16,2001:db8::/32",
            "198.18.0.2:5000=198.19.1.0/24,2001:db8:1::/48",
            "198.18.0.3:5000=198.19.1.7/32,2001:db8:1::7/128",
            "198.18.0.4:5000=0.0.0.0/0",
        ]);
        assert_eq!(t.route(ip("198.19.2.1")), Some(0));
        assert_eq!(t.route(ip("198.19.1.1")), Some(1));
        assert_eq!(t.route(ip("198.19.1.7")), Some(2));
        assert_eq!(t.route(ip("198.19.1.8")), Some(1));
        assert_eq!(t.route(ip("198.20.0.1")), Some(3));
        assert_eq!(t.route(ip("2001:db8:2::1")), Some(0));
        assert_eq!(t.route(ip("2001:db8:1::1")), Some(1));
        assert_eq!(t.route(ip("2001:db8:1::7")), Some(2));
        assert_eq!(t.route(ip("2001:db9::1")), None);
        // The inner source must route back to the sender.
        assert!(t.accepts(1, ip("198.19.1.1")));
        assert!(!t.accepts(1, ip("198.19.1.7")));
        assert!(!t.accepts(1, ip("198.19.2.1")));
        assert!(t.accepts(3, ip("203.0.113.1")));
    }

    #[test]
    fn whole_space_and_edges() {
        let t = table(&[
            "198.18.0.1:5000=0.0.0.0/1,::/0",
            "198.18.0.2:5000=128.0.0.0/1,ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
            "198.18.0.3:5000=255.255.255.255/32,0.0.0.0/32,::/128",
        ]);
        assert_eq!(t.route(ip("0.0.0.0")), Some(2));
        assert_eq!(t.route(ip("0.0.0.1")), Some(0));
        assert_eq!(t.route(ip("127.255.255.255")), Some(0));
        assert_eq!(t.route(ip("128.0.0.0")), Some(1));
        assert_eq!(t.route(ip("255.255.255.254")), Some(1));
        assert_eq!(t.route(ip("255.255.255.255")), Some(2));
        assert_eq!(t.route(ip("::")), Some(2));
        assert_eq!(t.route(ip("::1")), Some(0));
        assert_eq!(
            t.route(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(1)
        );
    }

    #[test]
    fn finds_peers_by_source() {
        let t = table(&[
            "198.18.0.1:5000=198.19.0.1/32",
            "[2001:db8::2]:5000=198.19.0.2/32",
        ]);
        assert_eq!(t.find("198.18.0.1:5000".parse().unwrap()), Some(0));
        assert_eq!(t.find("198.18.0.1:5001".parse().unwrap()), None);
        assert_eq!(t.find("[2001:db8::2]:5000".parse().unwrap()), Some(1));
        assert_eq!(t.find("198.18.0.9:5000".parse().unwrap()), None);
        let tap = PeerTable::single("198.18.0.1:4789".parse().unwrap(), true);
        assert_eq!(tap.find("198.18.0.1:40000".parse().unwrap()), Some(0));
        let one = PeerTable::single("198.18.0.1:5000".parse().unwrap(), false);
        assert_eq!(one.find("198.18.0.1:5000".parse().unwrap()), Some(0));
        assert_eq!(one.find("198.18.0.1:5001".parse().unwrap()), None);
        assert_eq!(one.route(ip("203.0.113.9")), Some(0));
        assert!(one.accepts(0, ip("2001:db8::9")));
    }

    #[test]
    fn refuses_what_cannot_route() {
        let build = |s: &[&str]| {
            let specs: Vec<PeerSpec> = s.iter().map(|s| spec(s)).collect();
            PeerTable::build(&specs, 1, false, None)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            build(&[
                "198.18.0.1:5000=198.19.0.0/24",
                "198.18.0.2:5000=198.19.0.0/24"
            ]),
            "prefix 198.19.0.0/24 is given to both peer 198.18.0.1:5000 and peer 198.18.0.2:5000"
        );
        assert_eq!(
            build(&[
                "198.18.0.1:5000=198.19.0.0/24",
                "198.18.0.1:5000=198.19.1.0/24"
            ]),
            "peer 198.18.0.1:5000 is given twice"
        );
        assert!(
            build(&["198.18.0.1:5000=198.19.0.0/24", "198.18.0.2:5000"])
                .starts_with("peer 198.18.0.2:5000 has no prefixes")
        );
        assert_eq!(build(&[]), "no peers");
        // The error says which peer: the later of the two.
        let specs: Vec<PeerSpec> = [
            "198.18.0.1:5000=198.19.0.0/24",
            "198.18.0.2:5000=198.19.1.0/24",
            "198.18.0.3:5000=198.19.2.0/24,198.19.0.0/24",
        ]
        .iter()
        .map(|s| spec(s))
        .collect();
        let e = PeerTable::build(&specs, 1, false, None).unwrap_err();
        assert_eq!(e.peer_index(), Some(2));
        let e = PeerTable::build(&[specs[1].clone(), specs[1].clone()], 1, false, None);
        assert_eq!(e.unwrap_err().peer_index(), Some(1));
    }

    /// What a peers file must not slip through: a second '=', a prefix
    /// with host bits set (a typo for /32 would route a whole /24).
    #[test]
    fn peers_files_refuse_typos() {
        let parse =
            |text: &str| parse_peers_file(text, |a| a.parse().map_err(|_| format!("{a:?} bad")));
        let e = parse("198.18.1.11:5000 ==== 198.19.0.11/32\n").unwrap_err();
        assert!(e.starts_with("line 1: "), "{e}");
        let e = parse("# x\n198.18.1.11:5000 198.19.0.11/24\n").unwrap_err();
        assert!(
            e.starts_with("line 2: 198.19.0.11/24: host bits set"),
            "{e}"
        );
        let e = parse("198.18.1.11:5000=2001:db8::1/64\n").unwrap_err();
        assert!(e.contains("host bits set after /64"), "{e}");
        assert!("198.18.0.1:5000=198.19.0.7/24".parse::<PeerSpec>().is_err());
        // One '=' with blanks around it is fine.
        let p = parse("198.18.1.11:5000 = 198.19.0.11/32\n").unwrap();
        assert_eq!(p[0].prefixes[0].to_string(), "198.19.0.11/32");
    }

    #[test]
    fn counters_survive_a_rebuild_for_the_same_address() {
        let a = table(&[
            "198.18.0.1:5000=198.19.0.1/32",
            "198.18.0.2:5000=198.19.0.2/32",
        ]);
        a.peer(0).stats.worker(0).tx_packets.add(5);
        let specs: Vec<PeerSpec> = [
            "198.18.0.3:5000=198.19.0.3/32",
            "198.18.0.1:5000=198.19.0.0/24",
        ]
        .iter()
        .map(|s| spec(s))
        .collect();
        let b = PeerTable::build(&specs, 1, false, Some(&a)).unwrap();
        assert_eq!(b.peer(1).stats.snapshot().tx_packets, 5);
        assert_eq!(b.peer(0).stats.snapshot().tx_packets, 0);
        assert_eq!(b.top(1, 0)[0].0, "198.18.0.1:5000");
    }

    /// The busiest peers, most bytes first, ties by address; as a full
    /// sort would give them.
    #[test]
    fn top_keeps_the_busiest_in_order() {
        let t = table(&[
            "198.18.0.1:5000=198.19.0.1/32",
            "198.18.0.2:5000=198.19.0.2/32",
            "198.18.0.3:5000=198.19.0.3/32",
            "198.18.0.4:5000=198.19.0.4/32",
            "198.18.0.5:5000=198.19.0.5/32",
        ]);
        for (i, bytes) in [(0, 10), (1, 30), (2, 30), (3, 0), (4, 20)] {
            t.peer(i).stats.worker(0).rx_bytes.add(bytes);
        }
        let order = |n| -> Vec<String> { t.top(n, 0).iter().map(|(a, _)| a.to_string()).collect() };
        assert_eq!(
            order(3),
            ["198.18.0.2:5000", "198.18.0.3:5000", "198.18.0.5:5000"]
        );
        assert_eq!(order(9).len(), 5);
        assert_eq!(order(9)[4], "198.18.0.4:5000");
        assert!(order(0).is_empty());
        assert_eq!(t.top(1, 0)[0].1.rx_bytes, 30);
    }

    /// peers x queues is bounded: the refusal says what it would take. The
    /// bound itself is reached: a table of MAX_PEERS peers at one queue
    /// builds and routes (the README's "up to 1,048,576 peers").
    #[test]
    fn counter_sets_are_bounded_and_the_largest_table_builds() {
        let specs: Vec<PeerSpec> = (0..MAX_PEERS as u32)
            .map(|i| {
                // Peers 198.18.0.0-198.18.0.63, ports 1024 up; inner
                // prefixes a /112 each in 2001:db8::/32. Nothing is sent.
                let ip = std::net::Ipv4Addr::from(0xc612_0000 + (i >> 14));
                let net = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i) << 16);
                PeerSpec {
                    addr: SocketAddr::from((ip, 1024 + (i & 0x3fff) as u16)),
                    prefixes: vec![Prefix::new(IpAddr::from(net), 112).unwrap()],
                }
            })
            .collect();
        let e = PeerTable::build(&specs[..MAX_PEERS / 2 + 1], 2, false, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "524289 peers x 2 queues need 1048578 per-peer counter sets (256 MiB): at most \
             1048576 (256 MiB); use fewer queues or fewer peers"
        );
        assert!(PeerTable::build(&specs[..MAX_PEERS / 256], 256, false, None).is_ok());
        let t = PeerTable::build(&specs, 1, false, None).unwrap();
        assert_eq!(t.len(), MAX_PEERS);
        let last = MAX_PEERS as u32 - 1;
        let inner = IpAddr::from(std::net::Ipv6Addr::from(
            0x2001_0db8_u128 << 96 | u128::from(last) << 16 | 7,
        ));
        assert_eq!(t.route(inner), Some(last as PeerId));
    }

    #[test]
    fn a_synthetic_hub_is_a_valid_table() {
        let specs = synthetic_hub(2000, 10);
        assert_eq!(specs.len(), 2000);
        let t = PeerTable::build(&specs, 1, false, None).unwrap();
        assert_eq!(t.prefixes(), 20_000);
        for (i, s) in specs.iter().enumerate().step_by(97) {
            for p in &s.prefixes {
                assert_eq!(t.route(p.net()), Some(i as u32), "{p}");
            }
            assert_eq!(t.find(s.addr), Some(i as u32));
        }
        // The tunnels' own overlay is left alone.
        assert_eq!(t.route(ip("198.19.0.2")), None);
        assert_eq!(t.route(ip("2001:db8:19::2")), None);
    }

    #[test]
    fn index_matches_search_on_large_tables() {
        // Enough ranges for the bucket index, clustered and spread.
        let mut v4 = Vec::new();
        for i in 0..5000u32 {
            let net = 0xc613_0000 | (i << 2);
            v4.push((net, 30, i % 7));
        }
        v4.push((0xc600_0000, 8, 99));
        let lpm = Lpm::build(v4.clone()).unwrap();
        assert!(!lpm.index.is_empty());
        for a in (0xc500_0000u32..0xc700_0000)
            .step_by(997)
            .chain(0xc613_0000..0xc613_5000)
        {
            assert_eq!(lpm.lookup(a), naive_lookup(&v4, a), "{a:#x}");
        }
    }
}
