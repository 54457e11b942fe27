//! Per-packet cost of the poll engine: one worker forwards a fixed number of
//! packets from a fake TUN queue (a SOCK_SEQPACKET socketpair: TUN-like
//! message boundaries, no root needed) to a UDP peer on loopback, for several
//! `--batch` sizes. The time includes the injecting write and the receiving
//! recv, so it is an upper bound on the engine's own cost; compare runs, not
//! absolute values. TUN-backed numbers come from `tunfwd bench` (root).
//!
//! `cargo bench --bench engine` (add `-- --quick` for a short run).

// The fake TUN (a SOCK_SEQPACKET pair standing in for a Linux TUN queue, no
// address-family prefix) is Linux-specific.
#[cfg(target_os = "linux")]
mod linux {
    use std::fs::File;
    use std::io::Write;
    use std::net::UdpSocket;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};
    use tunfwd::engine::Shutdown;
    use tunfwd::engine::poll::PollWorker;
    use tunfwd::forward::Forwarder;
    use tunfwd::stats::WorkerStats;

    /// Packets per measured iteration.
    const PACKETS: usize = 64;

    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        p
    }

    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("poll_engine_tun_to_peer");
        g.throughput(Throughput::Elements(PACKETS as u64));
        for batch in [1usize, 8, 64] {
            let (tun_end, kernel_end): (OwnedFd, OwnedFd) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair");
            fcntl(&tun_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind worker");
            udp.set_nonblocking(true).expect("nonblocking");
            let peer = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
            // Room for a whole iteration: nothing may be lost at the sink.
            let _ = setsockopt(&peer, sockopt::RcvBuf, &(4 << 20));
            let shutdown = Arc::new(Shutdown::new().expect("shutdown pipe"));
            let worker = PollWorker {
                label: "bench".into(),
                tun: File::from(tun_end).into(),
                udp,
                forwarder: Forwarder::new(1500, peer.local_addr().expect("addr")),
                batch,
                busy_poll: false,
                stats: Arc::new(WorkerStats::default()),
                shutdown: shutdown.clone(),
                offload: None,
            };
            let handle = std::thread::spawn(move || worker.run());
            let mut kernel = File::from(kernel_end);
            let pkt = packet(64);
            let mut buf = [0u8; 2048];
            g.bench_function(BenchmarkId::new("batch", batch), |b| {
                b.iter(|| {
                    for _ in 0..PACKETS {
                        kernel.write_all(&pkt).expect("inject");
                    }
                    for _ in 0..PACKETS {
                        peer.recv(&mut buf).expect("receive");
                    }
                })
            });
            shutdown.trigger();
            let _ = handle.join();
        }
        g.finish();
    }

    criterion_group!(benches, bench);
}

#[cfg(target_os = "linux")]
criterion::criterion_main!(linux::benches);

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the engine bench needs Linux (fake TUN from a SOCK_SEQPACKET pair)");
}
