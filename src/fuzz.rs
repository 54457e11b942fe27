//! Invariant checks over untrusted bytes, one function per fuzz target.
//!
//! Each function takes arbitrary input, runs the code that handles bytes
//! from the network or the TUN device, and panics if an invariant breaks.
//! The cargo-fuzz targets in `tests/fuzz/fuzz_targets/` call them
//! (`cargo +nightly fuzz run --fuzz-dir tests/fuzz ip_validation`), and so
//! does `tests/fuzz.rs`, which runs the seed corpus and a bounded number of
//! random and mutated inputs on stable Rust in every CI run.

use std::net::SocketAddr;

use crate::forward::{Forwarder, PeerVerdict, TunVerdict};
use crate::packet::offload::{self, Coalescer};
use crate::packet::virtio::{self, VirtioNetHdr};
use crate::packet::{IpPacket, checksum, vxlan};
use crate::types::DropReason;
use crate::types::Prefix;

const PEER: &str = "198.18.0.2:5000";
const STRANGER: &str = "198.18.0.9:5000";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("constant address")
}

/// IP validation and the forwarding decision in both directions, for a
/// plain tunnel, one with `--allow-src`, and the reflector.
pub fn ip_validation(data: &[u8]) {
    let parsed = IpPacket::new_checked(data);
    if let Ok(p) = &parsed {
        assert_eq!(p.len(), data.len());
        match p {
            IpPacket::V4(v4) => {
                assert!((20..=60).contains(&v4.header_len()));
                assert!(v4.header_len() <= data.len());
                assert_eq!(
                    usize::from(u16::from_be_bytes([data[2], data[3]])),
                    data.len()
                );
            }
            IpPacket::V6(_) => {
                assert!(data.len() >= 40);
                assert_eq!(
                    usize::from(u16::from_be_bytes([data[4], data[5]])) + 40,
                    data.len()
                );
            }
        }
    }
    // The MTU comes from the input too, so the fuzzer reaches both sides
    // of the limit.
    let mtu = 68 + data.len() % 1500;
    let fwd = Forwarder::new(mtu, addr(PEER));
    let from_peer = fwd.handle_from_peer(addr(PEER), data);
    let acceptable = parsed.as_ref().is_ok_and(|p| p.len() <= mtu);
    assert_eq!(from_peer == PeerVerdict::ToTun, acceptable, "{from_peer:?}");
    match (&parsed, from_peer) {
        (Err(e), PeerVerdict::Drop(r)) => assert_eq!(DropReason::from(*e), r),
        (Ok(_), PeerVerdict::Drop(r)) => assert_eq!(r, DropReason::OverMtu),
        _ => {}
    }
    // A stranger's bytes are never looked at.
    assert_eq!(
        fwd.handle_from_peer(addr(STRANGER), data),
        PeerVerdict::Drop(DropReason::NotFromPeer)
    );
    // The TUN side applies the same validation.
    let from_tun = fwd.handle_from_tun(data);
    assert_eq!(from_tun == TunVerdict::ToPeer, acceptable);

    // --allow-src: only accepted packets are checked, and a packet passes
    // only with a source inside the prefix.
    let prefix: Prefix = "198.19.0.0/24".parse().expect("constant prefix");
    let filtered = fwd.clone().with_allowed_sources(vec![prefix]);
    match filtered.handle_from_peer(addr(PEER), data) {
        PeerVerdict::ToTun => {
            let p = parsed.as_ref().expect("accepted implies parsed");
            assert!(prefix.contains(p.src()));
        }
        PeerVerdict::Drop(DropReason::SourceNotAllowed) => {
            assert!(acceptable);
            let p = parsed.as_ref().expect("accepted implies parsed");
            assert!(!prefix.contains(p.src()));
        }
        d => assert_eq!(d, from_peer),
    }

    // The reflector answers in place: an answer is a valid packet of the
    // same length going back to the sender.
    let mut copy = data.to_vec();
    let reflector = Forwarder::reflector(mtu, addr(PEER));
    if reflector.handle_from_tun_mut(&mut copy) == TunVerdict::Reflect {
        let before = parsed.as_ref().expect("reflected implies parsed");
        let after = IpPacket::new_checked(&copy).expect("the answer is a valid packet");
        assert_eq!(after.len(), data.len());
        assert_eq!(after.src(), before.dst());
        assert_eq!(after.dst(), before.src());
        // The reflector writes a fresh IPv4 header checksum.
        if let IpPacket::V4(v4) = after {
            let hl = v4.header_len();
            assert_eq!(checksum::fold(checksum::sum(&copy[..hl], 0)), 0);
        }
    }
    assert_eq!(
        reflector.handle_from_peer(addr(PEER), data),
        PeerVerdict::Drop(DropReason::NotFromPeer)
    );
}

