//! Deterministic engine tests without root, for both engines: the TUN queue
//! is the crate's fake device (one end of a SOCK_SEQPACKET socket pair:
//! message boundaries like TUN, and a small queue that makes backpressure
//! easy to provoke), the UDP side a real socket on loopback. With offload,
//! the test plays a TUN device with IFF_VNET_HDR: it writes virtio-net
//! headers and super-packets, and reads the coalesced writes back.
//!
//! io_uring needs no root; where the kernel refuses it, the io_uring cases
//! fail, or are skipped with a SKIP line when `TUNFWD_SKIP_URING=1` asks.

#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{inet_checksum, uring_usable};
use tunfwd::config::{EngineKind, Toggle, UringFlags};
use tunfwd::datapath::{self, Framing, VisitLimits};
use tunfwd::engine::fake::FakeTun;
use tunfwd::engine::{Engine, EngineWanted, Shutdown, WorkerEvent, WorkerParts, spawn_worker};
use tunfwd::forward::Forwarder;
use tunfwd::packet::virtio::{self, VirtioNetHdr};
use tunfwd::stats::{WorkerSnapshot, WorkerStats};
use tunfwd::types::DropReason;

const ENGINES: [EngineKind; 2] = [EngineKind::Poll, EngineKind::Uring];

/// A running worker with its fake kernel side and its UDP peer.
struct Harness {
    /// The "kernel" end of the fake TUN device (blocking, with a timeout).
    kernel: File,
    /// The tunnel peer.
    peer: UdpSocket,
    /// The worker's UDP address.
    worker_addr: SocketAddr,
    stats: Arc<WorkerStats>,
    shutdown: Arc<Shutdown>,
    handle: Option<JoinHandle<tunfwd::error::Result<()>>>,
    what: String,
}

struct Setup {
    kind: EngineKind,
    offload: bool,
    mtu: usize,
    batch: usize,
    /// Bytes the fake device queues towards the kernel before EAGAIN.
    queue_bytes: usize,
}

impl Setup {
    fn new(kind: EngineKind) -> Setup {
        Setup {
            kind,
            offload: false,
            mtu: 1500,
            batch: 8,
            queue_bytes: 1 << 20,
        }
    }
}

