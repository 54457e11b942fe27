//! Built without the `wireguard` feature (boringtun and ring, which needs
//! a C toolchain for the target): no WireGuard device can exist, so
//! `--wg-config` is refused at start ([`Device::new`]) and every method
//! below is unreachable (the type has no values).

use std::net::SocketAddr;

use super::conf::WgConf;
use super::key::PublicKey;
pub use super::wire::*;
use crate::peers::PeerId;
use crate::types::DropReason;

/// A WireGuard device that cannot be made in this build.
#[derive(Debug)]
pub enum Device {}

/// Its peers, which cannot exist either.
#[derive(Debug)]
pub enum PeerSet {}

/// What `wg show` says of a peer besides its configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerFacts {
    pub endpoint: Option<SocketAddr>,
    pub since_handshake: Option<std::time::Duration>,
}

impl crate::peers::Attachment for PeerSet {
    fn as_any(self: std::sync::Arc<Self>) -> std::sync::Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn session(&self, _: PeerId, _: u64) -> Option<crate::peers::Session> {
        match *self {}
    }
}

impl PeerSet {
    pub fn peer_count(&self) -> usize {
        match *self {}
    }

    pub fn find(&self, _: &PublicKey) -> Option<PeerId> {
        match *self {}
    }

    pub fn facts(&self, _: PeerId) -> PeerFacts {
        match *self {}
    }

    pub fn seal(&self, _: PeerId, _: &[u8], _: &mut [u8]) -> Sealed {
        match *self {}
    }

    pub fn seal_segments(&self, _: PeerId, _: &[u8], _: usize, _: &mut [u8]) -> Sealed {
        match *self {}
    }

    pub fn open_batch(
        &self,
        _: SocketAddr,
        _: impl Iterator<Item = std::ops::Range<usize>>,
        _: &mut [u8],
        _: &mut [u8],
        _: impl FnMut(&mut [u8], std::ops::Range<usize>, Opened),
    ) {
        match *self {}
    }
}

impl Device {
    pub fn new(_: &WgConf) -> Result<Device, String> {
        Err("this tunfwd was built without the wireguard feature".into())
    }

    pub fn set_socket(&mut self, _: SocketAddr) {
        match *self {}
    }

    pub fn current(&self) -> std::sync::Arc<PeerSet> {
        match *self {}
    }

    pub fn apply(
        &self,
        _: &WgConf,
        _: impl Fn(&PublicKey) -> bool,
    ) -> Result<std::sync::Arc<PeerSet>, String> {
        match *self {}
    }

    pub fn peer_count(&self) -> usize {
        match *self {}
    }

    pub fn find(&self, _: &PublicKey) -> Option<PeerId> {
        match *self {}
    }

    pub fn seal(&self, _: PeerId, _: &[u8], _: &mut [u8]) -> Sealed {
        match *self {}
    }

    pub fn seal_segments(&self, _: PeerId, _: &[u8], _: usize, _: &mut [u8]) -> Sealed {
        match *self {}
    }

    pub fn open(&self, _: SocketAddr, _: &[u8], _: &mut [u8]) -> Opened {
        match *self {}
    }

    pub fn open_batch(
        &self,
        _: SocketAddr,
        _: impl Iterator<Item = std::ops::Range<usize>>,
        _: &mut [u8],
        _: &mut [u8],
        _: impl FnMut(&mut [u8], std::ops::Range<usize>, Opened),
    ) {
        match *self {}
    }

    pub fn handshakes(&self) -> &crossbeam::channel::Receiver<HandshakeMsg> {
        match *self {}
    }

    pub fn handle_handshake(
        &self,
        _: &HandshakeMsg,
        _: &mut [u8],
        _: impl FnMut(&[u8], SocketAddr),
    ) -> Option<DropReason> {
        match *self {}
    }

    pub fn tick(&self, _: &mut [u8], _: impl FnMut(&[u8], SocketAddr)) {
        match *self {}
    }
}
