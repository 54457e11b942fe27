//! tunfwd: a userspace packet forwarder between a TUN device and a UDP peer.
//!
//! # Layers, top to bottom
//! - [`cli`] parses arguments into a [`config::TunnelConfig`].
//! - [`runtime`] opens the [`device`] and sockets, runs one worker thread per
//!   TUN queue, turns SIGINT/SIGTERM into a clean stop, and prints [`stats`].
//! - [`engine`] moves batches of packets between a TUN queue and a UDP socket;
//!   engines differ only in how they wait ([`engine::poll`]: `poll(2)`).
//! - [`forward`] decides per packet: to the TUN, to the peer, or drop with a
//!   reason. It does no I/O and is tested without root.
//! - [`packet`] holds checked views over IPv4/IPv6 bytes.
//! - [`device`] opens and configures TUN devices with ioctls (never `ip`).
//! - `sys` is the only module that calls libc directly; `unsafe` lives there
//!   (and in [`engine::uring`] on Linux).
//! - `platform` holds the other OS services (pinning, socket buffers, UDP
//!   GSO/GRO), one file per platform: Linux, and macOS where tunfwd runs the
//!   poll engine on a utun device.
//!
//! # Data path
//! kernel -> TUN queue -> `read` into a buffer -> [`forward::Forwarder::handle_from_tun`]
//! -> `sendto(peer)` from the same buffer. The reverse: `recvfrom` ->
//! [`forward::Forwarder::handle_from_peer`] (peer check, validation) -> TUN `write`.
//! One UDP datagram carries exactly one IP packet, nothing added.

/// One line on stderr with the `tunfwd: ` prefix; never panics.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "tunfwd: {}", format_args!($($arg)*));
    }};
}

#[cfg(target_os = "linux")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod device;
pub mod engine;
pub mod error;
pub mod forward;
pub mod fuzz;
#[cfg(target_os = "linux")]
pub mod netlink;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod packet;
mod platform;
pub mod reflect;
pub mod runtime;
pub mod stats;
mod sys;