impl Harness {
    /// None (with a SKIP line) if io_uring is unusable here and the user
    /// asked to skip it ([`uring_usable`]).
    fn start(s: Setup) -> Option<Harness> {
        let fake = FakeTun::new(s.queue_bytes).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let worker_addr = udp.local_addr().unwrap();
        if s.offload {
            nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::UdpGroSegment, &true)
                .unwrap();
        }
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        let fwd = Forwarder::new(s.mtu, peer.local_addr().unwrap());
        let want = EngineWanted {
            kind: s.kind,
            uring: UringFlags::default(),
            batch: s.batch,
            busy_poll: false,
            offload: if s.offload { Toggle::On } else { Toggle::Off },
        };
        // The test harness names each test's thread after the test.
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let what = format!("{test}: {:?} engine, offload {}", s.kind, s.offload);
        let engine = match Engine::select(&want, Framing::of(&fwd), 1) {
            Ok(e) => e,
            Err(_) if !uring_usable(&what) => return None,
            Err(e) => panic!("{what}: {e}"),
        };
        assert_eq!(engine.offload_with(want.offload), s.offload, "{what}");
        let stats = Arc::new(WorkerStats::default());
        let shutdown = Arc::new(Shutdown::new().unwrap());
        let parts = WorkerParts {
            tun: fake.queue,
            udp,
            datapath: datapath::Setup::new(
                "fake TUN queue 0".into(),
                fwd,
                stats.clone(),
                s.offload,
            )
            .with_visit_limits(VisitLimits {
                packets: s.batch,
                bytes: 0,
            }),
            shutdown: shutdown.clone(),
            busy_poll: false,
            wake: None,
            spin: std::time::Duration::ZERO,
        };
        let (tx, rx) = mpsc::channel();
        let report = move |ev| {
            let _ = tx.send(ev);
        };
        let handle = spawn_worker(0, engine, parts, None, report).unwrap();
        // Readiness: the worker has built its engine and armed its reads.
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(WorkerEvent::Ready(None)) => {}
            other => panic!("{what}: worker did not start: {other:?}"),
        }
        fake.kernel.set_read_timeout_compat(Duration::from_secs(5));
        Some(Harness {
            kernel: fake.kernel,
            peer,
            worker_addr,
            stats,
            shutdown,
            handle: Some(handle),
            what,
        })
    }

    fn stats(&self) -> WorkerSnapshot {
        self.stats.snapshot()
    }

    /// Waits until `cond` holds on the stats (5 s hang guard).
    fn wait_stats(&self, what: &str, cond: impl Fn(&WorkerSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(&self.stats()) {
            assert!(
                Instant::now() < deadline,
                "{}: {what}: stats {}",
                self.what,
                self.stats()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reads one packet the worker wrote to the device.
    fn read_device(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        let n = loop {
            match self.kernel.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("{}: nothing written to the device: {e}", self.what),
            }
        };
        buf.truncate(n);
        buf
    }

    /// Receives one datagram at the peer.
    fn recv_peer(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        let (n, from) = loop {
            match self.peer.recv_from(&mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("{}: nothing sent to the peer: {e}", self.what),
            }
        };
        assert_eq!(from, self.worker_addr);
        buf.truncate(n);
        buf
    }

    fn stop(mut self) -> WorkerSnapshot {
        self.shutdown.trigger();
        let r = self.handle.take().unwrap().join().expect("worker panicked");
        assert!(r.is_ok(), "{}: worker failed: {:?}", self.what, r.err());
        self.stats()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
    common::ipv4_udp_packet([198, 19, 0, 1], [198, 19, 0, 2], 4000, 5000, payload)
}

fn ipv6_udp(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 48 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[48..].copy_from_slice(payload);
    p
}

/// Sum of the TCP pseudo-header and `tcp` (IPv4), folded, not complemented.
fn tcp_sum(ip: &[u8], tcp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(tcp);
    !inet_checksum(&pseudo)
}

/// An IPv4 TCP segment (ACK) with valid checksums.
fn tcp_segment(seq: u32, payload: &[u8]) -> Vec<u8> {
    let total = 40 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[198, 19, 0, 1]);
    p[16..20].copy_from_slice(&[198, 19, 0, 2]);
    let c = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p[34..36].copy_from_slice(&512u16.to_be_bytes());
    p[40..].copy_from_slice(payload);
    let c = !tcp_sum(&p, &p[20..]);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// True if the IPv4 header and TCP checksums of `p` verify.
fn verifies(p: &[u8]) -> bool {
    inet_checksum(&p[..20]) == 0 && tcp_sum(p, &p[20..]) == 0xffff
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn tun_to_peer_unchanged() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup::new(kind)) else {
            continue;
        };
        for pkt in [ipv4_udp(b"hello"), ipv6_udp(b"world"), ipv4_udp(&[7; 1400])] {
            h.kernel.write_all(&pkt).unwrap();
            assert_eq!(
                h.recv_peer(),
                pkt,
                "{}: datagram carries exactly the packet",
                h.what
            );
        }
        let s = h.stop();
        assert_eq!(s.tun_to_peer.packets, 3);
        assert_eq!(s.tun_to_peer.bytes, (33 + 53 + 1428) as u64);
    }
}

#[test]
fn peer_to_tun_unchanged() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup::new(kind)) else {
            continue;
        };
        for pkt in [ipv4_udp(b"a"), ipv6_udp(b"bb")] {
            h.peer.send_to(&pkt, h.worker_addr).unwrap();
            assert_eq!(h.read_device(), pkt, "{}", h.what);
        }
        let s = h.stop();
        assert_eq!(s.peer_to_tun.packets, 2);
    }
}

#[test]
fn strangers_and_malformed_are_counted_not_delivered() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup {
            mtu: 1000,
            ..Setup::new(kind)
        }) else {
            continue;
        };
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger
            .send_to(&ipv4_udp(b"spoof"), h.worker_addr)
            .unwrap();
        let mut truncated = ipv4_udp(b"xx");
        truncated.truncate(10);
        let mut bad_len = ipv4_udp(b"xx");
        bad_len.push(0);
        // Over the MTU by one byte, and far over it (beyond the buffer).
        for bad in [
            vec![],
            truncated,
            bad_len,
            ipv4_udp(&[0; 973]),
            ipv4_udp(&[0; 9000]),
        ] {
            h.peer.send_to(&bad, h.worker_addr).unwrap();
        }
        let good = ipv4_udp(b"good");
        h.peer.send_to(&good, h.worker_addr).unwrap();
        assert_eq!(
            h.read_device(),
            good,
            "{}: only the good packet reaches the device",
            h.what
        );
        h.wait_stats("drops", |s| s.peer_to_tun.dropped() == 6);
        let s = h.stop();
        let d = &s.peer_to_tun;
        assert_eq!(d.drops_for(DropReason::NotFromPeer), 1);
        assert_eq!(d.drops_for(DropReason::Empty), 1);
        assert_eq!(d.drops_for(DropReason::Truncated), 1);
        assert_eq!(d.drops_for(DropReason::LengthMismatch), 1);
        assert_eq!(d.drops_for(DropReason::OverMtu), 2);
        assert_eq!(d.packets, 1);
    }
}

