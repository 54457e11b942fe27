//! Built-in traffic: a batched UDP flood, TCP bulk streams, and UDP
//! request/response latency probes. Senders run on threads inside namespace
//! a, receivers inside namespace b, so no external tool is needed.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, setsockopt, sockopt,
};

use super::topology::Topology;
use crate::error::{Context, Error, Result};

/// Datagrams per sendmmsg/recvmmsg call.
const MMSG_BATCH: usize = 64;
const FLOOD_PORT: u16 = 9000;
const TCP_PORT: u16 = 9100;
const ECHO_PORT: u16 = 9200;
/// IPv4 + UDP header bytes around a flood payload.
pub const UDP_OVERHEAD: usize = 28;

/// Result of a UDP flood.
#[derive(Clone, Copy, Debug)]
pub struct FloodResult {
    /// Datagrams the generator handed to the kernel.
    pub offered: u64,
    /// Datagrams the sink received.
    pub delivered: u64,
    pub seconds: f64,
}

/// Result of TCP bulk streams.
#[derive(Clone, Copy, Debug)]
pub struct TcpResult {
    /// Payload bytes the sinks received.
    pub bytes: u64,
    pub seconds: f64,
    /// The senders' `TCP_INFO` at the end, summed over streams (RTT and
    /// cwnd averaged).
    pub info: TcpStats,
}

/// What the senders' kernels said about their streams (`TCP_INFO`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TcpStats {
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Reordering events the sender detected.
    pub reord_seen: u64,
    /// Duplicate SACKs received (the receiver got a segment twice: a
    /// spurious retransmit).
    pub dsack_dups: u64,
    /// Smoothed RTT and congestion window at the end (mean over streams).
    pub rtt_us: f64,
    pub cwnd: f64,
    /// Time the sender was limited by the receive window, by its send
    /// buffer, and busy sending at all (microseconds, summed).
    pub rwnd_limited_us: u64,
    pub sndbuf_limited_us: u64,
    pub busy_us: u64,
    /// Streams that negotiated ECN, and the segments the senders saw
    /// acknowledged with the ECN-Echo flag (`tcpi_delivered_ce`): with
    /// classic ECN a receiver echoes one CE mark on every ACK until the
    /// sender reacts, so this counts more than the marks; it is 0 when no
    /// congestion signal came back as an echo.
    pub ecn_streams: u64,
    pub delivered_ce: u64,
}

/// `tcpi_options` bit: ECN was negotiated (`TCPI_OPT_ECN` in Linux's
/// `include/uapi/linux/tcp.h`; the libc crate defines it for Hurd only).
const TCPI_OPT_ECN: u8 = 8;

impl TcpStats {
    fn of(i: &libc::tcp_info) -> TcpStats {
        TcpStats {
            retransmits: u64::from(i.tcpi_total_retrans),
            reord_seen: u64::from(i.tcpi_reord_seen),
            dsack_dups: u64::from(i.tcpi_dsack_dups),
            rtt_us: f64::from(i.tcpi_rtt),
            cwnd: f64::from(i.tcpi_snd_cwnd),
            rwnd_limited_us: i.tcpi_rwnd_limited,
            sndbuf_limited_us: i.tcpi_sndbuf_limited,
            busy_us: i.tcpi_busy_time,
            ecn_streams: u64::from(i.tcpi_options & TCPI_OPT_ECN != 0),
            delivered_ce: u64::from(i.tcpi_delivered_ce),
        }
    }

    fn sum(all: &[TcpStats]) -> TcpStats {
        let n = all.len().max(1) as f64;
        TcpStats {
            retransmits: all.iter().map(|s| s.retransmits).sum(),
            reord_seen: all.iter().map(|s| s.reord_seen).sum(),
            dsack_dups: all.iter().map(|s| s.dsack_dups).sum(),
            rtt_us: all.iter().map(|s| s.rtt_us).sum::<f64>() / n,
            cwnd: all.iter().map(|s| s.cwnd).sum::<f64>() / n,
            rwnd_limited_us: all.iter().map(|s| s.rwnd_limited_us).sum(),
            sndbuf_limited_us: all.iter().map(|s| s.sndbuf_limited_us).sum(),
            busy_us: all.iter().map(|s| s.busy_us).sum(),
            ecn_streams: all.iter().map(|s| s.ecn_streams).sum(),
            delivered_ce: all.iter().map(|s| s.delivered_ce).sum(),
        }
    }
}

