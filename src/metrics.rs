//! `--metrics ADDR:PORT`: every counter in the Prometheus text exposition
//! format (version 0.0.4) at `GET /metrics`.
//!
//! One thread serves it with `poll(2)` over nonblocking sockets; it reads
//! the workers' counters with relaxed loads (the workers never wait for
//! it). What a client can make it hold is bounded: at most
//! [`MAX_CONNECTIONS`] connections (more are answered 503 and closed at
//! once), at most [`MAX_REQUEST`] bytes of request head each (more: 431), a
//! whole request within [`REQUEST_TIMEOUT`] (else 408: a client sending one
//! byte a second is cut off), a response written within
//! [`RESPONSE_TIMEOUT`]. The body is rendered once per turn of the loop,
//! shared by the requests completed in that turn, so every scrape sees the
//! counters as of its arrival.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::{Error, Result};
use crate::report::Sources;
use crate::stats::{DURATION_BOUNDS_NS, DirectionSnapshot, DurationSnapshot, WorkerSnapshot};
use crate::types::DropReason;

/// Connections served at once; more are refused (503).
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes of request line and headers accepted.
pub const MAX_REQUEST: usize = 8192;
/// Time a client has to send its whole request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of rendered bodies the server may hold at once (the latest one
/// and older ones slow readers are still taking), counted as allocated: a
/// new body is rendered only if it fits beside them (its size taken as the
/// last one's); otherwise `/metrics` answers 503 until they drain or time
/// out. One body is bounded by the queues and [`METRICS_PEERS`].
pub const MAX_HELD_BYTES: usize = 32 << 20;
/// Requests within this time of a render share its body: the counters
/// cannot usefully move faster than a scrape, and a client looping on
/// `/metrics` costs one render per interval, not one per request.
pub const RENDER_INTERVAL: Duration = Duration::from_secs(1);
/// Peers with series of their own (the busiest by bytes; every peer still
/// counts in `tunfwd_peers`).
pub const METRICS_PEERS: usize = 1000;

/// `--metrics` as given: `PORT` (loopback) or `ADDR:PORT`.
pub fn parse_listen(s: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    crate::platform::parse_endpoint(s).map_err(|_| {
        format!("{s:?} is not PORT (on 127.0.0.1) or ADDR:PORT (e.g. 127.0.0.1:9500, [::1]:9500)")
    })
}

