//! One io_uring worker: its ring, the submissions (every `unsafe` push of the
//! engine, each naming the memory that must outlive the operation), and the
//! completion loop. A completion is dispatched by its operation tag to a
//! handler that asks the [`Datapath`] what the bytes become and submits
//! exactly that.
#![allow(unsafe_code)]

use std::fs::File;
use std::net::UdpSocket;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::types::{CancelBuilder, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use nix::errno::Errno;

use super::ops::{CHAINED, MsgSlot, Op, SINGLE_WRITE, decode, user_data};
use super::pool::{BufRing, BufferPool, Owner, Region};
use super::{TUN_GROUP, UDP_GROUP, UringPlan, build_ring};
use crate::config::Toggle;
use crate::datapath::{
    After, Attach, Datapath, Direction, MAX_GATHER_PIECES, Received, RxAction, SPLIT_LEN,
    TunAction, TxBuf, TxPlan, TxSend,
};
use crate::engine::boost::{Linger, WakeBoost};
use crate::engine::{Shutdown, WorkerParts, log_events, now_ns};
use crate::error::{Error, Result};
use crate::packet::offload::{Coalescer, Piece};
use crate::platform::control;

/// Completions reaped in one iteration that count as "under load".
const COALESCE_AFTER: usize = 8;
/// Completions to wait for under load...
const COALESCE_WANT: usize = 32;
/// ...but no longer than this.
const COALESCE_WAIT_NS: u32 = 50_000;

/// Registered-file slots.
const TUN_SLOT: u32 = 0;
const UDP_SLOT: u32 = 1;

/// Evaluates `$build` with `$f` bound to the worker's TUN or UDP descriptor:
/// the registered slot when files are registered, else the raw fd.
macro_rules! with_file {
    ($w:expr, $slot:expr, |$f:ident| $build:expr) => {
        if $w.files_registered {
            let $f = Fixed($slot);
            $build
        } else {
            let $f = Fd($w.raw_fd($slot));
            $build
        }
    };
}

// After the macro, which it uses.
mod writes;

use writes::TunWrites;

/// The receive side of one descriptor: how its reads are armed.
struct Reads {
    /// Multishot: the provided-buffer ring the kernel takes buffers from.
    ring: Option<BufRing>,
    /// Single-shot: buffers not in use.
    free: Vec<u16>,
    /// Reads outstanding (single-shot) or armed (multishot, 0/1).
    armed: u32,
    /// A read was refused for lack of buffers; re-arm when one returns.
    starved: bool,
    /// Buffers currently in the provided ring.
    ring_avail: u32,
    /// TUN: a read found no buffer since the flow queues last looked (the
    /// device's ring had more than tunfwd could take).
    ran_out: bool,
}

impl Reads {
    fn multishot(&self) -> bool {
        self.ring.is_some()
    }
}

/// One TUN-side buffer: a read lands in it; its datagrams leave from it (or
/// from its split area), or its reflected answer goes back to the TUN.
struct TxSlot {
    msg: MsgSlot,
    /// The gather list of a send of a cut super-packet: each datagram's
    /// headers (split area) and payload (this buffer).
    iov: [libc::iovec; MAX_GATHER_PIECES],
    plan: Option<TxPlan>,
    /// The send in flight.
    send: Option<TxSend>,
    /// Reflect mode: the answer being written back.
    reflect: Option<Range<usize>>,
    /// Flow queueing: the dequeued read this buffer holds, handed back to
    /// the datapath when the buffer is recycled.
    taken: Option<crate::fq::Dequeued>,
    /// Order of that write among all TUN writes.
    seq: u64,
}

/// One UDP-side buffer: a receive lands in it; its packet (or, with
/// offload, its coalescer's writes) goes to the TUN.
struct RxSlot {
    msg: MsgSlot,
    coalescer: Coalescer,
    /// The coalescer's pieces as iovecs, index for index (a write's iovecs
    /// are its `pieces` range); rebuilt only while the engine owns the
    /// buffer, so they stay put while its writes are in flight.
    iov: Vec<libc::iovec>,
    /// The one packet being written (bytes of the buffer), without offload.
    single: Option<Range<usize>>,
    /// TUN writes of this buffer still in flight.
    writes_in_flight: u32,
    /// Order of the first of those writes among all TUN writes (the others
    /// follow it).
    seq: u64,
    /// Flow queueing: the receive this buffer holds while queued, and once
    /// dequeued, what the queues handed out (given back on recycling).
    received: Option<Received>,
    taken: Option<crate::fq::Dequeued>,
}

/// One io_uring worker. Built and run on its own thread (the ring is
/// single-issuer).
pub struct UringWorker {
    // Field order is drop order: the ring goes (after `run` drained it)
    // before the memory it used.
    ring: IoUring,
    tun_reads: Reads,
    udp_reads: Reads,
    tx: Vec<TxSlot>,
    rx: Vec<RxSlot>,
    tun_writes: TunWrites,
    multishot_msg: Box<libc::msghdr>,
    /// Offload: one split area of SPLIT_LEN bytes per TUN buffer.
    split: Option<Region>,
    pool: BufferPool,

    tun: File,
    udp: UdpSocket,
    dp: Datapath,
    plan: UringPlan,
    shutdown: Arc<Shutdown>,
    batch: usize,
    busy_poll: bool,
    /// Priority on wakeup (`--wake-nice`).
    boost: WakeBoost,
    /// Looks for completions before sleeping (`--spin`).
    linger: Linger,
    /// Buffers per group: TUN buffers are 0..per_group, UDP ones after.
    per_group: u16,
    /// Operations whose final completion has not arrived.
    in_flight: usize,
    files_registered: bool,
    stopping: bool,
    fatal: Option<Error>,
}

/// The worker's ring, with io-wq capped and (where the kernel takes it)
/// the TUN queue and the socket registered as files TUN_SLOT and UDP_SLOT.
fn open_ring(
    plan: &UringPlan,
    tun: &std::fs::File,
    udp: &std::net::UdpSocket,
    label: &str,
) -> Result<(IoUring, bool)> {
    let ring = build_ring(&plan.opts, plan.taskrun)
        .map_err(|e| Error::io(format!("set up io_uring for {label}"), e))?;
    // Cap io-wq: nothing we submit should need it; if something does, it
    // must not grow a thread pool.
    let _ = ring.submitter().register_iowq_max_workers(&mut [1, 1]);
    let files_registered = ring
        .submitter()
        .register_files(&[tun.as_raw_fd(), udp.as_raw_fd()])
        .is_ok();
    Ok((ring, files_registered))
}

/// Registers the pool's memory with the ring: Ok(true) if registered,
/// Ok(false) if the kernel refused and `--fixed-buffers` is auto (said in
/// one line).
fn register_pool(ring: &IoUring, pool: &BufferPool, plan: &UringPlan, label: &str) -> Result<bool> {
    // SAFETY: the iovec covers the pool, which the worker drops only after
    // the ring (field order) and after `run` reaped every operation.
    let r = unsafe { ring.submitter().register_buffers(&[pool.iovec()]) };
    match r {
        Ok(()) => Ok(true),
        Err(e) if plan.opts.ring.fixed_buffers == Toggle::Auto => {
            crate::info!(
                "io_uring: {label}: cannot register buffers ({e}): using unregistered buffers"
            );
            Ok(false)
        }
        Err(e) => Err(Error::io(format!("register buffers for {label}"), e)),
    }
}

/// The msghdr a multishot receive lays out in each provided buffer: the
/// sender's address, then the control data (UDP_GRO with `offload`, the
/// arrival time with `timestamps`).
fn multishot_header(offload: bool, timestamps: bool) -> Box<libc::msghdr> {
    let mut msg: Box<libc::msghdr> = Box::new(
        // SAFETY: msghdr is plain data (integers and raw pointers), for
        // which all-zero bytes are valid.
        unsafe { std::mem::zeroed() },
    );
    msg.msg_namelen = control::SOCKADDR_LEN as u32;
    msg.msg_controllen = control::control_len(offload, timestamps) as _;
    msg
}

impl UringWorker {
    /// Builds the ring, registers files and buffers, and fills the buffer
    /// rings. Must run on the thread that calls [`UringWorker::run`].
    pub fn new(parts: WorkerParts, plan: UringPlan) -> Result<UringWorker> {
        let WorkerParts {
            tun,
            udp,
            datapath: setup,
            shutdown,
            busy_poll,
            wake,
            spin,
        } = parts;
        let batch = setup.visit_limits().packets;
        let tun = tun.into_file();
        let label = setup.label().to_string();
        // io_uring waits for room itself (internal poll) when a send would
        // block; a nonblocking socket would hand EAGAIN back instead.
        udp.set_nonblocking(false)
            .map_err(|e| Error::io(format!("make UDP socket of {label} blocking"), e))?;
        let (ring, files_registered) = open_ring(&plan, &tun, &udp, &label)?;

        let per_group = (plan.opts.ring.buffers / 2) as u16;
        let total = usize::from(per_group) * 2;
        let pool = BufferPool::new(total, plan.buf_len)
            .map_err(|e| Error::io(format!("allocate buffer pool for {label}"), e))?;
        let mut plan = plan;
        plan.fixed_buffers = plan.fixed_buffers && register_pool(&ring, &pool, &plan, &label)?;
        let split = if plan.offload {
            Some(
                Region::new(usize::from(per_group) * SPLIT_LEN)
                    .map_err(|e| Error::io(format!("allocate segment buffers for {label}"), e))?,
            )
        } else {
            None
        };
        // The TUN buffers (0..per_group) are what the flow queues hold, and
        // the UDP ones (per_group.., numbered from 0 for the datapath) the
        // receive side's.
        let dp = setup.build(Attach {
            socket: udp
                .local_addr()
                .map_err(|e| Error::io(format!("query UDP address of {label}"), e))?,
            tun_buffers: usize::from(per_group),
            udp_buffers: usize::from(per_group),
        });
        let multishot_msg = multishot_header(plan.offload, dp.wants_timestamps());
        let reads = || Reads {
            ring: None,
            free: Vec::new(),
            armed: 0,
            starved: false,
            ring_avail: 0,
            ran_out: false,
        };
        let mut w = UringWorker {
            ring,
            tun_reads: reads(),
            udp_reads: reads(),
            tx: (0..per_group)
                .map(|_| TxSlot {
                    msg: MsgSlot::new(),
                    iov: [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }; MAX_GATHER_PIECES],
                    plan: None,
                    send: None,
                    reflect: None,
                    taken: None,
                    seq: 0,
                })
                .collect(),
            rx: (0..per_group)
                .map(|_| RxSlot {
                    msg: MsgSlot::new(),
                    coalescer: Coalescer::new(),
                    iov: Vec::new(),
                    single: None,
                    writes_in_flight: 0,
                    seq: 0,
                    received: None,
                    taken: None,
                })
                .collect(),
            tun_writes: TunWrites::new(usize::from(per_group)),
            multishot_msg,
            split,
            pool,
            tun,
            udp,
            dp,
            shutdown,
            batch,
            busy_poll,
            boost: WakeBoost::for_this_thread(wake),
            linger: Linger::new(spin),
            per_group,
            in_flight: 0,
            files_registered,
            stopping: false,
            fatal: None,
            plan,
        };
        w.setup_reads()?;
        Ok(w)
    }

    fn raw_fd(&self, slot: u32) -> RawFd {
        if slot == TUN_SLOT {
            self.tun.as_raw_fd()
        } else {
            self.udp.as_raw_fd()
        }
    }

    fn is_tun_buf(&self, bid: u16) -> bool {
        bid < self.per_group
    }

    /// Where reads into buffer `bid` land: TUN buffers keep the datapath's
    /// headroom in front.
    fn read_area(&self, bid: u16) -> (*mut u8, usize) {
        let head = if self.is_tun_buf(bid) {
            self.dp.read_headroom()
        } else {
            0
        };
        self.pool.area(bid, head..self.plan.buf_len)
    }

    /// A provided-buffer ring holding buffers `first..first + per_group`,
    /// registered as `group`; None if the kernel refuses and `--multishot`
    /// is auto (the group then uses single-shot reads).
    fn provided_ring(&self, group: u16, first: u16) -> Result<Option<BufRing>> {
        let n = self.per_group;
        let label = self.dp.label();
        let what = if group == TUN_GROUP { "TUN" } else { "UDP" };
        let mut r = BufRing::new(u32::from(n))
            .map_err(|e| Error::io(format!("allocate {what} buffer ring for {label}"), e))?;
        for bid in first..first + n {
            let (ptr, len) = self.read_area(bid);
            r.push(ptr, len, bid);
        }
        r.publish();
        // SAFETY: the caller stores the BufRing in `self`, where it is dropped
        // after the ring (field order).
        match unsafe { r.register(&self.ring, group) } {
            Ok(()) => Ok(Some(r)),
            Err(e) if self.plan.opts.ring.multishot == Toggle::Auto => {
                crate::info!(
                    "io_uring: {label}: cannot register {what} buffer ring ({e}): single-shot reads"
                );
                Ok(None)
            }
            Err(e) => Err(Error::io(
                format!("register {what} buffer ring for {label}"),
                e,
            )),
        }
    }

    fn setup_reads(&mut self) -> Result<()> {
        let n = self.per_group;
        if self.plan.multishot_tun {
            self.tun_reads.ring = self.provided_ring(TUN_GROUP, 0)?;
            self.tun_reads.ring_avail = u32::from(n);
        }
        if !self.tun_reads.multishot() {
            self.tun_reads.free = (0..n).rev().collect();
        }
        if self.plan.multishot_udp {
            self.udp_reads.ring = self.provided_ring(UDP_GROUP, n)?;
            self.udp_reads.ring_avail = u32::from(n);
        }
        if !self.udp_reads.multishot() {
            self.udp_reads.free = (n..2 * n).rev().collect();
        }
        if self.plan.offload && !(self.tun_reads.multishot() && self.udp_reads.multishot()) {
            return Err(Error::config(format!(
                "{}: offload needs multishot receives, but a buffer ring could not be registered",
                self.dp.label()
            ))
            .with_hint("use --offload off or --multishot on"));
        }
        Ok(())
    }

    /// Pushes one entry, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer and structure `entry` points to must stay valid until the
    /// operation's final completion is reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<()> {
        loop {
            let pushed = {
                let mut sq = self.ring.submission();
                // SAFETY: forwarded from the caller.
                unsafe { sq.push(&entry) }.is_ok()
            };
            if pushed {
                self.in_flight += 1;
                return Ok(());
            }
            self.dp.stats().syscalls.add(1);
            self.ring
                .submit()
                .map_err(|e| Error::io(format!("submit to io_uring of {}", self.dp.label()), e))?;
        }
    }

    /// Stops the worker with `e` (the first error wins).
    fn fail(&mut self, e: Error) {
        self.fatal.get_or_insert(e);
        self.stopping = true;
    }

    fn arm_tun_reads(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        if self.tun_reads.multishot() {
            if self.tun_reads.armed == 0 {
                let e = with_file!(self, TUN_SLOT, |f| opcode::ReadMulti::new(f, 0, TUN_GROUP)
                    .build());
                // SAFETY: buffers come from the registered TUN buffer ring,
                // which outlives every operation.
                unsafe { self.push(e.user_data(user_data(Op::TunRead, 0, 0)))? };
                self.tun_reads.armed = 1;
            }
            return Ok(());
        }
        while self.tun_reads.armed < self.plan.opts.ring.inflight {
            let Some(bid) = self.tun_reads.free.pop() else {
                self.tun_reads.starved = true;
                self.tun_reads.ran_out = true;
                self.dp.stats().pool_exhausted.add(1);
                break;
            };
            self.pool.set(bid, Owner::Free, Owner::Kernel);
            let (ptr, len) = self.read_area(bid);
            let len = len as u32;
            let e = if self.plan.fixed_buffers {
                with_file!(self, TUN_SLOT, |f| opcode::ReadFixed::new(f, ptr, len, 0)
                    .build())
            } else {
                with_file!(self, TUN_SLOT, |f| opcode::Read::new(f, ptr, len).build())
            };
            // SAFETY: buffer `bid` is the kernel's until this read completes;
            // the pool outlives the ring.
            unsafe { self.push(e.user_data(user_data(Op::TunRead, bid, 0)))? };
            self.tun_reads.armed += 1;
        }
        Ok(())
    }

    fn arm_udp_reads(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        if self.udp_reads.multishot() {
            if self.udp_reads.armed == 0 {
                let msg = &*self.multishot_msg as *const libc::msghdr;
                let e = with_file!(self, UDP_SLOT, |f| opcode::RecvMsgMulti::new(
                    f, msg, UDP_GROUP
                )
                .build());
                // SAFETY: the msghdr is boxed in self and the buffers come from
                // the registered UDP ring; both outlive every operation.
                unsafe { self.push(e.user_data(user_data(Op::UdpRecv, 0, 0)))? };
                self.udp_reads.armed = 1;
            }
            return Ok(());
        }
        while self.udp_reads.armed < self.plan.opts.ring.inflight {
            let Some(bid) = self.udp_reads.free.pop() else {
                self.udp_reads.starved = true;
                self.dp.stats().pool_exhausted.add(1);
                break;
            };
            self.pool.set(bid, Owner::Free, Owner::Kernel);
            let (ptr, len) = self.pool.whole(bid);
            let slot = usize::from(bid - self.per_group);
            let timestamps = self.dp.wants_timestamps();
            let msg = self.rx[slot].msg.prepare_recv(ptr, len, timestamps);
            let e = with_file!(self, UDP_SLOT, |f| opcode::RecvMsg::new(f, msg).build());
            // SAFETY: the slot's msghdr (in a Vec never resized after setup)
            // and the buffer are the kernel's until this receive completes.
            unsafe { self.push(e.user_data(user_data(Op::UdpRecv, bid, 0)))? };
            self.udp_reads.armed += 1;
        }
        Ok(())
    }

    /// Waits for POLLERR on the UDP socket (queued ICMP errors).
    fn arm_err_poll(&mut self) -> Result<()> {
        if self.stopping {
            return Ok(());
        }
        let fd = self.udp.as_raw_fd();
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLERR as u32).build();
        // SAFETY: no buffer; the socket is owned by self and outlives the
        // operation (drain reaps every operation before self is dropped).
        unsafe { self.push(e.user_data(user_data(Op::ErrPoll, 0, 0))) }
    }

    fn arm_wake(&mut self) -> Result<()> {
        let fd = self.shutdown.wake_fd().as_raw_fd();
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32).build();
        // SAFETY: no buffer; the pipe lives in `shutdown`, held by self.
        unsafe { self.push(e.user_data(user_data(Op::Wake, 0, 0))) }
    }

    /// Returns a buffer the engine owns to its group, re-arming a starved
    /// reader.
    fn recycle(&mut self, bid: u16) -> Result<()> {
        self.pool.set(bid, Owner::Engine, Owner::Free);
        if self.is_tun_buf(bid) {
            if let Some(d) = self.tx[usize::from(bid)].taken.take() {
                self.dp.tx_done(&d);
            }
        } else if let Some(d) = self.rx[usize::from(bid - self.per_group)].taken.take() {
            self.dp.rx_done(&d);
        }
        let (ptr, len) = self.read_area(bid);
        let tun = self.is_tun_buf(bid);
        let reads = if tun {
            &mut self.tun_reads
        } else {
            &mut self.udp_reads
        };
        match &mut reads.ring {
            Some(r) => {
                r.push(ptr, len, bid);
                r.publish();
                reads.ring_avail += 1;
            }
            None => reads.free.push(bid),
        }
        if reads.starved {
            reads.starved = false;
            if tun {
                self.arm_tun_reads()?;
            } else {
                self.arm_udp_reads()?;
            }
        }
        Ok(())
    }

    /// Sends the next part of TUN buffer `bid`'s plan; recycles the buffer
    /// when the plan is done.
    fn submit_send(&mut self, bid: u16) -> Result<()> {
        let i = usize::from(bid);
        let next = match &self.tx[i].plan {
            Some(plan) if !self.stopping => {
                self.dp.next_send(plan).map(|s| (s, plan.buf, plan.dest))
            }
            _ => None,
        };
        let Some((send, buf, dest)) = next else {
            self.tx[i].plan = None;
            return self.recycle(bid);
        };
        let control = control::SendControl::new(send.gso_size, send.tos, &dest);
        let dest = self.tx[i].msg.set_dest(dest);
        let msg = match buf {
            TxBuf::Read => {
                let (data, len) = self.pool.area(bid, send.range.clone());
                self.tx[i].msg.prepare_send(data, len, dest, &control)
            }
            TxBuf::Split => {
                let Some(split) = self.split.as_ref().map(|s| s.ptr) else {
                    return self.recycle(bid);
                };
                let range = send.range.start.min(SPLIT_LEN)..send.range.end.min(SPLIT_LEN);
                // SAFETY: bid < per_group: its split area is the SPLIT_LEN
                // bytes at i * SPLIT_LEN of `split`, and `range` lies in it.
                let data = unsafe { split.add(i * SPLIT_LEN + range.start) };
                self.tx[i]
                    .msg
                    .prepare_send(data, range.len(), dest, &control)
            }
            TxBuf::Gather(_) => {
                let Some(split) = self.split.as_ref().map(|s| s.ptr) else {
                    return self.recycle(bid);
                };
                // SAFETY: bid < per_group: the split area lies inside `split`.
                let headers = unsafe { split.add(i * SPLIT_LEN) };
                let pieces = self.tx[i].plan.as_ref().map(|plan| plan.pieces(&send));
                let slot = &mut self.tx[i];
                let mut n = 0;
                for (h, p) in pieces.into_iter().flatten() {
                    // SAFETY: a header range lies inside the split area; at
                    // most MAX_GATHER_PIECES pieces per send.
                    let hp = unsafe { headers.add(h.start) };
                    let (pp, plen) = self.pool.area(bid, p);
                    slot.iov[n] = libc::iovec {
                        iov_base: hp.cast(),
                        iov_len: h.len(),
                    };
                    slot.iov[n + 1] = libc::iovec {
                        iov_base: pp.cast(),
                        iov_len: plen,
                    };
                    n += 2;
                }
                let iov = slot.iov.as_mut_ptr();
                slot.msg.prepare_gather(iov, n, dest, &control)
            }
        };
        self.tx[i].send = Some(send);
        self.pool.set(bid, Owner::Engine, Owner::Kernel);
        let e = with_file!(self, UDP_SLOT, |f| opcode::SendMsg::new(f, msg).build());
        // SAFETY: the msghdr, iovecs and cmsg live in `tx[bid]` (a Vec never
        // resized after setup), the data in buffer `bid` and its split area,
        // the address in the slot's message; all untouched until this send
        // completes.
        unsafe { self.push(e.user_data(user_data(Op::Send, bid, 0))) }
    }

    /// Forwards until shutdown or a fatal error, then cancels and reaps
    /// every operation.
    pub fn run(mut self) -> Result<()> {
        self.arm_wake()?;
        self.arm_err_poll()?;
        self.arm_tun_reads()?;
        self.arm_udp_reads()?;
        let batch = self.batch;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(batch * 2 + 8);
        // Completions of each side: the TUN side's reads and sends, the UDP
        // side's receives and TUN writes.
        let mut tun_side: Vec<(u64, i32, u32)> = Vec::with_capacity(batch * 2 + 8);
        let mut udp_side: Vec<(u64, i32, u32)> = Vec::with_capacity(batch * 2 + 8);
        while !self.stopping && !self.shutdown.is_triggered() {
            // Reap what is there: up to `batch` inputs per direction.
            cqes.clear();
            let mut tun_in = 0;
            let mut udp_in = 0;
            let mut more_waiting = false;
            {
                let mut cq = self.ring.completion();
                cq.sync();
                for cqe in &mut cq {
                    match decode(cqe.user_data()).0 {
                        Some(Op::TunRead) => tun_in += 1,
                        Some(Op::UdpRecv) => udp_in += 1,
                        _ => {}
                    }
                    cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
                    if tun_in >= batch || udp_in >= batch {
                        more_waiting = true;
                        break;
                    }
                }
            }
            tun_side.clear();
            udp_side.clear();
            for &(ud, res, flags) in &cqes {
                match decode(ud).0 {
                    Some(Op::TunRead | Op::Send) => tun_side.push((ud, res, flags)),
                    Some(Op::UdpRecv | Op::TunWrite) => udp_side.push((ud, res, flags)),
                    // Wake-ups, error polls, cancels, write-chain polls.
                    _ => self.complete(ud, res, flags)?,
                }
            }
            self.visit_sides(&tun_side, &udp_side)?;
            if self.stopping {
                break;
            }
            let c = self.boost.on_pass(self.dp.stats().packets_moved());
            self.boost.apply(c, self.dp.label(), self.dp.stats());
            self.submit_direct_writes()?;
            self.retry_stalled_writes()?;
            log_events(&mut self.dp);
            // One kernel entry: submit what is still queued, and wait for
            // at least one completion unless some are already waiting.
            let cq_pending = more_waiting || !self.ring.completion().is_empty();
            if cq_pending && self.ring.submission().is_empty() {
                // Completions wait and nothing is queued: no kernel entry.
                continue;
            }
            // Within --spin of the last packets: yield, then look once
            // more without sleeping.
            let look = !self.busy_poll
                && !cq_pending
                && self
                    .linger
                    .keep_looking(std::time::Instant::now(), self.dp.stats().packets_moved());
            if look {
                std::thread::yield_now();
                let stats = self.dp.stats();
                stats.spin_looks.add(1);
                stats.syscalls.add(1);
            }
            let wait = !self.busy_poll && !cq_pending && !look;
            // Under load (the last reap was large), wait for a batch of
            // completions for at most COALESCE_WAIT: fewer kernel entries per
            // packet. At low load, wake on the first completion. With
            // offload one completion already stands for up to 64 KiB:
            // waiting for more would only add latency.
            let coalesce = wait && !self.plan.offload && cqes.len() >= COALESCE_AFTER;
            if wait {
                let c = self.boost.on_wait(self.dp.stats().packets_moved());
                self.boost.apply(c, self.dp.label(), self.dp.stats());
            }
            let stats = self.dp.stats();
            stats.syscalls.add(1);
            let r = if coalesce {
                stats.waits.add(1);
                let ts = Timespec::new().nsec(COALESCE_WAIT_NS);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring
                    .submitter()
                    .submit_with_args(COALESCE_WANT.min(batch), &args)
            } else if wait {
                stats.waits.add(1);
                self.ring.submit_and_wait(1)
            } else if look {
                self.look()
            } else {
                self.ring.submit()
            };
            if let Err(e) = r {
                // The coalescing timeout expired, a signal, or a full
                // completion queue: reap what is there.
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) {
                    return Err(Error::io(
                        format!("io_uring_enter for {}", self.dp.label()),
                        e,
                    ));
                }
            }
        }
        self.drain()?;
        // Registered files hold references to the TUN queue and socket, and
        // ring teardown is asynchronous: release them now, so a device we
        // created is gone by the time the process exits.
        if self.files_registered {
            let _ = self.ring.submitter().unregister_files();
        }
        if self.plan.fixed_buffers {
            let _ = self.ring.submitter().unregister_buffers();
        }
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Handles one reap's completions side by side, in visits within the
    /// datapath's limits: some of the TUN side's (reads become sends), then
    /// some of the UDP side's (receives become TUN writes, started but
    /// submitted at the end of the pass, in order), and so on. Each visit
    /// ends by submitting what it queued, so its sends run in the kernel
    /// before the other side's next visit: a ping or an ACK waits behind at
    /// most one visit's sends, not a whole reap's. Order within a side is
    /// kept.
    fn visit_sides(
        &mut self,
        tun_side: &[(u64, i32, u32)],
        udp_side: &[(u64, i32, u32)],
    ) -> Result<()> {
        let (mut t, mut u) = (0, 0);
        while (t < tun_side.len() || u < udp_side.len()) && !self.stopping {
            for (side, at, dir) in [
                (tun_side, &mut t, Direction::TunToPeer),
                (udp_side, &mut u, Direction::PeerToTun),
            ] {
                if *at >= side.len() {
                    continue;
                }
                let mut visit = self.dp.begin_visit(dir, now_ns());
                while *at < side.len() && visit.has_room() && !self.stopping {
                    let (ud, res, flags) = side[*at];
                    *at += 1;
                    if matches!(decode(ud).0, Some(Op::TunRead | Op::UdpRecv)) {
                        visit.took(usize::try_from(res).unwrap_or(0));
                    }
                    self.complete(ud, res, flags)?;
                }
                match dir {
                    Direction::TunToPeer => self.pump_queues()?,
                    Direction::PeerToTun => self.pump_receives()?,
                }
                // TUN writes wait for the end of the pass
                // (submit_direct_writes): a write refused with EAGAIN must
                // be reaped before any later write is submitted, or the
                // later one could pass it.
                self.submit_now()?;
                self.dp.end_visit(visit, now_ns());
            }
        }
        Ok(())
    }

    /// Submits what is queued, without waiting.
    fn submit_now(&mut self) -> Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.dp.stats().syscalls.add(1);
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // A full completion queue or a signal: the rest goes with the
            // next kernel entry.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR)) => Ok(()),
            Err(e) => Err(Error::io(
                format!("submit to io_uring of {}", self.dp.label()),
                e,
            )),
        }
    }

    /// Acts on one completion: a short dispatch by operation.
    fn complete(&mut self, ud: u64, res: i32, flags: u32) -> Result<()> {
        let (op, bid, index) = decode(ud);
        let chained = ud & CHAINED != 0;
        if !cqueue::more(flags) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let Some(op) = op else { return Ok(()) };
        match op {
            Op::TunRead => self.on_tun_read(bid, res, flags),
            Op::UdpRecv => self.on_udp_recv(bid, res, flags),
            Op::Send => self.on_send(bid, res),
            Op::TunWrite => self.on_tun_write(bid, index, res, chained),
            // Its chain's writes report for themselves.
            Op::TunPollOut => Ok(()),
            Op::ErrPoll => self.on_err_poll(res),
            Op::Wake => {
                self.stopping = true;
                Ok(())
            }
            Op::Cancel => Ok(()),
        }
    }

    /// The bookkeeping of a read completion (TUN if `tun`, else UDP):
    /// which buffer it handed over (now the engine's), and its error, if
    /// any, other than a multishot read running out of provided buffers
    /// (counted here; the read is re-armed when a buffer returns).
    fn reap_read(
        &mut self,
        tun: bool,
        bid: u16,
        res: i32,
        flags: u32,
    ) -> (Option<u16>, Option<Errno>) {
        let reads = if tun {
            &mut self.tun_reads
        } else {
            &mut self.udp_reads
        };
        let buffer = if reads.multishot() {
            if !cqueue::more(flags) {
                reads.armed = 0;
            }
            let b = cqueue::buffer_select(flags);
            if let Some(b) = b {
                reads.ring_avail = reads.ring_avail.saturating_sub(1);
                self.pool.set(b, Owner::Free, Owner::Engine);
            }
            b
        } else {
            reads.armed -= 1;
            self.pool.set(bid, Owner::Kernel, Owner::Engine);
            Some(bid)
        };
        if res >= 0 {
            return (buffer, None);
        }
        if reads.multishot() && res == -libc::ENOBUFS {
            self.dp.stats().pool_exhausted.add(1);
            reads.ran_out = tun;
            // Buffers may have come back earlier in this batch: starve only
            // if the ring is empty.
            reads.starved = reads.ring_avail == 0;
            return (buffer, None);
        }
        (buffer, Some(Errno::from_raw(-res)))
    }

    /// Re-arms reads after a completion: single-shot reads always, a
    /// multishot read once it ended (no MORE flag) unless starved.
    fn rearm_reads(&mut self, tun: bool, flags: u32) -> Result<()> {
        let reads = if tun {
            &self.tun_reads
        } else {
            &self.udp_reads
        };
        if reads.multishot() && (cqueue::more(flags) || reads.starved) {
            return Ok(());
        }
        if tun {
            self.arm_tun_reads()
        } else {
            self.arm_udp_reads()
        }
    }

    /// A TUN read completed: single-shot into `bid`, or multishot into the
    /// buffer the flags name.
    fn on_tun_read(&mut self, bid: u16, res: i32, flags: u32) -> Result<()> {
        match self.reap_read(true, bid, res, flags) {
            (Some(b), None) if res >= 0 => self.handle_tun_read(b, res as usize)?,
            (buffer, error) => {
                if let Some(Err(e)) = error.map(|e| self.dp.on_tun_read_error(e)) {
                    self.fail(e);
                }
                if let Some(b) = buffer {
                    self.recycle(b)?;
                }
            }
        }
        self.rearm_reads(true, flags)
    }

    /// `len` bytes read from the TUN into `bid`: queued by flow (sent when
    /// [`UringWorker::pump_queues`] dequeues it), or at once: send,
    /// reflect or drop.
    fn handle_tun_read(&mut self, bid: u16, len: usize) -> Result<()> {
        if self.dp.flow_queueing() {
            // SAFETY: the read completed and the engine owns the buffer;
            // this shared view ends with the call.
            let read = unsafe { self.pool.slice_mut(bid, self.plan.buf_len) };
            let now = now_ns();
            self.dp.tx_enqueue(u32::from(bid), read, len, now);
            return Ok(());
        }
        self.act_on_read(bid, len, None)
    }

    /// Flow queueing: sends what the queues hand out (until the datapath's
    /// bytes in flight are reached or they are empty); then, if no TUN
    /// buffer is left for the next read and the datapath calls it
    /// overload, drops from the fattest flow (until half the buffers are
    /// free, so reads keep up) so the device is still read promptly.
    fn pump_queues(&mut self) -> Result<()> {
        if !self.dp.flow_queueing() || self.stopping {
            return Ok(());
        }
        loop {
            let now = now_ns();
            let Some(d) = self.dp.tx_next(now) else { break };
            let Ok(bid) = u16::try_from(d.id) else { break };
            self.act_on_read(bid, d.bytes, Some(d))?;
        }
        let now = now_ns();
        if self.dp.ring_check_due(now) {
            let drops = crate::platform::device_tx_drops(self.dp.device());
            self.dp.tx_ring_drops(drops, now);
        }
        // Reads ran out of buffers: in overload, the datapath says what to
        // drop.
        if std::mem::take(&mut self.tun_reads.ran_out) {
            while let Some(id) = self.dp.tx_make_room(now, self.tun_buffers_free() as usize) {
                let Ok(bid) = u16::try_from(id) else { break };
                self.recycle(bid)?;
            }
        }
        Ok(())
    }

    /// One kernel entry that submits what is queued and posts finished
    /// work as completions without waiting for any (`--spin`): with
    /// DEFER_TASKRUN only an entry asking for events runs that work, and a
    /// wait, even with a zero timeout, would put the thread to sleep.
    fn look(&mut self) -> std::io::Result<usize> {
        if self.ring.params().is_setup_sqpoll() {
            return self.ring.submit();
        }
        let queued = self.ring.submission().len() as u32;
        // SAFETY: no argument is passed, the only flag is GETEVENTS with a
        // minimum of zero completions (no wait), and `queued` counts the
        // entries already written to the shared submission ring (the
        // handle publishes its tail when dropped, above).
        unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        }
    }

    /// TUN buffers ready for the next read.
    fn tun_buffers_free(&self) -> u32 {
        if self.tun_reads.multishot() {
            self.tun_reads.ring_avail
        } else {
            self.tun_reads.free.len() as u32 + self.tun_reads.armed
        }
    }

    /// The read of `len` bytes in TUN buffer `bid` (dequeued as `taken`
    /// with flow queueing): send, reflect or drop.
    fn act_on_read(
        &mut self,
        bid: u16,
        len: usize,
        taken: Option<crate::fq::Dequeued>,
    ) -> Result<()> {
        let i = usize::from(bid);
        self.tx[i].taken = taken;
        // SAFETY: the read completed and the engine owns the buffer; the
        // split area of `bid` belongs to this buffer alone.
        let (read, split) = unsafe {
            (
                self.pool.slice_mut(bid, self.plan.buf_len),
                match &self.split {
                    Some(s) => std::slice::from_raw_parts_mut(s.ptr.add(i * SPLIT_LEN), SPLIT_LEN),
                    None => &mut [][..],
                },
            )
        };
        let action = match &taken {
            Some(d) => self.dp.handle_dequeued(read, d, split),
            None => self.dp.handle_tun_read(read, len, split),
        };
        match action {
            TunAction::Send(plan) => {
                self.tx[i].plan = Some(plan);
                self.submit_send(bid)
            }
            TunAction::Reflect(range) => {
                self.tx[i].reflect = Some(range);
                self.pool.set(bid, Owner::Engine, Owner::Kernel);
                self.start_writes(bid, SINGLE_WRITE)
            }
            TunAction::Dropped => self.recycle(bid),
        }
    }

    /// A send of TUN buffer `bid` completed.
    fn on_send(&mut self, bid: u16, res: i32) -> Result<()> {
        self.pool.set(bid, Owner::Kernel, Owner::Engine);
        let i = usize::from(bid);
        let r = if res >= 0 {
            Ok(res as usize)
        } else {
            Err(Errno::from_raw(-res))
        };
        let slot = &mut self.tx[i];
        if let (Some(plan), Some(send)) = (slot.plan.as_mut(), slot.send.take()) {
            // Retry or next: the plan says which send comes now.
            let _: After = self.dp.on_send(plan, &send, r);
        }
        self.submit_send(bid)
    }

    /// A UDP receive completed: single-shot into `bid`, or multishot into
    /// the buffer the flags name.
    fn on_udp_recv(&mut self, bid: u16, res: i32, flags: u32) -> Result<()> {
        match self.reap_read(false, bid, res, flags) {
            (Some(b), None) if res >= 0 => {
                let rx = if self.udp_reads.multishot() {
                    self.parse_multishot(b, res as usize)
                } else {
                    let slot = &self.rx[usize::from(b - self.per_group)].msg;
                    let c = control::parse_control(slot.control());
                    Some(Received {
                        src: slot.sender(),
                        payload: 0..(res as usize).min(self.plan.buf_len),
                        gro_size: None,
                        truncated: slot.truncated(),
                        arrived_ns: c.arrived_ns,
                        tos: c.tos,
                    })
                };
                match rx {
                    Some(rx) => self.handle_receive(b, &rx)?,
                    None => {
                        self.dp.on_unreadable_receive();
                        self.recycle(b)?;
                    }
                }
            }
            (buffer, error) => {
                if let Some(Err(e)) = error.map(|e| self.dp.on_receive_error(e)) {
                    self.fail(e);
                }
                if let Some(b) = buffer {
                    self.recycle(b)?;
                }
            }
        }
        self.rearm_reads(false, flags)
    }

    /// Reads the recvmsg header the kernel laid out in buffer `bid`.
    fn parse_multishot(&self, bid: u16, res: usize) -> Option<Received> {
        let len = res.min(self.plan.buf_len);
        // SAFETY: the receive completed and the engine owns the buffer; this
        // shared view ends before anything writes to it.
        let buf: &[u8] = unsafe { self.pool.slice_mut(bid, len) };
        let out = RecvMsgOut::parse(buf, &self.multishot_msg).ok()?;
        let payload = out.payload_data();
        let offset = payload.as_ptr() as usize - buf.as_ptr() as usize;
        let c = control::parse_control(out.control_data());
        Some(Received {
            src: control::parse_sockaddr(out.name_data()),
            payload: offset..offset + payload.len(),
            gro_size: c.gro_size,
            truncated: out.is_payload_truncated(),
            arrived_ns: c.arrived_ns,
            tos: c.tos,
        })
    }

    /// A receive in UDP buffer `bid`: queued by flow (written when
    /// [`UringWorker::pump_receives`] dequeues it), or at once: write what
    /// the datapath accepts.
    fn handle_receive(&mut self, bid: u16, rx: &Received) -> Result<()> {
        if self.dp.rx_flow_queueing() {
            let slot = usize::from(bid - self.per_group);
            // SAFETY: the receive completed and the engine owns the buffer;
            // this view ends with the call.
            let buf = unsafe { self.pool.slice_mut(bid, self.plan.buf_len) };
            let now = now_ns();
            self.dp.rx_enqueue(slot as u32, rx, buf, now);
            self.rx[slot].received = Some(rx.clone());
            return Ok(());
        }
        self.act_on_receive(bid, rx, None)
    }

    /// Flow queueing: writes what the receive queues hand out (until the
    /// datapath's bytes in flight are reached or they are empty). With no
    /// UDP buffer left, the socket's buffer holds the rest.
    fn pump_receives(&mut self) -> Result<()> {
        if !self.dp.rx_flow_queueing() || self.stopping {
            return Ok(());
        }
        loop {
            let now = now_ns();
            let Some(d) = self.dp.rx_next(now) else { break };
            let Ok(slot) = u16::try_from(d.id) else { break };
            let bid = slot + self.per_group;
            match self.rx[usize::from(slot)].received.take() {
                Some(rx) => self.act_on_receive(bid, &rx, Some(d))?,
                None => {
                    self.rx[usize::from(slot)].taken = Some(d);
                    self.recycle(bid)?;
                }
            }
        }
        Ok(())
    }

    /// The receive `rx` in UDP buffer `bid` (dequeued as `taken` with flow
    /// queueing): write what the datapath accepts.
    fn act_on_receive(
        &mut self,
        bid: u16,
        rx: &Received,
        taken: Option<crate::fq::Dequeued>,
    ) -> Result<()> {
        let slot = usize::from(bid - self.per_group);
        self.rx[slot].taken = taken;
        // SAFETY: the receive completed and the engine owns the buffer.
        let buf = unsafe { self.pool.slice_mut(bid, self.plan.buf_len) };
        let action = match &taken {
            Some(d) => {
                self.dp
                    .handle_dequeued_receive(rx, buf, &mut self.rx[slot].coalescer, d, now_ns())
            }
            None => self
                .dp
                .handle_receive(rx, buf, &mut self.rx[slot].coalescer, now_ns()),
        };
        match action {
            RxAction::Write(range) => {
                self.rx[slot].single = Some(range);
                self.rx[slot].writes_in_flight = 1;
                self.pool.set(bid, Owner::Engine, Owner::Kernel);
                self.start_writes(bid, SINGLE_WRITE)
            }
            RxAction::Coalesced => {
                let s = &mut self.rx[slot];
                let c = &s.coalescer;
                s.iov.clear();
                for w in c.writes() {
                    for piece in c.pieces(w) {
                        let (at, len) = match piece {
                            Piece::Header(r) => {
                                let h = &c.header_area()[r.clone()];
                                (h.as_ptr().cast_mut(), h.len())
                            }
                            Piece::Buffer(r) => self.pool.area(bid, r.clone()),
                        };
                        s.iov.push(libc::iovec {
                            iov_base: at.cast(),
                            iov_len: len,
                        });
                    }
                }
                // A coalescer emits far fewer writes than a u16 counts.
                let n = c.writes().len().min(usize::from(SINGLE_WRITE - 1));
                self.rx[slot].writes_in_flight = n as u32;
                self.pool.set(bid, Owner::Engine, Owner::Kernel);
                self.start_writes(bid, n as u16)
            }
            RxAction::Dropped => self.recycle(bid),
        }
    }

    fn on_err_poll(&mut self, res: i32) -> Result<()> {
        if res >= 0 {
            self.dp
                .stats()
                .peer_unreachable
                .add(crate::platform::drain_error_queue(&self.udp));
        }
        if res != -libc::ECANCELED {
            self.arm_err_poll()?;
        }
        Ok(())
    }

    /// Cancels every operation and reaps until none is left, so no buffer is
    /// freed while the kernel may still use it.
    fn drain(&mut self) -> Result<()> {
        self.stopping = true;
        let e = opcode::AsyncCancel2::new(CancelBuilder::any()).build();
        // SAFETY: no buffer involved.
        unsafe { self.push(e.user_data(user_data(Op::Cancel, 0, 0)))? };
        let mut spins = 0u32;
        while self.in_flight > 0 {
            self.dp.stats().syscalls.add(1);
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("drain io_uring of {}", self.dp.label()),
                        e,
                    ));
                }
            }
            let cqes: Vec<(u64, i32, u32)> = {
                let mut cq = self.ring.completion();
                cq.sync();
                (&mut cq)
                    .map(|c| (c.user_data(), c.result(), c.flags()))
                    .collect()
            };
            for (ud, res, flags) in cqes {
                // Buffers go back (no re-arming while stopping); sends and
                // writes still count what they did.
                let _ = self.complete(ud, res, flags);
                if decode(ud).0 == Some(Op::Cancel) && self.in_flight > 0 {
                    // Operations submitted after the cancel (none expected)
                    // get cancelled by a fresh request.
                    spins += 1;
                    if spins < 1000 {
                        let e = opcode::AsyncCancel2::new(CancelBuilder::any()).build();
                        // SAFETY: no buffer involved.
                        unsafe { self.push(e.user_data(user_data(Op::Cancel, 0, 0)))? };
                    }
                }
            }
        }
        Ok(())
    }
}