/// Result of latency probes: round-trip times in nanoseconds.
#[derive(Debug)]
pub struct LatencyResult {
    pub rtt_ns: Histogram<u64>,
    pub lost: u64,
}

fn join<T>(h: thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    h.join()
        .map_err(|_| Error::config(format!("{what} thread panicked")))?
}

/// Floods `dst` with IPv4/UDP packets of `packet_len` bytes (IP header
/// included) from namespace a for `duration`, counting what arrives in b.
/// `rate_pps` 0 means as fast as the generator goes.
pub fn udp_flood(
    topo: &Topology,
    dst: Ipv4Addr,
    packet_len: usize,
    duration: Duration,
    rate_pps: u64,
    stop: &Arc<AtomicBool>,
) -> Result<FloodResult> {
    let payload_len = packet_len.saturating_sub(UDP_OVERHEAD).max(1);
    let dst_addr = SocketAddr::from((dst, FLOOD_PORT));
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));

    let (ready_tx, ready_rx) = crossbeam::channel::bounded(1);
    let sink = {
        let done = done.clone();
        let received = received.clone();
        topo.b.spawn("bench-udp-sink", move || {
            let sock =
                UdpSocket::bind(dst_addr).context(|| format!("bind flood sink {dst_addr}"))?;
            // Root may exceed rmem_max: the sink must not be the bottleneck.
            let _ = setsockopt(&sock, sockopt::RcvBufForce, &(8 << 20));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .context(|| "set sink timeout")?;
            let _ = ready_tx.send(());
            let mut bufs = vec![[0u8; 2048]; MMSG_BATCH];
            let mut headers = MultiHeaders::<SockaddrIn>::preallocate(MMSG_BATCH, None);
            loop {
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(&mut b[..])])
                    .collect();
                match recvmmsg(
                    sock.as_raw_fd(),
                    &mut headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(msgs) => {
                        let n = msgs.count() as u64;
                        received.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) if done.load(Ordering::Relaxed) => return Ok(()),
                    Err(_) => {}
                }
            }
        })?
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::config("flood sink did not start"))?;

    let generator = {
        let stop = stop.clone();
        topo.a.spawn("bench-udp-gen", move || {
            let sock = UdpSocket::bind("0.0.0.0:0").context(|| "bind flood generator")?;
            sock.connect(dst_addr)
                .context(|| format!("connect flood generator to {dst_addr}"))?;
            let payload = vec![0xa5u8; payload_len];
            let iovs: Vec<[IoSlice<'_>; 1]> =
                (0..MMSG_BATCH).map(|_| [IoSlice::new(&payload)]).collect();
            let addrs: Vec<Option<SockaddrIn>> = vec![None; MMSG_BATCH];
            let mut headers = MultiHeaders::<SockaddrIn>::preallocate(MMSG_BATCH, None);
            let start = Instant::now();
            let mut offered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    break;
                }
                if rate_pps > 0 {
                    let due = (elapsed.as_secs_f64() * rate_pps as f64) as u64;
                    if offered >= due {
                        thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                }
                match sendmmsg(
                    sock.as_raw_fd(),
                    &mut headers,
                    &iovs,
                    &addrs,
                    [],
                    MsgFlags::empty(),
                ) {
                    Ok(sent) => offered += sent.count() as u64,
                    // ENOBUFS, ECONNREFUSED from an ICMP error: offered and lost.
                    Err(_) => offered += 1,
                }
            }
            Ok((offered, start.elapsed().as_secs_f64()))
        })?
    };
    let (offered, seconds) = join(generator, "flood generator")?;
    // Let packets in flight arrive, then stop the sink.
    thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    join(sink, "flood sink")?;
    Ok(FloodResult {
        offered,
        delivered: received.load(Ordering::Relaxed),
        seconds,
    })
}