/// VXLAN decoding in TAP mode, against a VNI taken from the input (so the
/// fuzzer can match it) and a fixed one.
pub fn vxlan_decode(data: &[u8]) {
    let mtu = 1450;
    let own_vni = data
        .get(4..7)
        .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
        .unwrap_or(42);
    for vni in [own_vni, 42] {
        let checked = vxlan::check(data, vni);
        if checked.is_ok() {
            assert!(data.len() >= vxlan::HEADER_LEN + vxlan::ETH_HEADER_LEN);
            assert_ne!(data[0] & 0x08, 0);
            // Re-encoding the header gives back the same VNI.
            let mut hdr = [0u8; vxlan::HEADER_LEN];
            vxlan::write_header(&mut hdr, vni);
            assert_eq!(hdr[4..7], data[4..7]);
        }
        let fwd = Forwarder::vxlan(mtu, addr(PEER), vni);
        // TAP mode matches the peer by address: any source port.
        let from_peer = fwd.handle_from_peer(addr("198.18.0.2:41234"), data);
        let frame_ok = data.len() <= vxlan::HEADER_LEN + mtu + vxlan::ETH_HEADER_LEN + 4;
        assert_eq!(
            from_peer == PeerVerdict::ToTun,
            checked.is_ok() && frame_ok,
            "{from_peer:?}"
        );
        assert_eq!(
            fwd.handle_from_peer(addr(STRANGER), data),
            PeerVerdict::Drop(DropReason::NotFromPeer)
        );
    }
    // And the other way: any frame gets a header that decodes to our VNI.
    let mut wire = vec![0u8; vxlan::HEADER_LEN];
    vxlan::write_header(&mut wire, own_vni & vxlan::MAX_VNI);
    wire.extend_from_slice(data);
    let expect_ok = data.len() >= vxlan::ETH_HEADER_LEN;
    assert_eq!(
        vxlan::check(&wire, own_vni & vxlan::MAX_VNI).is_ok(),
        expect_ok
    );
}

/// The virtio-net header: parse and write are inverse, short input is
/// refused.
pub fn virtio_header(data: &[u8]) {
    match VirtioNetHdr::parse(data) {
        None => assert!(data.len() < virtio::LEN),
        Some(h) => {
            let mut out = [0u8; virtio::LEN];
            h.write(&mut out);
            assert_eq!(&out[..], &data[..virtio::LEN]);
            assert_eq!(VirtioNetHdr::parse(&out), Some(h));
        }
    }
}