/// The metrics server's socket, bound (before privileges are dropped) and
/// not yet served.
pub struct Listener {
    sock: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> Result<Listener> {
        let sock = TcpListener::bind(addr).map_err(|e| {
            let in_use = e.raw_os_error() == Some(libc::EADDRINUSE);
            let err = Error::io(format!("bind metrics listener {addr}"), e);
            if in_use {
                err.with_hint("another process uses this port")
            } else {
                err
            }
        })?;
        sock.set_nonblocking(true)
            .map_err(|e| Error::io(format!("make metrics listener {addr} nonblocking"), e))?;
        let addr = sock.local_addr().unwrap_or(addr);
        Ok(Listener { sock, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `sources` on a thread of its own until `stop` is set.
    pub(crate) fn serve(
        self,
        sources: Arc<Sources>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tunfwd-metrics".into())
            .spawn(move || Server::new(self.sock, sources).run(&stop))
            .map_err(|e| Error::io("spawn metrics thread", e))
    }
}

enum State {
    Reading(Vec<u8>),
    Writing {
        head: Vec<u8>,
        body: Arc<Vec<u8>>,
        sent: usize,
    },
}

struct Client {
    sock: TcpStream,
    state: State,
    deadline: Instant,
}

struct Server {
    listener: TcpListener,
    clients: Vec<Client>,
    sources: Arc<Sources>,
    /// The latest body and when it was rendered.
    body: Option<(Instant, Arc<Vec<u8>>)>,
    /// Bodies rendered so far (reported as `tunfwd_metrics_renders_total`).
    renders: u64,
}

/// Bytes allocated for the distinct bodies `clients` are still writing,
/// and `extra` (the server's latest body) if no client holds it.
fn held_bytes(clients: &[Client], extra: Option<&Arc<Vec<u8>>>) -> usize {
    let mut seen: Vec<*const Vec<u8>> = Vec::new();
    let mut total = 0;
    let bodies = clients.iter().filter_map(|c| match &c.state {
        State::Writing { body, .. } => Some(body),
        State::Reading(_) => None,
    });
    for body in bodies.chain(extra) {
        let p = Arc::as_ptr(body);
        if !seen.contains(&p) {
            seen.push(p);
            total += body.capacity();
        }
    }
    total
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Metrics { head_only: bool },
    Index { head_only: bool },
    Status(u16, &'static str),
}

/// The answer to a complete request head (request line first; headers
/// are not needed).
fn route(head: &[u8]) -> Reply {
    let Ok(text) = std::str::from_utf8(head) else {
        return Reply::Status(400, "Bad Request");
    };
    let line = text.split(['\r', '\n']).next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Reply::Status(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Reply::Status(400, "Bad Request");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Reply::Status(405, "Method Not Allowed");
        }
        _ => return Reply::Status(400, "Bad Request"),
    };
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Reply::Metrics { head_only },
        "/" => Reply::Index { head_only },
        _ => Reply::Status(404, "Not Found"),
    }
}

/// The end of a request head: a blank line.
fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

fn response_head(status: u16, reason: &str, content_type: &str, len: usize) -> Vec<u8> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n{allow}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

fn status_reply(status: u16, reason: &str) -> (Vec<u8>, Arc<Vec<u8>>) {
    let body = format!("{status} {reason}\n").into_bytes();
    (
        response_head(status, reason, "text/plain; charset=utf-8", body.len()),
        Arc::new(body),
    )
}

impl Server {
    fn new(listener: TcpListener, sources: Arc<Sources>) -> Server {
        Server {
            listener,
            clients: Vec::new(),
            sources,
            body: None,
            renders: 0,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut fds = Vec::with_capacity(self.clients.len() + 1);
            fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            for c in &self.clients {
                let ev = match c.state {
                    State::Reading(_) => PollFlags::POLLIN,
                    State::Writing { .. } => PollFlags::POLLOUT,
                };
                fds.push(PollFd::new(c.sock.as_fd(), ev));
            }
            // Wake for the nearest deadline, and at least every 100 ms to
            // see `stop`.
            let wait = self
                .clients
                .iter()
                .map(|c| c.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::MAX)
                .min(Duration::from_millis(100));
            let timeout =
                PollTimeout::try_from(wait.as_millis() as u64 + 1).unwrap_or(PollTimeout::NONE);
            let ready: Vec<bool> = match poll(&mut fds, timeout) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(_) => vec![false; fds.len()],
            };
            drop(fds);
            if ready[0] {
                self.accept();
            }
            let now = Instant::now();
            let mut keep = Vec::with_capacity(self.clients.len());
            for (i, mut c) in std::mem::take(&mut self.clients).into_iter().enumerate() {
                let woke = ready.get(i + 1).copied().unwrap_or(false);
                if self.step(&mut c, woke, now) {
                    keep.push(c);
                }
            }
            keep.append(&mut self.clients);
            self.clients = keep;
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    if self.clients.len() >= MAX_CONNECTIONS {
                        // Best effort: a nonblocking write of a short 503,
                        // then close.
                        let (head, body) = status_reply(503, "Service Unavailable");
                        let _ = sock.set_nonblocking(true);
                        let mut s = sock;
                        let _ = s.write_all(&[head.as_slice(), body.as_slice()].concat());
                        continue;
                    }
                    if sock.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.clients.push(Client {
                        sock,
                        state: State::Reading(Vec::new()),
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                    });
                }
                Err(_) => return,
            }
        }
    }

    /// Moves one connection on; false when it is done (closed).
    fn step(&mut self, c: &mut Client, woke: bool, now: Instant) -> bool {
        match &mut c.state {
            State::Reading(buf) => {
                if woke {
                    let mut chunk = [0u8; 4096];
                    loop {
                        let room = MAX_REQUEST - buf.len();
                        if room == 0 {
                            break;
                        }
                        match c.sock.read(&mut chunk[..room.min(4096)]) {
                            Ok(0) => return false,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => return false,
                        }
                    }
                }
                let (head, body) = if head_complete(buf) {
                    let r = route(buf);
                    self.reply(r, now)
                } else if buf.len() >= MAX_REQUEST {
                    status_reply(431, "Request Header Fields Too Large")
                } else if now >= c.deadline {
                    status_reply(408, "Request Timeout")
                } else {
                    return true;
                };
                c.state = State::Writing {
                    head,
                    body,
                    sent: 0,
                };
                c.deadline = now + RESPONSE_TIMEOUT;
                // Try at once: most responses fit the socket buffer.
                self.write(c)
            }
            State::Writing { .. } => {
                if now >= c.deadline {
                    return false;
                }
                if woke { self.write(c) } else { true }
            }
        }
    }

    /// Writes what the socket takes; false when done or failed.
    fn write(&self, c: &mut Client) -> bool {
        let State::Writing { head, body, sent } = &mut c.state else {
            return false;
        };
        loop {
            let total = head.len() + body.len();
            if *sent >= total {
                // Done: close (Connection: close).
                let _ = c.sock.shutdown(std::net::Shutdown::Write);
                return false;
            }
            let part = if *sent < head.len() {
                &head[*sent..]
            } else {
                &body[*sent - head.len()..]
            };
            match c.sock.write(part) {
                Ok(0) => return false,
                Ok(n) => *sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    fn reply(&mut self, r: Reply, now: Instant) -> (Vec<u8>, Arc<Vec<u8>>) {
        match r {
            Reply::Metrics { head_only } => {
                let Some(body) = self.body(now) else {
                    return status_reply(503, "Service Unavailable");
                };
                let head = response_head(
                    200,
                    "OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.len(),
                );
                (
                    head,
                    if head_only {
                        Arc::new(Vec::new())
                    } else {
                        body
                    },
                )
            }
            Reply::Index { head_only } => {
                let body = b"tunfwd: metrics at /metrics\n".to_vec();
                let head = response_head(200, "OK", "text/plain; charset=utf-8", body.len());
                (head, Arc::new(if head_only { Vec::new() } else { body }))
            }
            Reply::Status(code, reason) => status_reply(code, reason),
        }
    }

    /// The metrics: the latest body if rendered within
    /// [`RENDER_INTERVAL`], else a new one if it fits in
    /// [`MAX_HELD_BYTES`] beside the bodies still held, else None.
    fn body(&mut self, now: Instant) -> Option<Arc<Vec<u8>>> {
        if let Some((at, body)) = &self.body {
            if now.saturating_duration_since(*at) < RENDER_INTERVAL {
                return Some(body.clone());
            }
        }
        let latest = self.body.as_ref().map(|(_, b)| b);
        // The next body is about as large as the last one.
        let expected = latest.map_or(0, |b| b.capacity());
        // The latest body stays held only if a client still writes it.
        if held_bytes(&self.clients, None) + expected > MAX_HELD_BYTES {
            return None;
        }
        self.body = None;
        self.renders += 1;
        let mut bytes = render(&self.sources, self.renders).into_bytes();
        bytes.shrink_to_fit();
        let body = Arc::new(bytes);
        self.body = Some((now, body.clone()));
        Some(body)
    }
}

/// A Prometheus text exposition writer: each family's HELP and TYPE once,
/// then its samples.
struct Out {
    s: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(self.s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        self.s.push_str(name);
        if !labels.is_empty() {
            self.s.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.s.push(',');
                }
                let _ = write!(self.s, "{k}=\"{}\"", escape(v));
            }
            self.s.push('}');
        }
        let _ = writeln!(self.s, " {value}");
    }

    /// A histogram of durations in seconds.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], d: &DurationSnapshot) {
        let mut cum = 0;
        let bucket = format!("{name}_bucket");
        for (i, bound) in DURATION_BOUNDS_NS.iter().enumerate() {
            cum += d.buckets[i];
            let le = format!("{}", *bound as f64 / 1e9);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cum);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, d.count);
        self.sample(&format!("{name}_sum"), labels, d.total_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, d.count);
    }
}