/// `streams` TCP connections from a to `dst` in b, each writing as fast as it
/// can for `duration`.
pub fn tcp_bulk(
    topo: &Topology,
    dst: Ipv4Addr,
    streams: usize,
    duration: Duration,
    port_offset: u16,
    stop: &Arc<AtomicBool>,
) -> Result<TcpResult> {
    let addr = SocketAddr::from((dst, TCP_PORT + port_offset));
    let (ready_tx, ready_rx) = crossbeam::channel::bounded(1);
    let sink = topo.b.spawn("bench-tcp-sink", move || {
        let listener = TcpListener::bind(addr).context(|| format!("bind TCP sink {addr}"))?;
        let _ = ready_tx.send(());
        let mut readers = Vec::with_capacity(streams);
        for _ in 0..streams {
            let (mut s, _) = listener.accept().context(|| "accept TCP stream")?;
            readers.push(thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = vec![0u8; 1 << 17];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        Ok(readers
            .into_iter()
            .map(|r| r.join().unwrap_or(0))
            .sum::<u64>())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::config("TCP sink did not start"))?;

    let start = Instant::now();
    let mut senders = Vec::with_capacity(streams);
    for i in 0..streams {
        let stop = stop.clone();
        senders.push(topo.a.spawn(&format!("bench-tcp-{i}"), move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .context(|| format!("connect TCP stream to {addr}"))?;
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            let buf = vec![0x5au8; 1 << 16];
            while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
            use std::os::fd::AsFd;
            let info = crate::sys::tcp_info(s.as_fd())
                .context(|| format!("read TCP_INFO of the stream to {addr}"))?;
            Ok(TcpStats::of(&info))
        })?);
    }
    let mut stats = Vec::with_capacity(streams);
    for s in senders {
        stats.push(join(s, "TCP sender")?);
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes = join(sink, "TCP sink")?;
    Ok(TcpResult {
        bytes,
        seconds,
        info: TcpStats::sum(&stats),
    })
}

/// Closed-loop UDP ping-pong from a to `dst` for `duration`, at most
/// `max_probes` probes. With `echo_server`, an echo server in b answers;
/// without, something else does (a `tunfwd reflect` in a).
pub fn latency(
    topo: &Topology,
    dst: Ipv4Addr,
    duration: Duration,
    interval: Duration,
    max_probes: u64,
    echo_server: bool,
    stop: &Arc<AtomicBool>,
) -> Result<LatencyResult> {
    let addr = SocketAddr::from((dst, ECHO_PORT));
    let done = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = crossbeam::channel::bounded(1);
    if !echo_server {
        let _ = ready_tx.send(());
    }
    let echo = echo_server.then(|| {
        let done = done.clone();
        topo.b.spawn("bench-echo", move || {
            let sock = UdpSocket::bind(addr).context(|| format!("bind echo server {addr}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .context(|| "set echo timeout")?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            Ok(())
        })
    });
    let echo = echo.transpose()?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::config("echo server did not start"))?;

    let stop = stop.clone();
    let client = topo.a.spawn("bench-probe", move || {
        let sock = UdpSocket::bind("0.0.0.0:0").context(|| "bind probe socket")?;
        sock.connect(addr)
            .context(|| format!("connect probe socket to {addr}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .context(|| "set probe timeout")?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
            .map_err(|e| Error::config(format!("histogram: {e}")))?;
        let mut lost = 0u64;
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let mut seq = 0u64;
        let mut last_sent = start;
        while start.elapsed() < duration && seq < max_probes && !stop.load(Ordering::Relaxed) {
            seq += 1;
            if seq > 1 && !interval.is_zero() {
                // As ping -i: the next probe `interval` after the last one
                // was sent, or at once if its answer took longer.
                let next = last_sent + interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            let sent_at = Instant::now();
            last_sent = sent_at;
            if sock.send(&seq.to_le_bytes()).is_err() {
                lost += 1;
                continue;
            }
            loop {
                match sock.recv(&mut buf) {
                    Ok(8) if buf[..8] == seq.to_le_bytes() => {
                        let ns = sent_at.elapsed().as_nanos() as u64;
                        let _ = hist.record(ns.max(1));
                        break;
                    }
                    Ok(_) => continue, // a late reply to an earlier probe
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
        }
        Ok(LatencyResult { rtt_ns: hist, lost })
    })?;
    let result = join(client, "latency probe");
    done.store(true, Ordering::Relaxed);
    if let Some(echo) = echo {
        join(echo, "echo server")?;
    }
    result
}
