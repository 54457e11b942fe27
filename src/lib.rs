//! tunfwd: a userspace packet forwarder between a TUN device and a UDP peer.
//!
//! # Layers, top to bottom
//! Each layer imports only layers below it; `tests/layers.rs` fails the
//! build's test run on any import cycle between top-level modules.
//!
//! ```text
//! cli, configfile        flags and the TOML file -> a config::TunnelConfig
//! wg_quick               tunfwd-wg: wireguard-go's contract, for wg-quick
//! runtime                stages: sockets, device, workers, reporting
//!   uapi, wg             WireGuard's API socket (for wg), its control thread
//!   metrics, report      Prometheus; stats lines and summary (both read report::Sources)
//! engine::{poll,uring}   wait, submit, own buffers; no forwarding decision
//! datapath/              what every read, receive and I/O result means
//!   tx, rx, queues, visit    TUN side, UDP side, flow queues + overload, visits
//! fq, aqm                flow queues (DRR, sparse flows first) and CoDel
//! forward, encap, peers  policy per packet, ways of carrying it, the peer table
//! wg                     WireGuard: keys, files, the API protocol, sessions
//! config                 checked configuration (no I/O)
//! device, platform, sys  the OS: TUN devices, sockets, the few libc calls
//! packet, stats, types   bytes (views, checksums, offload), counters, plain types
//! ```
//!
//! - [`cli`] parses arguments into a [`config::TunnelConfig`]; its
//!   [`config::Mode`] says what moves (IP packets, Ethernet frames in VXLAN,
//!   or reflected packets). [`configfile`] turns `--config FILE` into
//!   arguments in front of the command line's, so clap checks everything
//!   once.
//! - [`runtime`] fits `--queues auto` to the host (one per CPU, fewer where
//!   the device or the locked-memory limit allow fewer), opens the sockets
//!   (by default one port for every queue; a plaintext tunnel's datagrams
//!   steered to the worker of their inner flow by [`packet::steer`]) and
//!   the [`device`], starts one worker per
//!   TUN queue ([`engine::spawn_worker`]), turns SIGINT/SIGTERM into a clean
//!   stop and SIGHUP into a peers reload, and reports through [`report`]
//!   (text or JSON); [`metrics`] serves the same sources to Prometheus.
//!   With WireGuard it serves the userspace API for `wg` (a change of
//!   peers is published with the peer table; a new listen port restarts
//!   the workers on new sockets); [`wg_quick`] runs it behind
//!   wireguard-go's command line for wg-quick.
//! - [`engine`] waits, submits and owns buffers: [`engine::poll`] with
//!   `poll(2)` (everywhere), `engine::uring` with io_uring (Linux). How a
//!   worker sleeps is decided once for both in [`engine::boost`]: the
//!   priority it sleeps at (`--wake-nice`) and how long it looks again
//!   before sleeping (`--spin`).
//! - [`datapath`] is what both engines call, once per read or receive and
//!   once per I/O result, with the time passed in: no I/O; tested without
//!   root.
//! - [`fq`] and [`aqm`]: the queue management the datapath applies between
//!   a read (or receive) and its send (or TUN write). Pure, clock passed in.
//! - [`forward`] decides per packet; [`encap`] is how a packet is carried
//!   (plain IP, VXLAN): header length, largest datagram, what is written in
//!   front and what is checked and stripped; [`peers`] routes by inner
//!   address and finds the sender. [`packet`] holds the checked views,
//!   checksums and offload (split and coalesce). All pure, unit-tested and
//!   fuzzed ([`fuzz`]).
//! - [`wg`] is WireGuard's state: keys as `wg` writes them, the `wg
//!   setconf` file format, the userspace API's requests ([`wg::uapi`]),
//!   and per peer boringtun's handshake and sessions (ring's
//!   ChaCha20-Poly1305) in a [`wg::PeerSet`] that changes whole; pure, the
//!   runtime's control thread sends its handshake answers and timer
//!   messages.
//! - [`stats`] declares every counter once; [`types`] holds addresses,
//!   prefixes, drop reasons. Neither imports anything above it.
//! - `sys` and `platform` are the only modules that call the OS directly;
//!   `unsafe` lives there and in the io_uring engine's files that say so.
//!
//! # How to add
//! - **A counter**: one line in a `counters!` table of [`stats`] (a key, its
//!   Prometheus family, help) and its increment where it happens; the text
//!   and JSON stats and `/metrics` follow.
//! - **A drop reason**: a variant of [`types::DropReason`] (its name and
//!   `ALL`), and the place that returns it.
//! - **An encapsulation**: a variant of [`encap::Encap`] with its cases in
//!   that file (header length, largest datagram, write, open, checks), and a
//!   [`config::Mode`] that selects it; the forwarder and the datapath ask
//!   the `Encap` and match on nothing.
//! - **An engine**: a module under [`engine`] that owns buffers and waits its
//!   own way, builds its [`datapath::Datapath`] from the
//!   [`datapath::Setup`] it is given and calls it as the datapath's module
//!   doc states ("The engine protocol"), and a case of [`engine::Engine`].
//!
//! # Data path
//! With `--aqm fq-codel` (the default in TUN mode) every read and receive
//! below is first queued by flow and handled when the queues hand it out
//! (`Datapath::tx_enqueue` / `tx_next`, `rx_enqueue` / `rx_next`); the
//! engines read promptly, so the kernel's FIFO queues only absorb bursts.
//!
//! Without offload: TUN `read` into a buffer (with headroom for the VXLAN
//! header in TAP mode) -> [`datapath::Datapath::handle_tun_read`] -> one
//! `sendmsg` from the same buffer. Back: `recvmsg` -> peer check and
//! validation -> one TUN `write` from the receive buffer. Two kernel copies
//! per direction (into and out of the process), none in tunfwd.
//!
//! With offload (default where the kernel has it): one TUN read returns up
//! to 64 KiB (a TSO/USO super-packet behind a virtio-net header); the
//! datapath writes each MTU-sized datagram's headers (lengths, sequence
//! numbers, checksums) into a small area and sends headers and payload
//! slices of the read buffer as one gather list with UDP GSO, up to 64
//! datagrams per `sendmsg`, in order: the payload is not copied, only read
//! once for its checksum. Back: one UDP GRO receive returns up to 64 KiB of
//! one flow's datagrams; each is validated, TCP segments have their
//! checksums verified, and consecutive segments become one super-packet
//! written with a virtio-net header as a gather write (`writev`): rewritten
//! headers from a small area, payloads where the receive put them, so no
//! copy in tunfwd in either direction. One UDP
//! datagram always carries exactly one IP packet, so a peer without offload
//! interoperates.

/// One line on stderr with the `tunfwd: ` prefix; never panics.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "tunfwd: {}", format_args!($($arg)*));
    }};
}

pub mod aqm;
#[cfg(target_os = "linux")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod configfile;
pub mod datapath;
pub mod device;
pub mod encap;
pub mod engine;
pub mod error;
pub mod forward;
pub mod fq;
pub mod fuzz;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod netlink;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod packet;
pub mod peers;
mod platform;
pub mod reflect;
pub mod report;
pub mod runtime;
pub mod stats;
mod sys;
pub mod types;
pub mod wg;
pub mod wg_quick;