#[test]
fn malformed_from_device_is_counted() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup::new(kind)) else {
            continue;
        };
        h.kernel.write_all(&[0x45, 0, 0]).unwrap();
        h.kernel.write_all(&[0x95; 40]).unwrap();
        h.wait_stats("device drops", |s| s.tun_to_peer.dropped() == 2);
        let s = h.stop();
        assert_eq!(s.tun_to_peer.drops_for(DropReason::Truncated), 1);
        assert_eq!(s.tun_to_peer.drops_for(DropReason::BadVersion), 1);
        assert_eq!(s.tun_to_peer.packets, 0);
    }
}

/// The fake device's queue holds only a few packets: the worker must hold
/// packets and wait, not drop them, and deliver all of them in order once
/// the "kernel" reads.
#[test]
fn full_device_queue_applies_backpressure_without_loss() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup {
            batch: 64,
            queue_bytes: 4096,
            ..Setup::new(kind)
        }) else {
            continue;
        };
        // Far more than the device queue holds (about 11), and few enough
        // that the worker's socket buffer takes them all even when the
        // worker is slow to run (a kernel drop there would look like loss).
        const N: u32 = 64;
        for i in 0..N {
            h.peer
                .send_to(&ipv4_udp(&i.to_be_bytes()), h.worker_addr)
                .unwrap();
        }
        h.wait_stats("backpressure", |s| s.peer_to_tun.backpressure > 0);
        for i in 0..N {
            let p = h.read_device();
            assert_eq!(p.len(), 32);
            assert_eq!(
                &p[28..32],
                &i.to_be_bytes(),
                "{}: packet {i} in order",
                h.what
            );
        }
        let s = h.stop();
        assert_eq!(s.peer_to_tun.packets, u64::from(N));
        assert_eq!(s.peer_to_tun.dropped(), 0);
        assert!(s.peer_to_tun.backpressure > 0);
    }
}

#[test]
fn shutdown_stops_an_idle_worker() {
    for kind in ENGINES {
        let Some(h) = Harness::start(Setup::new(kind)) else {
            continue;
        };
        let what = h.what.clone();
        let s = h.stop();
        assert_eq!(s.packets(), 0, "{what}");
    }
}

/// Offload, TUN side: a TSO super-packet read from the device leaves as
/// MTU-sized datagrams, each a valid TCP segment, in order, through UDP GSO.
#[test]
fn offload_super_packet_leaves_as_valid_segments_in_order() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup {
            offload: true,
            ..Setup::new(kind)
        }) else {
            continue;
        };
        // 46 segments of 1400 bytes: more than one GSO send can carry.
        let data = payload(46 * 1400, 3);
        let mut sup = tcp_segment(1000, &data);
        // As a TUN with TSO hands it over: the checksum field holds only
        // the pseudo-header sum.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&sup[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((sup.len() - 20) as u16).to_be_bytes());
        let partial = !inet_checksum(&pseudo);
        sup[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: virtio::GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut frame = vec![0u8; virtio::LEN];
        hdr.write(&mut frame);
        frame.extend_from_slice(&sup);
        h.kernel.write_all(&frame).unwrap();
        let mut got = Vec::new();
        for i in 0..46u32 {
            let seg = h.recv_peer();
            assert!(seg.len() <= 1500, "{}", h.what);
            assert!(verifies(&seg), "{}: segment {i} checksums", h.what);
            let seq = u32::from_be_bytes(seg[24..28].try_into().unwrap());
            assert_eq!(seq, 1000 + 1400 * i, "{}: segment {i} in order", h.what);
            got.extend_from_slice(&seg[40..]);
        }
        assert_eq!(got, data, "{}", h.what);
        let what = h.what.clone();
        let s = h.stop();
        // One GSO send of 45 (65507 bytes hold no more), the last alone.
        assert_eq!(s.tun_to_peer.packets, 46);
        assert_eq!(s.gso_sends, 1, "{what}: {s}");
        assert_eq!(s.gso_segments, 45);
    }
}

