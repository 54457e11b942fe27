//! tunfwd: a userspace packet forwarder between a TUN device and a UDP peer.
//!
//! # Layers, top to bottom
//! - [`cli`] parses arguments into a [`config::TunnelConfig`]; its
//!   [`config::Mode`] says what moves (IP packets, Ethernet frames in VXLAN,
//!   or reflected packets).
//! - [`configfile`] turns `--config FILE` (TOML, keys are the long flag
//!   names) into arguments in front of the command line's, so clap checks
//!   everything once.
//! - [`runtime`] opens the [`device`] and sockets, starts one worker per TUN
//!   queue ([`engine::spawn_worker`]), turns SIGINT/SIGTERM into a clean
//!   stop and SIGHUP into a peers reload, and prints [`stats`] (text or
//!   JSON); [`metrics`] serves the same counters to Prometheus from a
//!   thread of its own.
//! - [`engine`] waits, submits and owns buffers: [`engine::poll`] with
//!   `poll(2)` (everywhere), `engine::uring` with io_uring (Linux). Engines
//!   make no forwarding decision and count nothing themselves.
//! - [`datapath`] is what both engines call, once per read or receive and
//!   once per I/O result: what a TUN read becomes (datagrams to send, cut by
//!   GSO size), what a UDP receive becomes (TUN writes, coalesced), what an
//!   error means, and every counter. No I/O; tested without root.
//! - [`fq`] is the queue management the datapath applies between a read (or
//!   receive) and its send (or TUN write) with `--aqm fq-codel`: per-flow
//!   queues over the engine's buffer numbers, deficit round robin with
//!   priority for sparse flows, CoDel per flow ([`aqm`]), overload drops.
//!   Pure, with the clock passed in.
//! - [`peers`] is the peer table: which peer an inner destination goes to
//!   (longest-prefix match, both families), which peer a datagram came
//!   from, and per-peer counters. Built once per (re)load and swapped
//!   whole; a single peer without prefixes is the point-to-point tunnel.
//! - [`forward`] decides per packet (verdicts per direction) and
//!   [`packet`] holds the checked views, checksums, and offload (split and
//!   coalesce): pure code over byte slices, unit-tested and fuzzed ([`fuzz`]).
//! - [`device`] opens and configures TUN/TAP devices with ioctls (never `ip`).
//! - `sys` and `platform` are the only modules that call the OS directly;
//!   `unsafe` lives there and in the io_uring engine.
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
