//! Many peers against the real kernel, both engines: one hub and three
//! spokes on one bridge. The hub's peers file gives each spoke its inner
//! addresses; the hub's kernel routes between spokes (packets come out of
//! its TUN device and go back in). Checked: spoke to spoke and spoke to hub
//! over IPv4 and IPv6 (pings and verified TCP); a spoke sending with another
//! spoke's inner source is dropped and counted; a reload (SIGHUP) that
//! removes one spoke and adds a fourth while a verified transfer between
//! two other spokes runs: the transfer arrives byte for byte, the removed
//! spoke is cut off, the new one works. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Starts spoke `s`'s forwarder: one peer (the hub) that owns the whole
/// overlay.
fn spoke_tunfwd(s: &Spoke, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "tunnel",
        "--dev",
        "tun0",
        "--address",
        &format!("{}/24", s.inner4()),
        "--address",
        &format!("{}/64", s.inner6()),
        "--listen",
        &format!("{}:{PORT}", s.underlay()),
        "--peer",
        &format!("{HUB_UNDERLAY}:{PORT}=198.19.0.0/24,2001:db8:19::/64"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    Proc::tunfwd(&s.ns, &args)
}

/// Writes the hub's peers file whole (a rename, so a reload never reads
/// half a file).
fn write_peers(path: &std::path::Path, spokes: &[&Spoke]) {
    let mut text = String::from("# tunfwd hub test: ADDR:PORT CIDR,...\n\n");
    for s in spokes {
        text.push_str(&s.peer_line());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The newest per-peer stats line of `p` that holds `tag`, once `ready`
/// accepts it (the hang guard of [`Proc::wait_until`]; start the process
/// with `--stats-interval`).
fn wait_for_line(p: &mut Proc, tag: &str, ready: impl Fn(&str) -> bool) -> String {
    p.wait_until(&format!("stats line for {tag} as wanted"), |p| {
        let out = p.stdout();
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with("tunfwd: stats peer=") && l.contains(tag))?;
        ready(line).then(|| line.to_string())
    })
}

#[test]
fn a_hub_routes_between_spokes_filters_sources_and_reloads_without_a_hiccup() {
    let test = "a_hub_routes_between_spokes_filters_sources_and_reloads_without_a_hiccup";
    if !can_run_kernel_tests(test) {
        return;
    }
    for engine in engines(test) {
        // io_uring with two queues and offload (where the kernel has it);
        // poll with one queue and no offload.
        let extra: &[&str] = if engine == "uring" {
            &["--engine", "uring", "--queues", "2"]
        } else {
            &["--engine", "poll", "--offload", "off"]
        };
        hub_and_spokes(engine, extra);
    }
}

fn hub_and_spokes(engine: &str, extra: &[&str]) {
    let hub = hub_namespace();
    let s1 = spoke(&hub, 1);
    let s2 = spoke(&hub, 2);
    let s3 = spoke(&hub, 3);
    let s4 = spoke(&hub, 4);
    let dir = std::env::temp_dir().join(format!("tunfwd-hub-{}-{engine}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let peers_file = dir.join("peers");
    write_peers(&peers_file, &[&s1, &s2, &s3]);

    let mut hub_args: Vec<String> = [
        "tunnel",
        "--dev",
        "tun0",
        "--address",
        "198.19.0.1/24",
        "--address",
        "2001:db8:19::1/64",
        "--listen",
        &format!("{HUB_UNDERLAY}:{PORT}"),
        "--peers-file",
        peers_file.to_str().unwrap(),
        "--stats-interval",
        "1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    hub_args.extend(extra.iter().map(|a| a.to_string()));
    let mut hubp = Proc::tunfwd(&hub, &hub_args);
    assert!(
        hubp.stderr().contains("3 peers by 6 prefixes"),
        "{engine}: the hub names its peers:\n{}",
        hubp.stderr()
    );
    let mut spokes: Vec<Proc> = [&s1, &s2, &s3, &s4]
        .iter()
        .map(|s| spoke_tunfwd(s, extra))
        .collect();

    // Spoke to spoke (through the hub's kernel) and spoke to hub, both
    // families.
    for (from, to) in [
        (&s1.ns, s2.inner4()),
        (&s1.ns, s2.inner6()),
        (&s3.ns, "198.19.0.1".to_string()),
        (&s2.ns, "2001:db8:19::1".to_string()),
    ] {
        assert!(from.ping(&to), "{engine}: ping {to} from {}", from.name);
    }
    let to2: SocketAddr = format!("{}:7001", s2.inner4()).parse().unwrap();
    verified_tcp_transfer(&s1.ns, &s2.ns, to2, 8 << 20);
    let hub6: SocketAddr = "[2001:db8:19::1]:7002".parse().unwrap();
    verified_tcp_transfer(&s2.ns, &hub, hub6, 8 << 20);
    let to1: SocketAddr = format!("[{}]:7003", s1.inner6()).parse().unwrap();
    verified_tcp_transfer(&s3.ns, &s1.ns, to1, 4 << 20);
    let hub4: SocketAddr = "198.19.0.1:7005".parse().unwrap();
    verified_tcp_transfer(&s1.ns, &hub, hub4, 4 << 20);

    // Spoke 3 sends with spoke 1's inner source: the hub drops every one
    // as source_not_allowed, counted for spoke 3.
    s3.ns
        .ip(&["addr", "add", &format!("{}/32", s1.inner4()), "dev", "tun0"]);
    let before = stat(
        &wait_for_line(&mut hubp, &s3.peer_tag(), |_| true),
        "peer=",
        "source_not_allowed",
    );
    assert!(
        !s3.ns.run_ok(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            &s1.inner4(),
            "198.19.0.1"
        ]),
        "{engine}: a ping with spoke 1's source from spoke 3 was answered"
    );
    // Exactly the three echo requests: once reached, a later stats line
    // (a second on) still says the same.
    let reached = wait_for_line(&mut hubp, &s3.peer_tag(), |l| {
        stat(l, "peer=", "source_not_allowed") >= before + 3
    });
    let later = wait_for_line(&mut hubp, &s3.peer_tag(), |l| l != reached);
    assert_eq!(
        stat(&later, "peer=", "source_not_allowed"),
        before + 3,
        "{engine}: {later}"
    );

    // A reload while spoke 1 sends to spoke 2: spoke 3 goes, spoke 4
    // comes.
    assert!(!s4.ns.run_ok(&["ping", "-c", "1", "-W", "1", "198.19.0.1"]));
    let progress = Arc::new(AtomicU64::new(0));
    let total: u64 = 48 << 20;
    let transfer = {
        let (a, b) = (Netns::existing(&s1.ns.name), Netns::existing(&s2.ns.name));
        let progress = progress.clone();
        let to = format!("{}:7004", s2.inner4()).parse().unwrap();
        // 16 MiB/s: three seconds, so the reload meets it running.
        std::thread::spawn(move || {
            verified_tcp_transfer_observed(&a, &b, to, total, Some(progress), Some(16 << 20))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.load(Ordering::Relaxed) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "{engine}: the transfer did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    write_peers(&peers_file, &[&s1, &s2, &s4]);
    let pid = nix::unistd::Pid::from_raw(hubp.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    hubp.wait_for_stderr("peers reloaded from");
    let at_reload = progress.load(Ordering::Relaxed);
    assert!(
        hubp.stderr()
            .contains("3 peers, 6 prefixes (1 added, 1 removed)"),
        "{engine}: {}",
        hubp.stderr()
    );
    assert!(s4.ns.ping("198.19.0.1"), "{engine}: the new spoke 4");
    assert!(
        s4.ns.ping("2001:db8:19::1"),
        "{engine}: the new spoke 4 (IPv6)"
    );
    assert!(s4.ns.ping(&s1.inner4()), "{engine}: spoke 4 to spoke 1");
    // The removed spoke 3: its two echo requests reach the hub as datagrams
    // from no peer, exactly two more not_from_peer (spoke 4's first ping,
    // before the reload, counted there too: hence the difference).
    let not_from_peer = |l: &str| direction_stat(l, "stats t=", "peer_to_tun", "not_from_peer");
    let before = not_from_peer(&hubp.wait_for_stats("a total", |_| true));
    assert!(
        !s3.ns
            .run_ok(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "198.19.0.1"]),
        "{engine}: the removed spoke 3 still reaches the hub"
    );
    let reached = hubp.wait_for_stats("spoke 3's two datagrams", |l| {
        not_from_peer(l) >= before + 2
    });
    let later = hubp.wait_for_stats("the next line", |l| l != reached);
    assert_eq!(not_from_peer(&later), before + 2, "{engine}: {later}");
    let moved = transfer.join().expect("transfer");
    assert_eq!(moved, total);
    assert!(
        at_reload < total,
        "{engine}: the transfer ended before the reload"
    );

    // A broken file is refused whole; the table in use stays.
    std::fs::write(&peers_file, "198.18.1.15:5000 198.19.0.15/32\nnot a peer\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    hubp.wait_for_stderr("peers reload refused, keeping the 3 peers in use");
    assert!(
        hubp.stderr().contains("line 2:"),
        "{engine}: the refusal names the line: {}",
        hubp.stderr()
    );
    assert!(
        s4.ns.ping("198.19.0.1"),
        "{engine}: spoke 4 after a refused reload"
    );

    // An overlay address no spoke owns: the hub's packets to it are
    // dropped as no_route (the kernel's own multicast, such as MLD reports,
    // may add a few).
    let before = stat(
        &hubp.wait_for_stats("a total", |_| true),
        "stats t=",
        "no_route",
    );
    assert!(!hub.run_ok(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "198.19.0.99"]));
    hubp.wait_for_stats("3 more no_route drops", |l| {
        stat(l, "stats t=", "no_route") >= before + 3
    });

    hubp.terminate();
    for p in &mut spokes {
        p.terminate();
    }
    let out = hubp.stdout();
    // Spokes 1 and 2 carried the transfer: the reload cost them nothing
    // (only CoDel may have dropped a segment to slow a sender).
    for s in [&s1, &s2] {
        let line = out
            .lines()
            .find(|l| l.starts_with("tunfwd: summary peer=") && l.contains(&s.peer_tag()))
            .unwrap_or_else(|| panic!("{engine}: no summary line for spoke {}:\n{out}", s.k));
        let drops = stat(line, "peer=", "drops");
        assert_eq!(drops, stat(line, "peer=", "aqm"), "{engine}: {line}");
        assert!(stat(line, "peer=", "rx_packets") > 1000, "{engine}: {line}");
        assert!(stat(line, "peer=", "tx_packets") > 1000, "{engine}: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
