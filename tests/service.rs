//! Running tunfwd as a service: Prometheus metrics (checked by promtool,
//! scraped by a real Prometheus server, and left alone by hostile HTTP
//! clients while a verified transfer runs), JSON stats, a tunnel run from
//! its config file, the systemd unit (systemd-analyze), completions and man
//! pages. The real-kernel tests need root, promtool and prometheus
//! (Debian's `prometheus` package); the unit test needs systemd-analyze.

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const METRICS: &str = "127.0.0.1:9500";
/// Bytes per second of the paced transfers that attacks must meet.
const PACING: u64 = 12 << 20;

/// One HTTP exchange from inside `ns`: sends `request`, reads until the
/// server closes; returns the status code (0 if none came) and the whole
/// response. A server reset after a reply still counts as that reply.
fn http(ns: &Netns, to: &str, request: Vec<u8>) -> (u16, String) {
    http_try(ns, to, request).unwrap_or_else(|| panic!("connect to {to}"))
}

/// As [`http`]; None if nothing listens.
fn http_try(ns: &Netns, to: &str, request: Vec<u8>) -> Option<(u16, String)> {
    let to: SocketAddr = to.parse().unwrap();
    ns.spawn(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&request);
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        Some((status_of(&text), text))
    })
    .join()
    .expect("http thread")
}

fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| response.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn get(ns: &Netns, to: &str, path: &str) -> (u16, String) {
    http(
        ns,
        to,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes(),
    )
}

/// The metrics body of a scrape (200 required).
fn scrape(ns: &Netns) -> String {
    let (status, text) = get(ns, METRICS, "/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4"),
        "{text}"
    );
    text.split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string()
}

