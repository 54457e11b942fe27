//! Runtime: sets up the device and sockets, runs one worker thread per TUN
//! queue, turns SIGINT/SIGTERM into a clean shutdown, and reports stats.
//!
//! Control flow uses crossbeam channels (signals, worker exits, the stats
//! tick); packets never cross threads.

use std::io::{self, Write};
use std::net::UdpSocket;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{EngineKind, TunnelConfig};
use crate::device::{TunDevice, TunOptions};
use crate::engine::Shutdown;
use crate::engine::poll::PollWorker;
use crate::error::{Error, Result};
use crate::forward::Forwarder;
use crate::stats::{WorkerSnapshot, WorkerStats};

/// The signals that stop tunfwd cleanly.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread, so every thread spawned
/// later inherits the mask and only the signal thread receives them. Call
/// first thing in `main`.
pub fn block_stop_signals() -> Result<()> {
    stop_signals()
        .thread_block()
        .map_err(|e| Error::io("block SIGINT/SIGTERM", e.into()))
}

enum Event {
    Signal(Signal),
    WorkerExited,
}

/// Writes one line to stdout, ignoring a closed stdout (never panics).
fn out(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "{line}");
}

/// Runs `tunfwd tunnel` until SIGINT/SIGTERM (Ok) or a worker fails (Err).
/// The summary is printed in both cases.
pub fn run_tunnel(cfg: &TunnelConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.exit_with_parent {
        // SIGTERM is blocked and taken by the signal thread: a clean stop.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .map_err(|e| Error::io("set parent-death signal", e.into()))?;
    }
    if let Some(path) = &cfg.netns {
        // Before any socket or device: everything below lives in it.
        crate::netns::NetNs::open(path)?.enter()?;
    }

    // Sockets first: a port in use fails before a device is created.
    let mut sockets = Vec::with_capacity(cfg.queues);
    for q in 0..cfg.queues {
        let addr = cfg.listen_for(q);
        let sock = UdpSocket::bind(addr).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => Some("another process uses this port"),
                Some(libc::EADDRNOTAVAIL) => Some("the address is not on this host"),
                _ => None,
            };
            let err = Error::io(format!("bind UDP socket {addr} for queue {q}"), e);
            match hint {
                Some(h) => err.with_hint(h),
                None => err,
            }
        })?;
        sock.set_nonblocking(true)
            .map_err(|e| Error::io(format!("make UDP socket {addr} nonblocking"), e))?;
        sockets.push(sock);
    }

    let device = TunDevice::open(&TunOptions {
        name: &cfg.dev,
        queues: cfg.queues,
        attach: cfg.attach,
    })?;
    let dev_name = device.name().to_string();
    let created = device.created();
    let txqueuelen = cfg.txqueuelen.or(if created {
        Some(crate::config::DEFAULT_TXQUEUELEN)
    } else {
        None
    });
    device.configure(cfg.mtu, &cfg.addresses, txqueuelen)?;
    let queues = device.into_queues();

    let shutdown = Arc::new(Shutdown::new()?);
    let (events_tx, events_rx) = channel::unbounded::<Event>();

    // The signal thread: the only one with SIGINT/SIGTERM deliverable (via
    // sigwait; the mask is blocked everywhere).
    {
        let tx = events_tx.clone();
        thread::Builder::new()
            .name("tunfwd-signals".into())
            .spawn(move || {
                let set = stop_signals();
                while let Ok(sig) = set.wait() {
                    if tx.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("spawn signal thread", e))?;
    }

    let mut all_stats = Vec::with_capacity(cfg.queues);
    let mut handles = Vec::with_capacity(cfg.queues);
    for (q, (tun, udp)) in queues.into_iter().zip(sockets).enumerate() {
        let stats = Arc::new(WorkerStats::default());
        all_stats.push(stats.clone());
        let worker = match cfg.engine {
            EngineKind::Poll => PollWorker {
                label: format!("TUN queue {q} of {dev_name}"),
                tun,
                udp,
                forwarder: Forwarder::new(cfg.mtu as usize, cfg.peer_for(q)),
                batch: cfg.batch,
                stats,
                shutdown: shutdown.clone(),
            },
        };
        let tx = events_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("tunfwd-q{q}"))
            .spawn(move || {
                let result = worker.run();
                let _ = tx.send(Event::WorkerExited);
                result
            })
            .map_err(|e| Error::io(format!("spawn worker thread for queue {q}"), e))?;
        handles.push(handle);
    }

    let started = Instant::now();
    crate::info!(
        "tunnel up: dev {dev_name} ({}), mtu {}, {} queue(s), engine {}, udp {} -> {}",
        if created { "created" } else { "attached" },
        cfg.mtu,
        cfg.queues,
        engine_name(cfg.engine),
        cfg.listen,
        cfg.peer
    );

    let ticker: Receiver<Instant> = if cfg.stats_interval_secs > 0 {
        channel::tick(Duration::from_secs(cfg.stats_interval_secs))
    } else {
        channel::never()
    };
    let mut last = WorkerSnapshot::default();
    let mut last_at = started;
    loop {
        channel::select! {
            recv(events_rx) -> ev => match ev {
                Ok(Event::Signal(sig)) => {
                    crate::info!("{} received, stopping", sig.as_str());
                    break;
                }
                Ok(Event::WorkerExited) | Err(_) => break,
            },
            recv(ticker) -> _ => {
                let now = Instant::now();
                let snaps: Vec<_> = all_stats.iter().map(|s| s.snapshot()).collect();
                let total = WorkerSnapshot::sum(&snaps);
                let secs = now.duration_since(last_at).as_secs_f64().max(1e-9);
                let pps = (total.packets() - last.packets()) as f64 / secs;
                let bytes = (total.tun_to_peer.bytes + total.peer_to_tun.bytes)
                    - (last.tun_to_peer.bytes + last.peer_to_tun.bytes);
                out(format_args!(
                    "tunfwd: stats t={:.1}s rate_pps={pps:.0} rate_mbps={:.1} total {total}",
                    now.duration_since(started).as_secs_f64(),
                    bytes as f64 * 8.0 / secs / 1e6,
                ));
                if snaps.len() > 1 {
                    for (q, s) in snaps.iter().enumerate() {
                        out(format_args!("tunfwd: stats queue={q} {s}"));
                    }
                }
                last = total;
                last_at = now;
            },
        }
    }

    shutdown.trigger();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Error::config("a worker thread panicked"));
            }
        }
    }

    let snaps: Vec<_> = all_stats.iter().map(|s| s.snapshot()).collect();
    let total = WorkerSnapshot::sum(&snaps);
    out(format_args!(
        "tunfwd: summary dev={dev_name} engine={} queues={} elapsed_s={:.2}",
        engine_name(cfg.engine),
        cfg.queues,
        started.elapsed().as_secs_f64()
    ));
    out(format_args!("tunfwd: summary total {total}"));
    if snaps.len() > 1 {
        for (q, s) in snaps.iter().enumerate() {
            out(format_args!("tunfwd: summary queue={q} {s}"));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn engine_name(e: EngineKind) -> &'static str {
    match e {
        EngineKind::Poll => "poll",
    }
}
