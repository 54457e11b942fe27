//! WireGuard: keys as `wg` writes them ([`key`]), the configuration
//! format `wg setconf` reads ([`conf`]), and a tunnel's keys, peers and
//! sessions ([`device`]). The protocol itself (the Noise_IKpsk2 handshake,
//! sessions, the replay window, cookies, timers) is boringtun's `noise`
//! module, with ring's ChaCha20-Poly1305: tunfwd implements no
//! cryptography. Keys are x25519-dalek's (pure Rust, so `genkey` and
//! `pubkey` build everywhere); the device needs the `wireguard` feature
//! (on by default), whose ring needs a C toolchain for the target.

pub mod conf;
#[cfg(feature = "wireguard")]
pub mod device;
#[cfg(not(feature = "wireguard"))]
#[path = "absent.rs"]
pub mod device;
pub mod key;
pub mod uapi;
pub mod wire;

pub use conf::{WgConf, WgPeer};
pub use device::{Device, PeerSet};
pub use key::{PublicKey, Secret};