/// Sends `segments` from the peer as one UDP GSO send (what a tunfwd peer
/// does), so the worker's GRO socket receives them as one batch.
fn send_gso(peer: &UdpSocket, to: SocketAddr, segments: &[Vec<u8>]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    let seg = segments[0].len() as u16;
    let data: Vec<u8> = segments.concat();
    let addr = SockaddrStorage::from(to);
    sendmsg(
        peer.as_raw_fd(),
        &[std::io::IoSlice::new(&data)],
        &[ControlMessage::UdpGsoSegments(&seg)],
        MsgFlags::empty(),
        Some(&addr),
    )
    .unwrap();
}

/// Offload, UDP side: a GRO batch of one flow becomes one TUN write with a
/// virtio-net header; a corrupted segment is never merged (counted as
/// bad_checksum), so the application never sees its bytes.
#[test]
fn offload_gro_batch_is_coalesced_and_corrupt_segments_are_not() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup {
            offload: true,
            ..Setup::new(kind)
        }) else {
            continue;
        };
        let segs: Vec<Vec<u8>> = (0..8u32)
            .map(|i| tcp_segment(i * 1000, &payload(1000, i as u8)))
            .collect();
        send_gso(&h.peer, h.worker_addr, &segs);
        let w = h.read_device();
        let hdr = VirtioNetHdr::parse(&w).unwrap();
        assert_eq!(hdr.gso_type, virtio::GSO_TCPV4, "{}", h.what);
        assert_eq!(hdr.gso_size, 1000);
        let ip = &w[virtio::LEN..];
        assert_eq!(ip.len(), 40 + 8000, "{}: one super-packet", h.what);
        let want: Vec<u8> = (0..8u8).flat_map(|i| payload(1000, i)).collect();
        assert_eq!(&ip[40..], &want[..]);

        // The same flow again, segment 3 with one flipped payload bit.
        let mut bad = segs.clone();
        bad[3][500] ^= 0x04;
        send_gso(&h.peer, h.worker_addr, &bad);
        let first = h.read_device();
        let second = h.read_device();
        let p1 = &first[virtio::LEN..];
        let p2 = &second[virtio::LEN..];
        assert_eq!(p1.len(), 40 + 3000, "{}: segments 0..3 merged", h.what);
        assert_eq!(p2.len(), 40 + 4000, "{}: segments 4..8 merged", h.what);
        assert_eq!(&p1[40..], &want[..3000]);
        assert_eq!(&p2[40..], &want[4000..]);
        h.wait_stats("bad checksum", |s| {
            s.peer_to_tun.drops_for(DropReason::BadChecksum) == 1
        });
        let what = h.what.clone();
        let s = h.stop();
        assert_eq!(s.peer_to_tun.packets, 15);
        assert_eq!(s.peer_to_tun.dropped(), 1);
        assert!(s.gro_receives >= 2, "{what}: {s}");
        assert_eq!(s.vnet_writes, 3);
    }
}

/// Offload with a packet that is not a super-packet: it passes both ways
/// with a virtio-net header and its checksum completed.
#[test]
fn offload_single_packets_pass_both_ways() {
    for kind in ENGINES {
        let Some(mut h) = Harness::start(Setup {
            offload: true,
            ..Setup::new(kind)
        }) else {
            continue;
        };
        let pkt = tcp_segment(5, b"single");
        let mut frame = vec![0u8; virtio::LEN];
        frame.extend_from_slice(&pkt);
        h.kernel.write_all(&frame).unwrap();
        assert_eq!(h.recv_peer(), pkt, "{}", h.what);
        h.peer.send_to(&pkt, h.worker_addr).unwrap();
        let w = h.read_device();
        assert_eq!(VirtioNetHdr::parse(&w).unwrap(), VirtioNetHdr::default());
        assert_eq!(&w[virtio::LEN..], &pkt[..], "{}", h.what);
        let s = h.stop();
        assert_eq!((s.tun_to_peer.packets, s.peer_to_tun.packets), (1, 1));
    }
}

/// A read timeout on the fake kernel end, so a lost packet fails the test
/// instead of hanging it.
trait ReadTimeout {
    fn set_read_timeout_compat(&self, d: Duration);
}

impl ReadTimeout for File {
    fn set_read_timeout_compat(&self, d: Duration) {
        let tv = nix::sys::time::TimeVal::new(d.as_secs() as i64, d.subsec_micros() as i64);
        nix::sys::socket::setsockopt(self, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    }
}