/// The offload datapath, both directions, as both engines run it: a TUN
/// read (virtio-net header, 2-byte MTU, packet) through
/// [`Datapath::handle_tun_read`](crate::datapath::Datapath::handle_tun_read) and its sends, then those datagrams as one
/// GRO receive through [`Datapath::handle_receive`](crate::datapath::Datapath::handle_receive). Every datagram sent is
/// a valid IP packet within the MTU, in order and back to back; every
/// packet received is accounted for exactly once (written or dropped with a
/// reason); every TUN write is a virtio-net header and a valid IP packet,
/// and a coalesced write splits back into as many packets as went in.
pub fn split_coalesce(data: &[u8]) {
    use crate::datapath::{After, Attach, Received, RxAction, SPLIT_LEN, Setup, TunAction, TxBuf};
    use crate::stats::WorkerStats;
    if data.len() < virtio::LEN + 2 {
        return;
    }
    let mtu = 68
        + usize::from(u16::from_be_bytes([
            data[virtio::LEN],
            data[virtio::LEN + 1],
        ])) % 9000;
    let mut read = data[..virtio::LEN].to_vec();
    read.extend_from_slice(&data[virtio::LEN + 2..]);
    let len = read.len();
    let stats = std::sync::Arc::new(WorkerStats::default());
    let mut dp = Setup::new(
        "fuzz".into(),
        Forwarder::new(mtu, addr(PEER)),
        stats.clone(),
        true,
    )
    .build(Attach::harness(1));
    let mut split = vec![0u8; SPLIT_LEN];
    let mut plan = match dp.handle_tun_read(&mut read, len, &mut split) {
        TunAction::Send(plan) => plan,
        TunAction::Reflect(_) => panic!("a tunnel never reflects"),
        TunAction::Dropped => {
            assert_eq!(
                stats.snapshot().tun_to_peer.dropped(),
                1,
                "a drop is counted once"
            );
            return;
        }
    };
    // Send everything as the engines do; collect the datagrams.
    let mut wire = Vec::new();
    let mut next_at = None;
    let mut datagrams = 0;
    let mut seg_len = 0;
    while let Some(send) = dp.next_send(&plan) {
        assert_eq!(
            send.range.start,
            next_at.unwrap_or(send.range.start),
            "sends are in order, back to back"
        );
        next_at = Some(send.range.end);
        // The datagrams as the engines gather them.
        let bytes: Vec<u8> = match plan.buf {
            TxBuf::Read => read[send.range.clone()].to_vec(),
            TxBuf::Split => split[send.range.clone()].to_vec(),
            TxBuf::Gather(_) => plan
                .pieces(&send)
                .flat_map(|(h, p)| {
                    split[h]
                        .iter()
                        .chain(&read[p])
                        .copied()
                        .collect::<Vec<u8>>()
                })
                .collect(),
        };
        assert_eq!(bytes.len(), send.range.len(), "the pieces make up the send");
        let seg = send.gso_size.map_or(bytes.len(), usize::from);
        seg_len = seg_len.max(seg);
        for d in bytes.chunks(seg) {
            let p = IpPacket::new_checked(d).expect("every datagram is a valid IP packet");
            assert!(
                p.len() <= mtu,
                "datagram of {} bytes over MTU {mtu}",
                p.len()
            );
            datagrams += 1;
        }
        wire.extend_from_slice(&bytes);
        assert_eq!(
            dp.on_send(&mut plan, &send, Ok(send.range.len())),
            After::Next
        );
    }
    assert_eq!(stats.snapshot().tun_to_peer.packets, datagrams);

    // The same datagrams arrive at the far end as one GRO receive.
    let rx = Received {
        src: Some(addr(PEER)),
        payload: 0..wire.len(),
        gro_size: Some(seg_len),
        truncated: false,
        arrived_ns: None,
        tos: None,
    };
    let mut coalescer = Coalescer::new();
    let action = dp.handle_receive(&rx, &mut wire, &mut coalescer, 0);
    let snap = stats.snapshot();
    let writes = coalescer.writes();
    let written: usize = writes.iter().map(|w| w.packets).sum();
    assert_eq!(
        written as u64 + snap.peer_to_tun.dropped(),
        datagrams,
        "every datagram is written or dropped, once"
    );
    assert_eq!(action == RxAction::Coalesced, !writes.is_empty());
    let mut resplit = vec![0u8; SPLIT_LEN];
    for w in writes {
        let frame = &coalescer.frame(w, &wire)[..];
        assert_eq!(frame.len(), w.len);
        let h = VirtioNetHdr::parse(frame).expect("a write starts with a virtio-net header");
        let ip = &frame[virtio::LEN..];
        IpPacket::new_checked(ip).expect("a write carries a valid IP packet");
        if w.packets > 1 {
            let s = offload::split(&h, ip, mtu, &mut resplit).expect("a coalesced write splits");
            assert_eq!(s.count, w.packets);
        } else {
            // A single packet passes at its own size.
            let limit = mtu.max(ip.len());
            assert!(offload::split(&h, ip, limit, &mut resplit).is_ok());
        }
    }
}

