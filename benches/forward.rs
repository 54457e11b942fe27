//! Per-packet cost of the pure forwarding core: validation and the decision,
//! for IPv4 and IPv6 packets of several sizes; and the Internet checksum
//! over a 64 KiB super-packet, which offload computes once per byte. No root
//! needed.
//!
//! `cargo bench --bench forward` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tunfwd::forward::Forwarder;
use tunfwd::packet::IpPacket;

fn ipv4(total: usize) -> Vec<u8> {
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[9] = 17;
    p
}

fn ipv6(total: usize) -> Vec<u8> {
    let mut p = vec![0u8; total];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    p[6] = 17;
    p
}

fn bench(c: &mut Criterion) {
    let peer: SocketAddr = "198.18.0.2:5000".parse().unwrap();
    let fwd = Forwarder::new(1500, peer);
    const BATCH: usize = 64;
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(BATCH as u64));
    for size in [64usize, 512, 1400] {
        for (ver, pkt) in [("v4", ipv4(size)), ("v6", ipv6(size))] {
            let batch: Vec<Vec<u8>> = (0..BATCH).map(|_| pkt.clone()).collect();
            g.bench_with_input(
                BenchmarkId::new(format!("validate_{ver}"), size),
                &batch,
                |b, batch| {
                    b.iter(|| {
                        for p in batch {
                            black_box(IpPacket::new_checked(black_box(p)).is_ok());
                        }
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("from_peer_{ver}"), size),
                &batch,
                |b, batch| {
                    b.iter(|| {
                        for p in batch {
                            black_box(fwd.handle_from_peer(black_box(peer), black_box(p)));
                        }
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("from_tun_{ver}"), size),
                &batch,
                |b, batch| {
                    b.iter(|| {
                        for p in batch {
                            black_box(fwd.handle_from_tun(black_box(p)));
                        }
                    })
                },
            );
        }
    }
    g.finish();

    let mut g = c.benchmark_group("checksum");
    for len in [1500usize, 65536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("sum", len), &data, |b, data| {
            b.iter(|| black_box(tunfwd::packet::checksum::sum(black_box(data), 0)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
