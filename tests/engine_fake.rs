//! Deterministic engine tests without root: the TUN queue is replaced by one
//! end of a SOCK_SEQPACKET socketpair (message boundaries like TUN, and a
//! small receive queue that makes backpressure easy to provoke), the UDP side
//! is a real socket on loopback.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tunfwd::engine::Shutdown;
use tunfwd::engine::poll::PollWorker;
use tunfwd::forward::{DropReason, Forwarder};
use tunfwd::stats::{WorkerSnapshot, WorkerStats};

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
}

impl Harness {
    fn new(mtu: usize, batch: usize) -> Harness {
        let (tun_end, kernel_end): (OwnedFd, OwnedFd) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        fcntl(&tun_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        // A tiny send buffer: the fake device fills after a few packets.
        nix::sys::socket::setsockopt(&tun_end, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let worker_addr = udp.local_addr().unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let stats = Arc::new(WorkerStats::default());
        let shutdown = Arc::new(Shutdown::new().unwrap());
        let worker = PollWorker {
            label: "fake TUN queue 0".into(),
            tun: File::from(tun_end).into(),
            udp,
            forwarder: Forwarder::new(mtu, peer.local_addr().unwrap()),
            batch,
            busy_poll: false,
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            offload: None,
        };
        let handle = std::thread::spawn(move || worker.run());
        let kernel = File::from(kernel_end);
        Harness {
            kernel,
            peer,
            worker_addr,
            stats,
            shutdown,
            handle: Some(handle),
        }
    }

    fn stats(&self) -> WorkerSnapshot {
        self.stats.snapshot()
    }

    /// Waits until `cond` holds on the stats (5 s hang guard).
    fn wait_stats(&self, what: &str, cond: impl Fn(&WorkerSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(&self.stats()) {
            assert!(Instant::now() < deadline, "{what}: stats {}", self.stats());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(mut self) -> WorkerSnapshot {
        self.shutdown.trigger();
        let r = self.handle.take().unwrap().join().expect("worker panicked");
        assert!(r.is_ok(), "worker failed: {:?}", r.err());
        self.stats()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[198, 19, 0, 1]);
    p[16..20].copy_from_slice(&[198, 19, 0, 2]);
    p[28..].copy_from_slice(payload);
    p
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

#[test]
fn tun_to_peer_unchanged() {
    let mut h = Harness::new(1500, 8);
    for pkt in [ipv4_udp(b"hello"), ipv6_udp(b"world"), ipv4_udp(&[7; 1400])] {
        h.kernel.write_all(&pkt).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = h.peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pkt[..], "datagram carries exactly the packet");
        assert_eq!(from, h.worker_addr);
    }
    let s = h.stop();
    assert_eq!(s.tun_to_peer.packets, 3);
    assert_eq!(s.tun_to_peer.bytes, (33 + 53 + 1428) as u64);
}

#[test]
fn peer_to_tun_unchanged() {
    let mut h = Harness::new(1500, 8);
    h.kernel.set_read_timeout_compat(Duration::from_secs(5));
    for pkt in [ipv4_udp(b"a"), ipv6_udp(b"bb")] {
        h.peer.send_to(&pkt, h.worker_addr).unwrap();
        let mut buf = [0u8; 2048];
        let n = h.kernel.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pkt[..]);
    }
    let s = h.stop();
    assert_eq!(s.peer_to_tun.packets, 2);
}

#[test]
fn strangers_and_malformed_are_counted_not_delivered() {
    let mut h = Harness::new(1000, 8);
    h.kernel.set_read_timeout_compat(Duration::from_secs(5));
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .send_to(&ipv4_udp(b"spoof"), h.worker_addr)
        .unwrap();
    let mut truncated = ipv4_udp(b"xx");
    truncated.truncate(10);
    let mut bad_len = ipv4_udp(b"xx");
    bad_len.push(0);
    for bad in [vec![], truncated, bad_len, ipv4_udp(&[0; 1000])] {
        h.peer.send_to(&bad, h.worker_addr).unwrap();
    }
    let good = ipv4_udp(b"good");
    h.peer.send_to(&good, h.worker_addr).unwrap();
    let mut buf = [0u8; 2048];
    let n = h.kernel.read(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &good[..],
        "only the good packet reaches the device"
    );
    h.wait_stats("drops", |s| s.peer_to_tun.dropped() == 5);
    let s = h.stop();
    let d = &s.peer_to_tun;
    assert_eq!(d.drops_for(DropReason::NotFromPeer), 1);
    assert_eq!(d.drops_for(DropReason::Empty), 1);
    assert_eq!(d.drops_for(DropReason::Truncated), 1);
    assert_eq!(d.drops_for(DropReason::LengthMismatch), 1);
    assert_eq!(d.drops_for(DropReason::OverMtu), 1);
    assert_eq!(d.packets, 1);
}

#[test]
fn malformed_from_device_is_counted() {
    let mut h = Harness::new(1500, 8);
    h.kernel.write_all(&[0x45, 0, 0]).unwrap();
    h.kernel.write_all(&[0x95; 40]).unwrap();
    h.wait_stats("device drops", |s| s.tun_to_peer.dropped() == 2);
    let s = h.stop();
    assert_eq!(s.tun_to_peer.drops_for(DropReason::Truncated), 1);
    assert_eq!(s.tun_to_peer.drops_for(DropReason::BadVersion), 1);
    assert_eq!(s.tun_to_peer.packets, 0);
}

/// The fake device's queue holds only a few packets (a 4 KiB send buffer):
/// the worker must hold packets and wait, not drop them, and deliver all of
/// them in order once the "kernel" reads.
#[test]
fn full_device_queue_applies_backpressure_without_loss() {
    let mut h = Harness::new(1500, 64);
    const N: u32 = 100;
    for i in 0..N {
        h.peer
            .send_to(&ipv4_udp(&i.to_be_bytes()), h.worker_addr)
            .unwrap();
    }
    h.wait_stats("backpressure", |s| s.peer_to_tun.backpressure > 0);
    h.kernel.set_read_timeout_compat(Duration::from_secs(5));
    let mut buf = [0u8; 64];
    for i in 0..N {
        let n = h.kernel.read(&mut buf).unwrap();
        assert_eq!(n, 32);
        assert_eq!(&buf[28..32], &i.to_be_bytes(), "packet {i} in order");
    }
    let s = h.stop();
    assert_eq!(s.peer_to_tun.packets, u64::from(N));
    assert_eq!(s.peer_to_tun.dropped(), 0);
    assert!(s.peer_to_tun.backpressure > 0);
}

#[test]
fn shutdown_stops_an_idle_worker() {
    let h = Harness::new(1500, 8);
    std::thread::sleep(Duration::from_millis(50));
    let s = h.stop();
    assert_eq!(s.packets(), 0);
    assert!(s.waits >= 1);
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