/// The flow queues, driven by the input as a list of 4-byte operations
/// (enqueue into a free buffer, dequeue, overload drop, advance the clock)
/// against a model: every buffer is free, queued or taken, never two; each
/// flow leaves in the order it arrived; an overload drop takes the head of
/// a flow with the most bytes; the counts and bytes agree. Then the same
/// operations through the datapath with packets cut from the input: every
/// packet read is sent, dropped with a reason, or still queued.
pub fn flow_queues(data: &[u8]) {
    use std::collections::VecDeque;

    use crate::aqm::CodelParams;
    use crate::fq::FlowQueues;

    const BUFFERS: usize = 8;
    let params = CodelParams {
        target: std::time::Duration::from_micros(500),
        interval: std::time::Duration::from_millis(10),
    };
    let mut q = FlowQueues::new(BUFFERS, params);
    // Hashes 0..8: each is its own flow queue.
    let mut model: Vec<VecDeque<(u32, u64)>> = vec![VecDeque::new(); 8];
    let mut free: Vec<u32> = (0..BUFFERS as u32).collect();
    let mut now = 0u64;
    let take = |model: &mut Vec<VecDeque<(u32, u64)>>, id: u32| {
        let f = model
            .iter()
            .position(|f| f.front().is_some_and(|&(i, _)| i == id))
            .unwrap_or_else(|| panic!("buffer {id} left out of its flow's order"));
        model[f].pop_front();
        f
    };
    for op in data.chunks_exact(4) {
        match op[0] % 4 {
            0 => {
                if let Some(id) = free.pop() {
                    let hash = u32::from(op[1] % 8);
                    let bytes = usize::from(u16::from_be_bytes([op[2], op[3]]));
                    q.enqueue(id, hash, bytes, op[3] & 1 == 0, now);
                    model[hash as usize].push_back((id, bytes as u64));
                }
            }
            1 => {
                now += u64::from(op[1]) * 100_000;
                if let Some(d) = q.dequeue(now) {
                    take(&mut model, d.id);
                    free.push(d.id);
                }
            }
            2 => {
                let bytes = |f: &VecDeque<(u32, u64)>| f.iter().map(|&(_, b)| b).sum::<u64>();
                let most = model.iter().filter(|f| !f.is_empty()).map(bytes).max();
                match q.drop_fattest() {
                    Some(id) => {
                        let had = model
                            .iter()
                            .find(|f| f.front().is_some_and(|&(i, _)| i == id))
                            .map(bytes);
                        assert_eq!(had, most, "dropped from a flow that is not the fattest");
                        take(&mut model, id);
                        free.push(id);
                    }
                    None => assert_eq!(most, None),
                }
            }
            _ => now += u64::from(op[1]) * u64::from(op[2]) * 1_000_000,
        }
        let queued: usize = model.iter().map(VecDeque::len).sum();
        assert_eq!(q.len(), queued);
        assert_eq!(q.len() + free.len(), BUFFERS);
        assert_eq!(
            q.bytes(),
            model.iter().flatten().map(|&(_, b)| b).sum::<u64>()
        );
    }
    while let Some(d) = q.dequeue(now) {
        take(&mut model, d.id);
    }
    assert!(model.iter().all(VecDeque::is_empty));
    assert_eq!(q.bytes(), 0);
    flow_queues_datapath(data);
}

/// [`flow_queues`]'s second half: the datapath with flow queueing, fed
/// packets cut from the input (any bytes: valid or not, ECN-capable or
/// not), dequeued and handled as an engine does, with the clock jumping by
/// the input so that CoDel marks and drops and overload drops happen.
/// Every read is accounted for exactly once.
pub fn flow_queues_datapath(data: &[u8]) {
    use crate::datapath::{Attach, Setup, TunAction};
    use crate::stats::WorkerStats;

    const BUFFERS: usize = 4;
    let stats = std::sync::Arc::new(WorkerStats::default());
    let mut dp = Setup::new(
        "fuzz".into(),
        Forwarder::new(1500, addr(PEER)),
        stats.clone(),
        false,
    )
    .with_flow_queues(
        Some(crate::aqm::CodelParams {
            target: std::time::Duration::from_micros(500),
            interval: std::time::Duration::from_millis(10),
        }),
        4096,
    )
    .build(Attach::harness(BUFFERS));
    let mut bufs = vec![vec![0u8; 1600]; BUFFERS];
    let mut free: Vec<u32> = (0..BUFFERS as u32).collect();
    let mut split = Vec::new();
    let (mut read, mut sent, mut dropped_here) = (0u64, 0u64, 0u64);
    let mut now = 0u64;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        now += u64::from(*op) * 200_000;
        if op % 3 != 2 {
            let n = usize::from(*len).min(tail.len());
            if free.is_empty() {
                while let Some(id) = dp.tx_make_room(now, free.len()) {
                    dropped_here += 1;
                    free.push(id);
                }
            }
            let id = free.pop();
            if let Some(id) = id {
                let b = &mut bufs[id as usize];
                b[..n].copy_from_slice(&tail[..n]);
                dp.tx_enqueue(id, b, n, now);
                read += 1;
            }
            rest = &tail[n..];
        } else {
            rest = tail;
        }
        if op % 3 != 0 {
            if let Some(d) = dp.tx_next(now) {
                match dp.handle_dequeued(&mut bufs[d.id as usize], &d, &mut split) {
                    TunAction::Send(_) => sent += 1,
                    TunAction::Reflect(_) => panic!("a tunnel never reflects"),
                    TunAction::Dropped => {}
                }
                dp.tx_done(&d);
                free.push(d.id);
            }
        }
        assert!(free.len() + dp.tx_queued() <= BUFFERS);
    }
    let s = stats.snapshot();
    assert_eq!(s.tun_to_peer.drops_for(DropReason::Overload), dropped_here);
    assert_eq!(
        read,
        sent + s.tun_to_peer.dropped() + dp.tx_queued() as u64,
        "{:?}",
        s.tun_to_peer
    );
}

