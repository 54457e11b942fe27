//! A fake TUN queue for tests and benchmarks that need no root: one end of
//! a `SOCK_SEQPACKET` socket pair. Like a TUN queue it keeps message
//! boundaries (one read, one packet; one write, one packet), is pollable and
//! works with io_uring's reads and writes; its small, settable queue makes
//! backpressure easy to provoke. The other end plays the kernel: what a test
//! writes there, the worker reads from its "device", and the other way.
//!
//! With offload the bytes are whatever the test writes: a virtio-net header
//! and a super-packet, exactly as a TUN device with `IFF_VNET_HDR` hands
//! them over, so both offload paths run without a device.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};

use crate::device::TunQueue;

/// A fake device: the queue a worker drives, and the kernel's end.
pub struct FakeTun {
    pub queue: TunQueue,
    /// The "kernel" end: blocking, for the test to write packets the worker
    /// reads and to read packets the worker writes.
    pub kernel: File,
}

impl FakeTun {
    /// A fake device whose worker end holds about `queue_bytes` of packets
    /// before a write from the worker meets `EAGAIN` (the kernel doubles
    /// the figure and adds overhead per packet).
    pub fn new(queue_bytes: usize) -> io::Result<FakeTun> {
        let (worker, kernel): (OwnedFd, OwnedFd) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        fcntl(&worker, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        setsockopt(&worker, sockopt::SndBuf, &queue_bytes)?;
        // Room for a 64 KiB super-packet each way.
        for end in [&worker, &kernel] {
            let _ = setsockopt(end, sockopt::RcvBuf, &(1 << 20));
        }
        Ok(FakeTun {
            queue: TunQueue::from(File::from(worker)),
            kernel: File::from(kernel),
        })
    }
}
