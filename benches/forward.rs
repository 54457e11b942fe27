//! Per-packet cost of the pure forwarding core: validation and the decision,
//! for IPv4 and IPv6 packets of several sizes; the Internet checksum over a
//! 64 KiB super-packet, which offload computes once per byte; and the peer
//! table's lookups (longest-prefix match by inner address, peer by UDP
//! source) with 10, 10,000 and 100,000 prefixes. No root needed.
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

/// Lookups in hubs of 10, 10,000 and 100,000 prefixes (ten per peer): per
/// lookup, over 4,096 addresses inside random prefixes of the table (so a
/// large table's lookups miss the CPU caches as they would with many
/// active peers).
fn peer_lookup(c: &mut Criterion) {
    use tunfwd::peers::{PeerTable, synthetic_hub};
    let mut g = c.benchmark_group("peers");
    const N: usize = 4096;
    g.throughput(Throughput::Elements(N as u64));
    for prefixes in [10usize, 10_000, 100_000] {
        let specs = synthetic_hub(prefixes / 10, 10);
        let table = PeerTable::build(&specs, 1, false, None).unwrap();
        assert_eq!(table.prefixes(), prefixes);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        let mut v4 = Vec::with_capacity(N);
        let mut v6 = Vec::with_capacity(N);
        let mut sources = Vec::with_capacity(N);
        while v4.len() < N || v6.len() < N {
            let s = &specs[next() % specs.len()];
            let p = s.prefixes[next() % s.prefixes.len()];
            // An address inside the prefix: its network with random host
            // bits.
            let host = next() as u128;
            match p.net() {
                std::net::IpAddr::V4(n) if v4.len() < N => {
                    let bits = 32 - u32::from(p.len());
                    let h = (host as u32).checked_shr(32 - bits).unwrap_or(0);
                    v4.push(std::net::IpAddr::from(std::net::Ipv4Addr::from(
                        u32::from(n) | h,
                    )));
                }
                std::net::IpAddr::V6(n) if v6.len() < N => {
                    let bits = 128 - u32::from(p.len());
                    let h = host.checked_shr(128 - bits).unwrap_or(0);
                    v6.push(std::net::IpAddr::from(std::net::Ipv6Addr::from(
                        u128::from(n) | h,
                    )));
                }
                _ => {}
            }
            if sources.len() < N {
                sources.push(s.addr);
            }
        }
        for (name, addrs) in [("route_v4", &v4), ("route_v6", &v6)] {
            g.bench_with_input(BenchmarkId::new(name, prefixes), addrs, |b, addrs| {
                b.iter(|| {
                    for a in addrs {
                        black_box(table.route(black_box(*a)));
                    }
                })
            });
        }
        g.bench_with_input(
            BenchmarkId::new("find_source", prefixes),
            &sources,
            |b, s| {
                b.iter(|| {
                    for a in s {
                        black_box(table.find(black_box(*a)));
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench, peer_lookup);
criterion_main!(benches);