/// The peer table's longest-prefix match ([`crate::peers::Lpm`]) against a
/// reference that tries every prefix. The input is a mode byte, then
/// 5-byte prefixes (length, 24 bits of network, owner), then query bytes.
/// Networks cluster after 198.19.0.0/16 and 2001:db8::/32 (or spread over
/// the whole space, by the mode) so that prefixes nest; every prefix's
/// first and last address and their neighbours are queried, as well as
/// addresses from the input. A table with a prefix given twice must be
/// refused.
pub fn peer_table(data: &[u8]) {
    use crate::peers::Lpm;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cut = (rest.len() * 3 / 4) / 5 * 5;
    let (entries, queries) = rest.split_at(cut);
    let mut v4: Vec<(u32, u8, u32)> = Vec::new();
    let mut v6: Vec<(u128, u8, u32)> = Vec::new();
    for e in entries.chunks_exact(5) {
        let x = u32::from_be_bytes([0, e[1], e[2], e[3]]);
        let owner = u32::from(e[4] % 16);
        if e[0] & 0x80 == 0 {
            let len = e[0] % 33;
            let net = if mode & 1 == 0 {
                0xc613_0000 ^ (x << 8)
            } else {
                x.rotate_left(u32::from(e[4]))
            };
            v4.push((net & crate::types::v4_mask(len), len, owner));
        } else {
            let len = (e[0] & 0x7f) % 129;
            let net = if mode & 1 == 0 {
                (0x2001_0db8u128 << 96) | (u128::from(x) << 72)
            } else {
                u128::from(x).rotate_right(u32::from(e[4]))
            };
            v6.push((net & crate::types::v6_mask(len), len, owner));
        }
    }
    fn check<K: crate::peers::Key>(mut prefixes: Vec<(K, u8, u32)>, extra: &[K]) {
        let mut keys: Vec<(K, u8)> = prefixes.iter().map(|p| (p.0, p.1)).collect();
        keys.sort();
        let dups = keys.windows(2).any(|w| w[0] == w[1]);
        assert_eq!(Lpm::build(prefixes.clone()).is_err(), dups);
        // Keep the first of each prefix.
        let mut seen = std::collections::HashSet::new();
        prefixes.retain(|p| seen.insert((p.0, p.1)));
        let lpm = Lpm::build(prefixes.clone()).expect("no duplicates");
        let mut probes: Vec<K> = extra.to_vec();
        for &(net, len, _) in &prefixes {
            let (lo, hi) = K::range(net, len);
            probes.extend([lo, hi, hi.succ(), lo.pred()]);
        }
        for a in probes {
            assert_eq!(
                lpm.lookup(a),
                crate::peers::naive_lookup(&prefixes, a),
                "{a:?} in {prefixes:?}"
            );
        }
    }
    let q4: Vec<u32> = queries
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            if mode & 1 == 0 {
                0xc613_0000 ^ (u32::from_be_bytes(b) >> 8)
            } else {
                u32::from_be_bytes(b)
            }
        })
        .collect();
    let q6: Vec<u128> = q4
        .iter()
        .map(|&a| (0x2001_0db8u128 << 96) | (u128::from(a) << 64))
        .collect();
    check(v4, &q4);
    check(v6, &q6);
}