/// A label value with backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const DIRECTIONS: [&str; 2] = ["tun_to_peer", "peer_to_tun"];

fn directions(s: &WorkerSnapshot) -> [&DirectionSnapshot; 2] {
    [&s.tun_to_peer, &s.peer_to_tun]
}

/// Everything tunfwd counts, per worker (queue), per direction, per drop
/// reason, and per peer where the tunnel has peers with prefixes.
/// `renders`: this render's number (from 1), reported so that a client can
/// see how often the server rendered.
pub(crate) fn render(src: &Sources, renders: u64) -> String {
    let snaps = src.snapshots();
    let mut o = Out {
        s: String::with_capacity(64 << 10),
    };
    let queues: Vec<String> = (0..snaps.len()).map(|q| q.to_string()).collect();

    o.family(
        "tunfwd_build_info",
        "gauge",
        "tunfwd's version and the engine its workers run (always 1).",
    );
    o.sample(
        "tunfwd_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("engine", src.engine),
            ("device", &src.dev),
        ],
        1,
    );
    o.family(
        "tunfwd_start_time_seconds",
        "gauge",
        "When the tunnel came up, in seconds since the Unix epoch.",
    );
    let up = std::time::SystemTime::now()
        .checked_sub(src.started.elapsed())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    o.sample("tunfwd_start_time_seconds", &[], format!("{up:.3}"));
    o.family(
        "tunfwd_metrics_renders_total",
        "counter",
        "Times this server rendered the metrics (at most once per second; requests in between share a body).",
    );
    o.sample("tunfwd_metrics_renders_total", &[], renders);

    for f in DirectionSnapshot::FIELDS {
        o.family(f.metric, f.kind, f.help);
        for (q, s) in snaps.iter().enumerate() {
            for (dir, d) in DIRECTIONS.iter().zip(directions(s)) {
                o.sample(
                    f.metric,
                    &[("queue", &queues[q]), ("direction", dir)],
                    (f.get)(d),
                );
            }
        }
    }
    o.family(
        "tunfwd_drops_total",
        "counter",
        "Packets tunfwd dropped, by reason (each drop counts under exactly one).",
    );
    for (q, s) in snaps.iter().enumerate() {
        for (dir, d) in DIRECTIONS.iter().zip(directions(s)) {
            for r in DropReason::ALL {
                o.sample(
                    "tunfwd_drops_total",
                    &[
                        ("queue", &queues[q]),
                        ("direction", dir),
                        ("reason", r.name()),
                    ],
                    d.drops_for(r),
                );
            }
        }
    }
    for f in WorkerSnapshot::FIELDS {
        o.family(f.metric, f.kind, f.help);
        for (q, s) in snaps.iter().enumerate() {
            o.sample(f.metric, &[("queue", &queues[q])], (f.get)(s));
        }
    }
    for (name, help, pick) in [
        (
            "tunfwd_visit_seconds",
            "How long one visit of a worker to one direction took (wall time), while the other waited.",
            (|d: &DirectionSnapshot| d.visits) as fn(&DirectionSnapshot) -> DurationSnapshot,
        ),
        (
            "tunfwd_queue_delay_seconds",
            "How long packets waited in a side's queue (flow queues, or the UDP receive buffer) before they were handled.",
            |d: &DirectionSnapshot| d.queue_delay,
        ),
    ] {
        o.family(name, "histogram", help);
        for (q, s) in snaps.iter().enumerate() {
            for (dir, d) in DIRECTIONS.iter().zip(directions(s)) {
                o.histogram(name, &[("queue", &queues[q]), ("direction", dir)], &pick(d));
            }
        }
    }
    let kd = src.kernel_drops();
    for (name, help, v) in [
        (
            "tunfwd_kernel_udp_rcvbuf_drops_total",
            "Datagrams the kernel dropped at tunfwd's full UDP receive buffers since start.",
            kd.udp_rcvbuf,
        ),
        (
            "tunfwd_kernel_tun_queue_drops_total",
            "Packets the kernel dropped at the TUN device's full queue since start.",
            kd.tun_queue,
        ),
    ] {
        if let Some(v) = v {
            o.family(name, "counter", help);
            o.sample(name, &[], v);
        }
    }
    render_peers(src, &mut o);
    o.s
}

