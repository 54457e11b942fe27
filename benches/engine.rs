//! Per-packet cost of each engine: one worker forwards a fixed number of
//! packets from the crate's fake TUN queue (a SOCK_SEQPACKET socket pair:
//! TUN-like message boundaries, no root needed) to a UDP peer on loopback,
//! for several `--batch` sizes. The time includes the injecting write and
//! the receiving recv, so it is an upper bound on the engine's own cost;
//! compare runs, not absolute values. TUN-backed numbers come from
//! `tunfwd bench` (root).
//!
//! `cargo bench --bench engine` (add `-- --quick` for a short run).

#[cfg(target_os = "linux")]
mod linux {
    use std::io::Write;
    use std::net::UdpSocket;
    use std::sync::Arc;
    use std::sync::mpsc;

    use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
    use nix::sys::socket::{setsockopt, sockopt};
    use tunfwd::config::{EngineKind, Toggle, UringFlags};
    use tunfwd::datapath::{Framing, Setup, VisitLimits};
    use tunfwd::engine::fake::FakeTun;
    use tunfwd::engine::{Engine, EngineWanted, Shutdown, WorkerEvent, WorkerParts, spawn_worker};
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
        for kind in [EngineKind::Poll, EngineKind::Uring] {
            let mut g = c.benchmark_group(format!("{kind:?}_engine_tun_to_peer").to_lowercase());
            g.throughput(Throughput::Elements(PACKETS as u64));
            for batch in [1usize, 8, 64] {
                let mut fake = FakeTun::new(1 << 20).expect("fake TUN");
                let udp = UdpSocket::bind("127.0.0.1:0").expect("bind worker");
                let peer = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
                // Room for a whole iteration: nothing may be lost at the sink.
                let _ = setsockopt(&peer, sockopt::RcvBuf, &(4 << 20));
                let fwd = Forwarder::new(1500, peer.local_addr().expect("addr"));
                let want = EngineWanted {
                    kind,
                    uring: UringFlags::default(),
                    batch,
                    busy_poll: false,
                    offload: Toggle::Off,
                };
                let engine = match Engine::select(&want, Framing::of(&fwd), 1) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("skipping {kind:?}: {e}");
                        break;
                    }
                };
                let shutdown = Arc::new(Shutdown::new().expect("shutdown pipe"));
                let parts = WorkerParts {
                    tun: fake.queue,
                    udp,
                    datapath: Setup::new(
                        "bench".into(),
                        fwd,
                        Arc::new(WorkerStats::default()),
                        false,
                    )
                    .with_visit_limits(VisitLimits {
                        packets: batch,
                        bytes: 0,
                    }),
                    shutdown: shutdown.clone(),
                    busy_poll: false,
                    wake: None,
                    spin: std::time::Duration::ZERO,
                };
                let (tx, rx) = mpsc::channel();
                let handle = spawn_worker(0, engine, parts, None, move |ev| {
                    let _ = tx.send(ev);
                })
                .expect("spawn worker");
                match rx.recv() {
                    Ok(WorkerEvent::Ready(None)) => {}
                    other => panic!("worker did not start: {other:?}"),
                }
                let pkt = packet(64);
                let mut buf = [0u8; 2048];
                g.bench_function(BenchmarkId::new("batch", batch), |b| {
                    b.iter(|| {
                        for _ in 0..PACKETS {
                            fake.kernel.write_all(&pkt).expect("inject");
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
    }

    criterion_group!(benches, bench);
}

#[cfg(target_os = "linux")]
criterion::criterion_main!(linux::benches);

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the engine bench needs Linux (fake TUN from a SOCK_SEQPACKET pair)");
}