/// Two WireGuard devices with an established session (a is b's peer 0):
/// made once, shared by every [`wg_receive`] case.
#[cfg(feature = "wireguard")]
fn wg_pair() -> &'static (crate::wg::Device, crate::wg::Device) {
    use crate::wg::device::{Opened, Sealed};
    static PAIR: std::sync::OnceLock<(crate::wg::Device, crate::wg::Device)> =
        std::sync::OnceLock::new();
    PAIR.get_or_init(|| {
        let key = || crate::wg::Secret::generate().expect("/dev/urandom");
        let (ka, kb) = (key(), key());
        let conf = |own: &crate::wg::Secret, peer: &crate::wg::Secret, at: &str| {
            let text = format!(
                "[Interface]\nPrivateKey = {}\n[Peer]\nPublicKey = {}\nEndpoint = {at}\nAllowedIPs = 198.19.0.0/24\n",
                own.to_base64(),
                peer.public_key()
            );
            let c = crate::wg::conf::parse(&text, |s| s.parse().map_err(|_| s.to_string()));
            crate::wg::Device::new(&c.expect("a valid file")).expect("the wireguard feature")
        };
        let a = conf(&ka, &kb, STRANGER);
        let b = conf(&kb, &ka, PEER);
        let mut out = vec![0u8; 2048];
        let mut o = vec![0u8; 2048];
        // a initiates; b answers; a confirms with a keepalive.
        let Sealed::Datagram { len, .. } = a.seal(0, &[0x45; 20], &mut out) else {
            panic!("an initiation")
        };
        assert_eq!(b.open(addr(PEER), &out[..len], &mut o), Opened::Handshake);
        let init = b.handshakes().try_recv().expect("queued");
        let mut response = Vec::new();
        b.handle_handshake(&init, &mut o, |d, _| response = d.to_vec());
        assert_eq!(a.open(addr(STRANGER), &response, &mut o), Opened::Handshake);
        let resp = a.handshakes().try_recv().expect("queued");
        let mut sent = Vec::new();
        a.handle_handshake(&resp, &mut out, |d, _| sent.push(d.to_vec()));
        for d in sent {
            b.open(addr(PEER), &d, &mut o);
        }
        (a, b)
    })
}

/// WireGuard's receive path: any bytes, opened by a device that has a
/// session with its one peer. Nothing the input holds can authenticate (it
/// has no key), so nothing is delivered or answered; a handshake-shaped
/// message is handed to the control path, which refuses it (mac1 first).
#[cfg(feature = "wireguard")]
pub fn wg_receive(data: &[u8]) {
    use crate::wg::device::Opened;
    let (_, b) = wg_pair();
    let mut out = vec![0u8; data.len().max(2048)];
    match b.open(addr(PEER), data, &mut out) {
        Opened::Packet { .. } | Opened::Keepalive { .. } => {
            panic!("authenticated without a key: {data:02x?}")
        }
        Opened::Handshake => {
            let msg = b.handshakes().try_recv().expect("the message was queued");
            let refused = b.handle_handshake(&msg, &mut out, |d, _| {
                panic!("answered {d:02x?} to {data:02x?}")
            });
            assert!(refused.is_some(), "{data:02x?}");
        }
        Opened::Dropped(_) => {}
    }
}

#[cfg(all(test, feature = "wireguard"))]
mod wg_tests {
    use super::*;
    use crate::wg::device::Opened;

    /// The corpus's data message reaches the session (its index is the
    /// one b holds for a) and fails there, at the tag: the fuzzer exercises
    /// the AEAD path, not only the index lookup.
    #[test]
    fn a_data_message_shaped_input_reaches_the_session() {
        let (_, b) = wg_pair();
        let mut m = vec![4, 0, 0, 0, 1, 0, 0, 0];
        m.extend_from_slice(&5u64.to_le_bytes());
        m.extend_from_slice(&[0x5a; 100]);
        let mut out = vec![0u8; 2048];
        assert_eq!(
            b.open(addr(PEER), &m, &mut out),
            Opened::Dropped(DropReason::WgBadAuth)
        );
        m[4] = 9;
        assert_eq!(
            b.open(addr(PEER), &m, &mut out),
            Opened::Dropped(DropReason::WgUnknownIndex)
        );
        wg_receive(&m);
    }
}