fn render_peers(src: &Sources, o: &mut Out) {
    let (_, table) = src.peers.load();
    o.family(
        "tunfwd_peers",
        "gauge",
        "Peers in the table in use (1 for a point-to-point tunnel).",
    );
    o.sample("tunfwd_peers", &[], table.len());
    o.family(
        "tunfwd_peer_prefixes",
        "gauge",
        "Inner prefixes in the peer table in use.",
    );
    o.sample("tunfwd_peer_prefixes", &[], table.prefixes());
    if table.is_single() {
        return;
    }
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let snaps: Vec<(String, crate::peers::PeerSnapshot)> = table.top(METRICS_PEERS, now_ns);
    type PeerField = fn(&crate::peers::PeerSnapshot) -> u64;
    let per_peer: [(&str, &str, PeerField, PeerField); 2] = [
        (
            "tunfwd_peer_packets_total",
            "Packets per peer: handed to the socket for it (tx), accepted from it (rx).",
            |s| s.tx_packets,
            |s| s.rx_packets,
        ),
        (
            "tunfwd_peer_bytes_total",
            "Bytes per peer, as tunfwd_peer_packets_total.",
            |s| s.tx_bytes,
            |s| s.rx_bytes,
        ),
    ];
    for (name, help, tx, rx) in per_peer {
        o.family(name, "counter", help);
        for (peer, s) in &snaps {
            o.sample(name, &[("peer", peer), ("direction", "tx")], tx(s));
            o.sample(name, &[("peer", peer), ("direction", "rx")], rx(s));
        }
    }
    o.family(
        "tunfwd_peer_drops_total",
        "counter",
        "Packets from or for a peer that tunfwd dropped, by reason (reasons that counted).",
    );
    for (peer, s) in &snaps {
        for (r, n) in crate::stats::nonzero_drops(&s.drops) {
            o.sample(
                "tunfwd_peer_drops_total",
                &[("peer", peer), ("reason", r.name())],
                n,
            );
        }
    }
    o.family(
        "tunfwd_peer_last_receive_timestamp_seconds",
        "gauge",
        "When a datagram from the peer was last taken, in seconds since the Unix epoch (peers heard from).",
    );
    for (peer, s) in &snaps {
        if s.last_rx_ns > 0 {
            o.sample(
                "tunfwd_peer_last_receive_timestamp_seconds",
                &[("peer", peer)],
                format!("{:.3}", s.last_rx_ns as f64 / 1e9),
            );
        }
    }
    // WireGuard: each peer's endpoint and latest handshake.
    let sessions: Vec<_> = snaps
        .iter()
        .filter_map(|(peer, s)| Some((peer, s.session?)))
        .collect();
    if !sessions.is_empty() {
        o.family(
            "tunfwd_peer_endpoint_info",
            "gauge",
            "A WireGuard peer's current endpoint (its latest authenticated datagram's source), as a label; 1.",
        );
        for (peer, s) in &sessions {
            if let Some(e) = s.endpoint {
                o.sample(
                    "tunfwd_peer_endpoint_info",
                    &[("peer", peer), ("endpoint", &e.to_string())],
                    1,
                );
            }
        }
        o.family(
            "tunfwd_peer_last_handshake_timestamp_seconds",
            "gauge",
            "When a WireGuard peer's latest handshake completed, in seconds since the Unix epoch (peers with one).",
        );
        for (peer, s) in &sessions {
            if s.handshake_ns > 0 {
                o.sample(
                    "tunfwd_peer_last_handshake_timestamp_seconds",
                    &[("peer", peer)],
                    format!("{:.3}", s.handshake_ns as f64 / 1e9),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_requests() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Reply::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Reply::Metrics { head_only: true }
        );
        assert_eq!(
            route(b"GET / HTTP/1.1\n\n"),
            Reply::Index { head_only: false }
        );
        assert_eq!(
            route(b"GET /x HTTP/1.1\r\n\r\n"),
            Reply::Status(404, "Not Found")
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Reply::Status(405, "Method Not Allowed")
        );
        for bad in [
            &b"\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics SMTP/1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(route(bad), Reply::Status(400, "Bad Request"), "{bad:?}");
        }
        assert!(head_complete(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }

    #[test]
    fn held_bodies_are_counted_once_each() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let client = |state| Client {
            sock: TcpStream::connect(addr).unwrap(),
            state,
            deadline: Instant::now(),
        };
        let big = Arc::new(vec![0u8; 1000]);
        let small = Arc::new(vec![0u8; 10]);
        let writing = |body: &Arc<Vec<u8>>| State::Writing {
            head: Vec::new(),
            body: body.clone(),
            sent: 0,
        };
        let clients = vec![
            client(writing(&big)),
            client(writing(&big)),
            client(writing(&small)),
            client(State::Reading(vec![0; 500])),
        ];
        assert_eq!(held_bytes(&clients, None), 1010);
        assert_eq!(held_bytes(&clients, Some(&big)), 1010);
        let other = Arc::new(Vec::with_capacity(4000));
        assert_eq!(held_bytes(&clients, Some(&other)), 5010);
    }

    fn test_server() -> Server {
        let peers = Arc::new(crate::peers::SharedPeers::new(Arc::new(
            crate::peers::PeerTable::single("198.18.0.2:5000".parse().unwrap(), false),
        )));
        let workers = vec![Arc::new(crate::stats::WorkerStats::default())];
        let kernel = crate::report::KernelBase::read(&[], "tfw-no-such-dev");
        let sources = Arc::new(Sources::new(workers, peers, "tfw0", "poll", kernel));
        Server::new(TcpListener::bind("127.0.0.1:0").unwrap(), sources)
    }

    /// Requests within RENDER_INTERVAL share one body; a later one gets a
    /// new render.
    #[test]
    fn requests_share_a_render_per_interval() {
        let mut s = test_server();
        let t0 = Instant::now();
        let a = s.body(t0).unwrap();
        let b = s.body(t0 + RENDER_INTERVAL / 2).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(s.renders, 1);
        let c = s.body(t0 + RENDER_INTERVAL).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(s.renders, 2);
        let text = String::from_utf8_lossy(&c);
        assert!(
            text.contains("\ntunfwd_metrics_renders_total 2\n"),
            "{text}"
        );
        assert_eq!(c.capacity(), c.len(), "a held body is counted as allocated");
    }

    /// Bodies held by slow readers: a new render that would not fit beside
    /// them is refused (503) until they go; the latest one is still served
    /// within its interval.
    #[test]
    fn a_render_that_would_not_fit_is_refused() {
        let mut s = test_server();
        let addr = s.listener.local_addr().unwrap();
        let t0 = Instant::now();
        let first = s.body(t0).unwrap();
        let hog = Arc::new(vec![0u8; MAX_HELD_BYTES - first.capacity() + 1]);
        s.clients.push(Client {
            sock: TcpStream::connect(addr).unwrap(),
            state: State::Writing {
                head: Vec::new(),
                body: hog,
                sent: 0,
            },
            deadline: t0 + RESPONSE_TIMEOUT,
        });
        assert!(s.body(t0).is_some(), "the latest body is still shared");
        let later = t0 + RENDER_INTERVAL;
        assert!(s.body(later).is_none());
        let (head, _) = s.reply(Reply::Metrics { head_only: false }, later);
        assert!(head.starts_with(b"HTTP/1.1 503 "));
        assert_eq!(s.renders, 1);
        s.clients.clear();
        assert!(s.body(later).is_some());
        assert_eq!(s.renders, 2);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("9500").unwrap(),
            "127.0.0.1:9500".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:9500").unwrap(),
            "[::1]:9500".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:9500").unwrap(),
            "0.0.0.0:9500".parse().unwrap()
        );
        assert!(parse_listen("localhost:9500").is_err());
        assert!(parse_listen("70000").is_err());
    }

    /// Every declared counter (per direction and per worker) appears in
    /// the text stats, the JSON stats and the Prometheus output, with the
    /// value it has.
    #[test]
    fn every_declared_counter_is_reported_everywhere() {
        use crate::peers::{PeerTable, SharedPeers};
        use crate::stats::{Cell, WorkerStats};
        let w = Arc::new(WorkerStats::default());
        // Distinct values: a report that printed the wrong counter fails.
        let mut n = 100;
        let mut next = || {
            n += 1;
            n
        };
        w.syscalls.add(next());
        w.waits.add(next());
        w.wake_lowered.add(next());
        w.spin_looks.add(next());
        w.io_errors.add(next());
        w.peer_unreachable.add(next());
        w.pool_exhausted.add(next());
        w.gso_sends.add(next());
        w.gso_segments.add(next());
        w.gro_receives.add(next());
        w.gro_datagrams.add(next());
        w.vnet_writes.add(next());
        w.vnet_write_packets.add(next());
        w.aqm_marks.add(next());
        w.wg_handshake_messages.add(next());
        w.wg_outer_ce.add(next());
        w.wg_keepalives.add(next());
        w.wg_waiting.add(next());
        w.wg_cookie_replies.add(next());
        w.wg_control_sent.add(next());
        for d in [&w.tun_to_peer, &w.peer_to_tun] {
            d.packets.add(next());
            d.bytes.add(next());
            d.backpressure.add(next());
            d.queue_max.record(next());
            d.queued.set(next());
            d.in_flight_buffers.set(next());
            d.in_flight_bytes.set(next());
        }
        let snap = w.snapshot();
        // Every declared counter was given a value above: none reads 0.
        for f in WorkerSnapshot::FIELDS {
            assert!((f.get)(&snap) > 100, "{} not set by this test", f.key);
        }
        for f in DirectionSnapshot::FIELDS {
            assert!(
                (f.get)(&snap.tun_to_peer) > 100,
                "{} not set by this test",
                f.key
            );
        }
        assert_eq!(<crate::stats::Max as Cell>::KIND, "gauge");

        let text = snap.to_string();
        let json = snap.to_json();
        let peers = Arc::new(SharedPeers::new(Arc::new(PeerTable::single(
            "198.18.0.2:5000".parse().unwrap(),
            false,
        ))));
        let kernel = crate::report::KernelBase::read(&[], "tfw-no-such-dev");
        let sources = Sources::new(vec![w.clone()], peers, "tfw0", "poll", kernel);
        let prom = render(&sources, 1);
        for f in WorkerSnapshot::FIELDS {
            let v = (f.get)(&snap);
            assert!(
                text.contains(&format!(" {}={v} ", f.key)),
                "{}: {text}",
                f.key
            );
            assert_eq!(json[f.key], v, "{}: {json}", f.key);
            assert!(
                prom.contains(&format!("# TYPE {} {}\n", f.metric, f.kind)),
                "{}",
                f.metric
            );
            assert!(
                prom.contains(&format!("{}{{queue=\"0\"}} {v}\n", f.metric)),
                "{}: {prom}",
                f.metric
            );
        }
        for (dir, d) in [
            ("tun_to_peer", &snap.tun_to_peer),
            ("peer_to_tun", &snap.peer_to_tun),
        ] {
            let part = match text.split_once("| peer_to_tun") {
                Some((tx, _)) if dir == "tun_to_peer" => tx.to_string(),
                Some((_, rx)) => rx.to_string(),
                None => panic!("{text}"),
            };
            for f in DirectionSnapshot::FIELDS {
                let v = (f.get)(d);
                assert!(
                    part.contains(&format!(" {}={v} ", f.key)),
                    "{dir} {}: {text}",
                    f.key
                );
                assert_eq!(json[dir][f.key], v, "{dir} {}: {json}", f.key);
                assert!(
                    prom.contains(&format!(
                        "{}{{queue=\"0\",direction=\"{dir}\"}} {v}\n",
                        f.metric
                    )),
                    "{dir} {}: {prom}",
                    f.metric
                );
            }
        }
    }

    #[test]
    fn labels_are_escaped_and_histograms_cumulative() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let d = crate::stats::Durations::default();
        for ns in [500, 1_500, 3_000_000_000] {
            d.record(ns);
        }
        let mut o = Out { s: String::new() };
        o.histogram("x_seconds", &[("q", "0")], &d.snapshot());
        assert!(
            o.s.contains("x_seconds_bucket{q=\"0\",le=\"0.000001\"} 1\n"),
            "{}",
            o.s
        );
        assert!(
            o.s.contains("x_seconds_bucket{q=\"0\",le=\"0.000002\"} 2\n"),
            "{}",
            o.s
        );
        assert!(
            o.s.contains("x_seconds_bucket{q=\"0\",le=\"1\"} 2\n"),
            "{}",
            o.s
        );
        assert!(
            o.s.contains("x_seconds_bucket{q=\"0\",le=\"+Inf\"} 3\n"),
            "{}",
            o.s
        );
        assert!(o.s.contains("x_seconds_count{q=\"0\"} 3\n"), "{}", o.s);
    }
}
