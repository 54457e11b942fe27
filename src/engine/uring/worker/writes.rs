//! TUN writes, in order. Every write to the TUN device (a received
//! packet, a coalesced super-packet, a reflected answer) starts here, and
//! its completion ends here.
//!
//! A write that meets a full queue (`EAGAIN`; writes carry `RWF_NOWAIT`, so
//! io_uring does not wait inside the kernel, where a later write could
//! overtake a waiting one) waits, with every write after it, until the queue
//! has room: then they go out as one linked chain behind a
//! `POLL_ADD(POLLOUT)`, in their original order; if the chain breaks, what
//! it cancelled waits again. Nothing is dropped. From the first refusal on,
//! every TUN write of the worker goes out that way (a device that pushed
//! back once will again), so nothing overtakes a waiting write; before it,
//! writes are submitted directly, and only writes submitted together with
//! that first refused one could have passed it. A real TUN device does not
//! refuse writes (its socket send buffer is unlimited), so the direct path
//! is the one that runs.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use io_uring::types::{Fd, Fixed};
use io_uring::{opcode, squeue};
use nix::errno::Errno;

use super::super::ops::{CHAINED, Op, SINGLE_WRITE, user_data};
use super::super::pool::Owner;
use super::{TUN_SLOT, UringWorker};
use crate::datapath::{After, WriteInfo};
use crate::error::{Error, Result};

/// Where the bytes of one TUN write are.
#[derive(Clone, Copy)]
enum Source {
    /// One run of bytes: address and length.
    Flat(*const u8, usize),
    /// Coalesced: its iovecs (address and count).
    Gather(*const libc::iovec, usize),
}

/// The order of a worker's TUN writes; see the module docs.
pub(super) struct TunWrites {
    /// Writes carry RWF_NOWAIT: a full queue answers EAGAIN at once instead
    /// of io_uring waiting inside the kernel, where a later write could
    /// overtake a waiting one. Cleared (one log line) if the kernel
    /// refuses the flag for this device.
    nowait: bool,
    /// A write was refused once: every write now waits its turn in
    /// `stalled` and goes out in a chain.
    pushed_back: bool,
    /// (order, buffer, write index) of the writes waiting, oldest first.
    stalled: VecDeque<(u64, u16, u16)>,
    /// Writes started in this loop iteration, submitted directly at its end
    /// unless a refusal reaped in the same iteration made them wait.
    direct: Vec<(u64, u16, u16)>,
    /// Members of the retry chain still in flight (0: none).
    chain: usize,
    next_seq: u64,
}

impl TunWrites {
    pub(super) fn new(capacity: usize) -> TunWrites {
        TunWrites {
            nowait: true,
            pushed_back: false,
            stalled: VecDeque::new(),
            direct: Vec::with_capacity(capacity),
            chain: 0,
            next_seq: 0,
        }
    }

    /// Puts a write back in its place among the waiting ones.
    fn stall(&mut self, seq: u64, bid: u16, index: u16) {
        let at = self.stalled.partition_point(|&(s, _, _)| s < seq);
        self.stalled.insert(at, (seq, bid, index));
    }

    /// True if a new write must wait behind earlier ones.
    fn blocked(&self) -> bool {
        self.pushed_back || !self.stalled.is_empty() || self.chain > 0
    }
}

impl UringWorker {
    /// Where TUN write `index` of buffer `bid` takes its bytes from, what
    /// it carries, and its order.
    fn write_source(&self, bid: u16, index: u16) -> Option<(Source, WriteInfo, u64)> {
        if self.is_tun_buf(bid) {
            let slot = &self.tx[usize::from(bid)];
            let r = slot.reflect.clone()?;
            let (p, len) = self.pool.area(bid, r);
            return Some((Source::Flat(p, len), WriteInfo::plain(len), slot.seq));
        }
        let slot = &self.rx[usize::from(bid - self.per_group)];
        if index == SINGLE_WRITE {
            let r = slot.single.clone()?;
            let (p, len) = self.pool.area(bid, r);
            return Some((Source::Flat(p, len), WriteInfo::plain(len), slot.seq));
        }
        let w = slot.coalescer.writes().get(usize::from(index))?;
        let iov = slot.iov.get(w.pieces.clone())?;
        let seq = slot.seq + u64::from(index);
        let source = match iov {
            // A lone packet: one run of bytes in the coalescer's header area.
            [one] => Source::Flat(one.iov_base.cast_const().cast(), one.iov_len),
            _ => Source::Gather(iov.as_ptr(), iov.len()),
        };
        Some((source, WriteInfo::coalesced(w), seq))
    }

    /// Starts TUN writes `0..count` of buffer `bid` (SINGLE_WRITE: its one
    /// packet), in order: submitted now, or queued behind writes that wait
    /// for room. The buffer must be [`Owner::Kernel`] already.
    pub(super) fn start_writes(&mut self, bid: u16, count: u16) -> Result<()> {
        let seq = self.tun_writes.next_seq;
        let (indices, n) = if count == SINGLE_WRITE {
            (SINGLE_WRITE..=SINGLE_WRITE, 1)
        } else {
            (0..=count.saturating_sub(1), count)
        };
        self.tun_writes.next_seq += u64::from(n);
        if self.is_tun_buf(bid) {
            self.tx[usize::from(bid)].seq = seq;
        } else {
            self.rx[usize::from(bid - self.per_group)].seq = seq;
        }
        for (k, index) in indices.enumerate() {
            if self.tun_writes.blocked() {
                self.tun_writes.stall(seq + k as u64, bid, index);
            } else {
                self.tun_writes.direct.push((seq + k as u64, bid, index));
            }
        }
        Ok(())
    }

