//! TUN devices: open and configure, one file per platform.
//!
//! A device is a name plus one nonblocking file per queue; reads and writes on
//! a queue file move exactly one raw IP packet (no packet-information header).
//! Configuration (MTU, addresses, txqueuelen, link up) is done from Rust with
//! ioctls: the product never runs `ip` or `ifconfig`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{TunDevice, TunOffloads, TunOptions, check_name, configure_link, interface_index};