/// A scrape rendered after `earlier` (the server renders at most once a
/// second and shares the body in between): scrapes until
/// `tunfwd_metrics_renders_total` has moved on.
fn scrape_after(ns: &Netns, earlier: &str) -> String {
    let renders = |b: &str| sample(b, "tunfwd_metrics_renders_total");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(ns);
        if renders(&body) > renders(earlier) {
            return body;
        }
        assert!(Instant::now() < deadline, "no new render within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the sample `name{labels}` (labels exactly as printed).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

/// The sum over every queue of `metric`'s `tun_to_peer` samples in `body`
/// (`--queues auto` runs one queue per CPU: the transfer's flow is on one
/// of them); at least one must exist.
fn tun_to_peer_total(body: &str, metric: &str) -> f64 {
    let prefix = format!("{metric}{{queue=\"");
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("\",direction=\"tun_to_peer\"} "))
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no sample {metric} in:\n{body}");
    values.iter().sum()
}

/// `promtool check metrics` on `body`: must exit 0 and find no problem.
fn promtool_check(body: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {said}");
    assert!(said.trim().is_empty(), "promtool found problems: {said}");
}

#[test]
fn metrics_pass_promtool_and_move_with_traffic() {
    let test = "metrics_pass_promtool_and_move_with_traffic";
    if !can_run_kernel_tests(test) || !have_tools(test, &[("promtool", "prometheus")]) {
        return;
    }
    let topo = Topology::new();
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--metrics", METRICS]));
    assert!(
        a.stderr()
            .contains(&format!("metrics at http://{METRICS}/metrics")),
        "{}",
        a.stderr()
    );
    let before = scrape(&topo.a);
    promtool_check(&before);
    let out = |b: &str, what: &str| tun_to_peer_total(b, &format!("tunfwd_{what}"));
    let to = format!("{OVERLAY_B}:7001").parse().unwrap();
    let bytes = verified_tcp_transfer(&topo.a, &topo.b, to, 8 << 20);
    let after = scrape_after(&topo.a, &before);
    promtool_check(&after);
    assert!(
        out(&after, "bytes_total") - out(&before, "bytes_total") >= bytes as f64,
        "bytes moved by less than the transfer:\n{after}"
    );
    assert!(out(&after, "packets_total") - out(&before, "packets_total") >= 5000.0);
    let visits = "tunfwd_visit_seconds_count";
    assert!(tun_to_peer_total(&after, visits) > tun_to_peer_total(&before, visits));
    for family in [
        "tunfwd_build_info{",
        "tunfwd_drops_total{queue=\"0\",direction=\"peer_to_tun\",reason=\"not_from_peer\"}",
        "tunfwd_visit_seconds_bucket{",
        "tunfwd_queue_delay_seconds_bucket{",
        "tunfwd_queued_packets{",
        "tunfwd_in_flight_buffers{",
        "tunfwd_peers 1",
        "tunfwd_kernel_udp_rcvbuf_drops_total ",
    ] {
        assert!(after.contains(family), "no {family} in:\n{after}");
    }
    // HEAD: the headers of GET, no body.
    let (status, head) = http(
        &topo.a,
        METRICS,
        b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
    );
    assert_eq!(status, 200, "{head}");
    let (headers, body) = head.split_once("\r\n\r\n").unwrap();
    assert!(body.is_empty(), "HEAD answered with a body: {body:?}");
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {headers}"));
    assert!(length > 1000, "{headers}");
    // Other paths and methods.
    assert_eq!(get(&topo.a, METRICS, "/nope").0, 404);
    assert_eq!(
        http(
            &topo.a,
            METRICS,
            b"DELETE /metrics HTTP/1.1\r\n\r\n".to_vec()
        )
        .0,
        405
    );
    a.terminate();
}

#[test]
fn a_prometheus_server_scrapes_tunfwd() {
    let test = "a_prometheus_server_scrapes_tunfwd";
    if !can_run_kernel_tests(test) || !have_tools(test, &[("prometheus", "prometheus")]) {
        return;
    }
    let topo = Topology::new();
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let _a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--metrics", METRICS]));
    assert!(topo.a.ping(OVERLAY_B));
    let dir = std::env::temp_dir().join(format!("tunfwd-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tunfwd\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    // Prometheus lives in namespace a, next to tunfwd's loopback listener,
    // on a port of that namespace.
    let web = "127.0.0.1:9090";
    let mut prom = Proc::spawn({
        let mut c = topo.a.command(&["prometheus"]);
        c.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .arg("--log.level=warn");
        c
    });
    // Ready, then a query until the first scrape has landed (30 s guard).
    let query = "/api/v1/query?query=tunfwd_packets_total%7Bdirection%3D%22tun_to_peer%22%7D";
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let up = prom.child.try_wait().unwrap();
        assert!(up.is_none(), "prometheus exited: {}", prom.stderr());
        let ready = http_try(&topo.a, web, b"GET /-/ready HTTP/1.0\r\n\r\n".to_vec())
            .is_some_and(|(status, _)| status == 200);
        if ready {
            let (status, text) = get(&topo.a, web, query);
            if status == 200 {
                let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
                // Chunked or not, the JSON object is between the outer braces.
                let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
                let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                let got = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok());
                if let Some(n) = got {
                    eprintln!("prometheus answered: {json}");
                    break n;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "prometheus has no tunfwd_packets_total within 30 s\n{}",
            prom.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(value > 0.0, "tunfwd_packets_total = {value}");
    prom.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_http_clients_leave_forwarding_and_memory_alone() {
    let test = "hostile_http_clients_leave_forwarding_and_memory_alone";
    if !can_run_kernel_tests(test) {
        return;
    }
    let topo = Topology::new();
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let mut a = Proc::tunfwd(&topo.a, &tunnel_args(true, &["--metrics", METRICS]));
    let pid = a.child.id();
    let _ = scrape(&topo.a);
    let rss_start = rss_kib(pid);
    assert!(rss_start > 0);

    // A verified transfer, paced to run through every attack.
    let progress = Arc::new(AtomicU64::new(0));
    let total: u64 = 160 << 20;
    let transfer = {
        let (na, nb) = (Netns::existing(&topo.a.name), Netns::existing(&topo.b.name));
        let p = progress.clone();
        let to = format!("{OVERLAY_B}:7002").parse().unwrap();
        std::thread::spawn(move || {
            verified_tcp_transfer_observed(&na, &nb, to, total, Some(p), Some(PACING))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the transfer did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Each attack phase must meet the running transfer: it moved during
    // the quick attacks (garbage, 431), kept at least a quarter of its
    // pacing through the long one (slow client and flood, 5 s or more),
    // and had not finished when the last one ended.
    let moved_before = progress.load(Ordering::Relaxed);

    // Garbage request lines: each answered 400.
    let mut x: u64 = 0x1234_5678;
    for i in 0..50 {
        let mut junk: Vec<u8> = (0..(i * 13 % 200 + 1))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        junk.extend_from_slice(b"\r\n\r\n");
        let (status, text) = http(&topo.a, METRICS, junk);
        assert_eq!(status, 400, "garbage {i} got: {text:?}");
    }
    // A header past 8 KiB, without its end: 431 once 8 KiB are in (the
    // 9 KiB sent fit the socket buffers, so the reply is read whole).
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(9 << 10, b'a');
    let (status, text) = http(&topo.a, METRICS, big);
    assert_eq!(status, 431, "9 KiB header: {text:?}");
    let moved_quick = progress.load(Ordering::Relaxed);
    assert!(
        moved_quick > moved_before,
        "the transfer stood still during the garbage and 431 requests"
    );
    // A client sending one byte a second takes a slot and meets the
    // request timeout (408). Then 100 silent connections: the 63 that fit
    // beside it in the 64 slots also get 408 at their timeout, the 37
    // past the limit 503 at once; memory stays put throughout.
    let (slow_connected, connected) = std::sync::mpsc::channel();
    let slow = {
        let ns = Netns::existing(&topo.a.name);
        let to: SocketAddr = METRICS.parse().unwrap();
        ns.spawn(move || {
            let mut s = TcpStream::connect(to).unwrap();
            slow_connected.send(()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut got = Vec::new();
            for b in b"GET /metrics HTTP/1.1\r\n" {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                let mut buf = [0u8; 256];
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Err(_) => {}
                }
            }
            status_of(&String::from_utf8_lossy(&got))
        })
    };
    connected.recv().unwrap();
    let long_phase = Instant::now();
    let flood = {
        let ns = Netns::existing(&topo.a.name);
        let to: SocketAddr = METRICS.parse().unwrap();
        ns.spawn(move || {
            // Connections complete in order and the server accepts them in
            // that order (the listen backlog, 128, holds them all).
            let mut held: Vec<TcpStream> =
                (0..100).map(|_| TcpStream::connect(to).unwrap()).collect();
            held.iter_mut()
                .map(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                    let mut out = String::new();
                    let _ = s.read_to_string(&mut out);
                    status_of(&out)
                })
                .collect::<Vec<u16>>()
        })
    };
    let rss_flood = {
        let mut peak = 0;
        while !flood.is_finished() || !slow.is_finished() {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    };
    let statuses = flood.join().unwrap();
    let timed_out = 63;
    assert!(
        statuses[..timed_out].iter().all(|&s| s == 408)
            && statuses[timed_out..].iter().all(|&s| s == 503),
        "the first {timed_out} connections 408, the rest 503: {statuses:?}"
    );
    assert_eq!(slow.join().unwrap(), 408, "the slow client");
    let moved_long = progress.load(Ordering::Relaxed) - moved_quick;
    let paced = long_phase.elapsed().as_secs_f64() * PACING as f64;
    assert!(
        moved_long as f64 >= paced / 4.0,
        "the transfer moved {moved_long} bytes during the flood, under a quarter of its \
         pacing ({paced:.0} bytes)"
    );
    assert!(
        progress.load(Ordering::Relaxed) < total,
        "the transfer ended before the attacks did: they did not meet it"
    );
    // Still serving, and still forwarding to the end.
    let _ = scrape(&topo.a);
    assert_eq!(transfer.join().expect("transfer"), total);
    assert!(
        rss_flood < rss_start + 16 * 1024,
        "RSS grew from {rss_start} KiB to {rss_flood} KiB under hostile clients"
    );
    a.terminate();
}

/// With 200,000 peers (about 76 MB of per-peer series if every peer had
/// them), a scrape stays small and lint-clean, 48 clients looping on
/// `/metrics` share one render per second, slow readers that hold their
/// bodies do not grow memory, and the JSON stats name the busiest peers.
#[test]
fn a_large_peer_table_keeps_metrics_bounded() {
    let test = "a_large_peer_table_keeps_metrics_bounded";
    if !can_run_kernel_tests(test) || !have_tools(test, &[("promtool", "prometheus")]) {
        return;
    }
    const PEERS: u32 = 200_000;
    let topo = Topology::new();
    let dir = std::env::temp_dir().join(format!("tunfwd-bigtable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let peers_file = dir.join("peers");
    // The real peer (side b), then synthetic ones: 198.18.128.0/24 ports
    // 10000 up, one 2001:db8:N:M::/64 each. Nothing is ever sent to them.
    let mut text = format!("{UNDERLAY_B}:{PORT} {OVERLAY_B}/32,{OVERLAY6_B}/128\n");
    for i in 1..PEERS {
        text.push_str(&format!(
            "198.18.128.{}:{} 2001:db8:{:x}:{:x}::/64\n",
            i >> 10,
            10000 + (i & 1023),
            1 + (i >> 16),
            i & 0xffff
        ));
    }
    std::fs::write(&peers_file, text).unwrap();
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    let args: Vec<String> = [
        "tunnel",
        "--dev",
        "tun0",
        "--address",
        &format!("{OVERLAY_A}/24"),
        "--address",
        &format!("{OVERLAY6_A}/64"),
        "--listen",
        &format!("{UNDERLAY_A}:{PORT}"),
        "--peers-file",
        peers_file.to_str().unwrap(),
        "--metrics",
        METRICS,
        "--stats-format",
        "json",
        "--stats-interval",
        "1",
        "--stats-peers",
        "3",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut a = Proc::tunfwd(&topo.a, &args);
    let pid = a.child.id();
    assert!(topo.a.ping(OVERLAY_B));
    let to = format!("{OVERLAY_B}:7003").parse().unwrap();
    verified_tcp_transfer(&topo.a, &topo.b, to, 4 << 20);

    let first = scrape(&topo.a);
    let body = scrape_after(&topo.a, &first);
    promtool_check(&body);
    assert_eq!(sample(&body, "tunfwd_peers"), f64::from(PEERS));
    let peer_series: std::collections::HashSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("tunfwd_peer_bytes_total{peer=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(
        peer_series.len(),
        1000,
        "per-peer series for the 1,000 busiest"
    );
    let busiest =
        format!("tunfwd_peer_bytes_total{{peer=\"{UNDERLAY_B}:{PORT}\",direction=\"tx\"}}");
    assert!(sample(&body, &busiest) >= f64::from(4u32 << 20));
    assert!(body.len() < 1 << 20, "one body is {} bytes", body.len());

    // 48 clients looping for 3 s, and 16 that ask and never read.
    let rss_before = rss_kib(pid);
    let renders_before = sample(&body, "tunfwd_metrics_renders_total");
    let started = Instant::now();
    let to: SocketAddr = METRICS.parse().unwrap();
    let slow: Vec<_> = (0..16)
        .map(|_| {
            topo.a.spawn(move || {
                let mut s = TcpStream::connect(to).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
                s
            })
        })
        .collect();
    let slow: Vec<TcpStream> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    let loops: Vec<_> = (0..48)
        .map(|_| {
            topo.a.spawn(move || {
                let mut served = 0u32;
                while started.elapsed() < Duration::from_secs(3) {
                    let Ok(mut s) = TcpStream::connect(to) else {
                        continue;
                    };
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out);
                    if out.starts_with(b"HTTP/1.1 200") {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    let mut rss_peak = 0;
    while loops.iter().any(|h| !h.is_finished()) {
        rss_peak = rss_peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let served: u32 = loops.into_iter().map(|h| h.join().unwrap()).sum();
    let after = scrape(&topo.a);
    let renders = sample(&after, "tunfwd_metrics_renders_total") - renders_before;
    let secs = started.elapsed().as_secs_f64();
    drop(slow);
    eprintln!(
        "{served} scrapes served by {renders} renders in {secs:.1} s; RSS {rss_before} -> {rss_peak} KiB"
    );
    // At most one render per started second (and the final scrape's).
    assert!(
        renders <= secs.ceil() + 1.0,
        "{renders} renders in {secs:.1} s"
    );
    assert!(
        f64::from(served) > 4.0 * renders,
        "{served} scrapes, {renders} renders"
    );
    assert!(
        rss_peak < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_peak} KiB under scrapes"
    );

    // The JSON stats: the peers object counts the table and shows the
    // busiest three, side b first.
    a.terminate();
    let out = a.stdout();
    let summary: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|o| o["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let peers = &summary["peers"];
    assert_eq!(peers["count"], PEERS, "{peers}");
    assert_eq!(peers["prefixes"], PEERS + 1, "{peers}");
    let top = peers["top"].as_array().unwrap();
    assert_eq!(top.len(), 3, "{peers}");
    assert_eq!(top[0]["peer"], format!("{UNDERLAY_B}:{PORT}"), "{peers}");
    assert!(top[0]["tx_bytes"].as_u64().unwrap() >= 4 << 20, "{peers}");
    assert!(top[0]["last_rx_s_ago"].is_f64(), "{peers}");
    assert!(
        top[1]["last_rx_s_ago"].is_null(),
        "never heard from: {peers}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tunnel_runs_from_its_config_file_with_json_stats() {
    let test = "a_tunnel_runs_from_its_config_file_with_json_stats";
    if !can_run_kernel_tests(test) {
        return;
    }
    let topo = Topology::new();
    let dir = std::env::temp_dir().join(format!("tunfwd-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.toml");
    std::fs::write(
        &file,
        format!(
            "# side a\ndev = \"tun0\"\naddress = [\"{OVERLAY_A}/24\", \"{OVERLAY6_A}/64\"]\n\
             mtu = 1400\nlisten = \"{UNDERLAY_A}:{PORT}\"\npeer = [\"{UNDERLAY_B}:{PORT}\"]\n\
             stats-interval = 1\nstats-format = \"json\"\n"
        ),
    )
    .unwrap();
    let _b = Proc::tunfwd(&topo.b, &tunnel_args(false, &[]));
    // The command line beats the file: MTU 1300, not 1400.
    let args: Vec<String> = [
        "tunnel",
        "--config",
        file.to_str().unwrap(),
        "--mtu",
        "1300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a = Proc::tunfwd(&topo.a, &args);
    let link = String::from_utf8_lossy(&topo.a.ip(&["link", "show", "tun0"]).stdout).into_owned();
    assert!(link.contains("mtu 1300"), "{link}");
    assert!(topo.a.ping(OVERLAY_B));
    assert!(topo.a.ping(OVERLAY6_B));
    // Each stats line is one JSON object.
    a.wait_for_stdout("\"event\":\"stats\"");
    a.terminate();
    let out = a.stdout();
    let objects: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let summary = objects
        .iter()
        .find(|o| o["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary object in:\n{out}"));
    assert!(summary["total"]["tun_to_peer"]["packets"].as_u64().unwrap() >= 6);
    assert!(summary["kernel"]["tun_queue_drops"].is_u64(), "{summary}");
    let stats = objects.iter().find(|o| o["event"] == "stats").unwrap();
    for key in ["t", "rate_pps", "rate_mbps", "total", "kernel", "per_queue"] {
        assert!(!stats[key].is_null(), "stats object lacks {key}: {stats}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tunfwd systemd-unit` passes `systemd-analyze verify` and its exposure
/// (`systemd-analyze security --offline`) is at most 2.0; it runs tunfwd
/// with CAP_NET_ADMIN alone, and gives WireGuard mode its API directory.
#[test]
fn the_systemd_unit_verifies_and_is_least_privilege() {
    let test = "the_systemd_unit_verifies_and_is_least_privilege";
    if !have_tools(test, &[("systemd-analyze", "systemd")]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tunfwd-unit-{}", std::process::id()));
    let man1 = dir.join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let out = Command::new(tunfwd_bin())
        .args(["systemd-unit", "--exec", tunfwd_bin()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let unit = String::from_utf8(out.stdout).unwrap();
    for want in [
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
        "AmbientCapabilities=CAP_NET_ADMIN\n",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        "PrivateTmp=yes\n",
        "RestrictAddressFamilies=",
        "Restart=on-failure\n",
        "DynamicUser=yes\n",
        "RuntimeDirectory=wireguard\n",
        &format!(
            "ExecStart={} tunnel --config /etc/tunfwd/%i.toml\n",
            tunfwd_bin()
        ),
    ] {
        assert!(unit.contains(want), "unit lacks {want:?}");
    }
    let path = dir.join("tunfwd@ci.service");
    std::fs::write(&path, &unit).unwrap();
    // Its Documentation= names the man page: make it findable.
    assert!(
        Command::new(tunfwd_bin())
            .args(["man", "--out-dir"])
            .arg(&man1)
            .status()
            .unwrap()
            .success()
    );
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.join("man"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tunfwd@ci.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.0, "exposure {score} (want at most 2.0):\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_and_man_pages_come_from_the_flags() {
    let run = |args: &[&str]| {
        let o = Command::new(tunfwd_bin()).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("--peers-file") && bash.contains("--metrics"));
    let mut check = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(bash.as_bytes())
        .unwrap();
    assert!(
        check.wait().unwrap().success(),
        "bash -n on the completion script"
    );
    for shell in ["zsh", "fish"] {
        let s = run(&["completions", shell]);
        assert!(
            s.contains("peers-file") && s.contains("stats-format"),
            "{shell}"
        );
    }
    let page = run(&["man", "tunnel"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH tunfwd-tunnel 1"),
        "{page}"
    );
    for flag in [
        "\\-\\-metrics",
        "\\-\\-config",
        "\\-\\-peers\\-file",
        "\\-\\-stats\\-format",
    ] {
        assert!(page.contains(flag), "man tunnel lacks {flag}");
    }
    assert!(run(&["man"]).contains(".TH tunfwd 1"));
    let dir = std::env::temp_dir().join(format!("tunfwd-man-{}", std::process::id()));
    run(&["man", "--out-dir", dir.to_str().unwrap()]);
    for page in [
        "tunfwd.1",
        "tunfwd-tunnel.1",
        "tunfwd-reflect.1",
        "tunfwd-bench.1",
    ] {
        assert!(dir.join(page).exists(), "{page}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