    /// Submits the writes started in this iteration, in order; if a write
    /// was refused meanwhile, they wait behind it instead.
    pub(super) fn submit_direct_writes(&mut self) -> Result<()> {
        for k in 0..self.tun_writes.direct.len() {
            let (seq, bid, index) = self.tun_writes.direct[k];
            if self.tun_writes.blocked() {
                self.tun_writes.stall(seq, bid, index);
            } else {
                self.submit_write(bid, index, squeue::Flags::empty(), 0)?;
            }
        }
        self.tun_writes.direct.clear();
        Ok(())
    }

    /// Submits TUN write `index` of buffer `bid` with `flags`; `chained`
    /// (CHAINED or 0) marks a member of a retry chain.
    fn submit_write(
        &mut self,
        bid: u16,
        index: u16,
        flags: squeue::Flags,
        chained: u64,
    ) -> Result<()> {
        let Some((source, _, _)) = self.write_source(bid, index) else {
            return Ok(());
        };
        let rw = if self.tun_writes.nowait {
            libc::RWF_NOWAIT
        } else {
            0
        };
        let e = match source {
            // Registered buffers cover the pool, not a coalescer's area.
            Source::Flat(ptr, len) if self.plan.fixed_buffers && index == SINGLE_WRITE => {
                with_file!(self, TUN_SLOT, |f| opcode::WriteFixed::new(
                    f, ptr, len as u32, 0
                )
                .rw_flags(rw)
                .build())
            }
            Source::Flat(ptr, len) => {
                with_file!(self, TUN_SLOT, |f| opcode::Write::new(f, ptr, len as u32)
                    .rw_flags(rw)
                    .build())
            }
            Source::Gather(iov, n) => {
                with_file!(self, TUN_SLOT, |f| opcode::Writev::new(f, iov, n as u32)
                    .rw_flags(rw)
                    .build())
            }
        };
        let e = e
            .flags(flags)
            .user_data(user_data(Op::TunWrite, bid, index) | chained);
        // SAFETY: the bytes lie in buffer `bid` or its coalescer's header
        // area, and a gather's iovecs in its slot; all untouched while the
        // buffer is the kernel's (until its last write completes).
        unsafe { self.push(e) }
    }

    /// Sends the waiting TUN writes as one chain behind a POLL_ADD(POLLOUT)
    /// on the TUN queue, in order (at most what the submission queue holds;
    /// the rest wait for the next chain).
    pub(super) fn retry_stalled_writes(&mut self) -> Result<()> {
        if self.stopping || self.tun_writes.chain > 0 || self.tun_writes.stalled.is_empty() {
            return Ok(());
        }
        // The whole chain must go in one submission: make room first.
        let capacity = self.ring.submission().capacity();
        if self.ring.submission().len() + self.tun_writes.stalled.len() + 1 > capacity {
            self.dp.stats().syscalls.add(1);
            self.ring
                .submit()
                .map_err(|e| Error::io(format!("submit to io_uring of {}", self.dp.label()), e))?;
        }
        let n = self.tun_writes.stalled.len().min(capacity - 1);
        let fd = self.tun.as_raw_fd();
        let poll = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(Op::TunPollOut, 0, 0));
        // SAFETY: no buffer; the TUN queue is owned by self and outlives
        // the operation.
        unsafe { self.push(poll)? };
        for k in 0..n {
            let Some((_, bid, index)) = self.tun_writes.stalled.pop_front() else {
                break;
            };
            let flags = if k + 1 < n {
                squeue::Flags::IO_LINK
            } else {
                squeue::Flags::empty()
            };
            self.tun_writes.chain += 1;
            self.submit_write(bid, index, flags, CHAINED)?;
        }
        Ok(())
    }

    /// TUN write `index` of buffer `bid` completed (`chained`: as part of
    /// a retry chain).
    pub(super) fn on_tun_write(
        &mut self,
        bid: u16,
        index: u16,
        res: i32,
        chained: bool,
    ) -> Result<()> {
        if chained {
            self.tun_writes.chain = self.tun_writes.chain.saturating_sub(1);
        }
        let Some((_, info, seq)) = self.write_source(bid, index) else {
            return Ok(());
        };
        let r = if res >= 0 {
            Ok(res as usize)
        } else {
            Err(Errno::from_raw(-res))
        };
        let wait = if res == -libc::ECANCELED && chained {
            // An earlier write of the chain failed: this one never ran.
            !self.stopping
        } else if res == -libc::EOPNOTSUPP && self.tun_writes.nowait {
            // The device does not take RWF_NOWAIT: write without it (a
            // nonblocking TUN queue then answers EAGAIN itself).
            self.tun_writes.nowait = false;
            crate::info!(
                "io_uring: {}: TUN writes refuse RWF_NOWAIT: writing without it",
                self.dp.label()
            );
            !self.stopping
        } else {
            match self.dp.on_tun_write(&info, r) {
                Ok(After::Retry) => {
                    self.tun_writes.pushed_back = true;
                    !self.stopping
                }
                Ok(After::Next) => false,
                Err(e) => {
                    self.fail(e);
                    false
                }
            }
        };
        if wait {
            self.tun_writes.stall(seq, bid, index);
            return Ok(());
        }
        if self.is_tun_buf(bid) {
            self.tx[usize::from(bid)].reflect = None;
        } else {
            let slot = &mut self.rx[usize::from(bid - self.per_group)];
            slot.writes_in_flight = slot.writes_in_flight.saturating_sub(1);
            if slot.writes_in_flight > 0 {
                return Ok(());
            }
            slot.single = None;
        }
        self.pool.set(bid, Owner::Kernel, Owner::Engine);
        self.recycle(bid)
    }
}
