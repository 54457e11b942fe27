//! The portable engine: `poll(2)` over a nonblocking TUN queue and UDP socket.
//!
//! Each wakeup visits each ready direction once, for at most what the
//! datapath's visit limits allow (`--batch` reads, `--visit-bytes` bytes),
//! so neither direction waits long behind the other. What a read becomes
//! is the [`Datapath`]'s decision; this engine only does the calls. When a
//! destination is full (`EAGAIN`), what is in hand is held, reading from that
//! direction's source stops, and the worker waits for the destination to
//! become writable: nothing is dropped for lack of room, and nothing
//! overtakes what is held.

use std::io::{self, IoSlice};
use std::net::UdpSocket;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::datapath::{
    After, Attach, Datapath, Direction, MAX_GATHER_PIECES, RxAction, SPLIT_LEN, TunAction, TxBuf,
    TxPlan, Visit, WriteInfo,
};
use crate::engine::boost::{Linger, WakeBoost};
use crate::engine::{Shutdown, WorkerParts, log_events, now_ns};
use crate::error::{Error, Result};
use crate::fq::Dequeued;
use crate::packet::offload::{Coalescer, MAX_WRITE_PIECES};

/// Reads (and receives) the flow queues may hold per side: 256 packets
/// (the same depth as the io_uring engine's default pool, so both engines
/// queue alike; measured with it, README, Performance).
pub const QUEUED_PACKETS: usize = 256;
/// The same with offload, where each buffer holds a 64 KiB super-packet
/// (2 MiB per side).
pub const QUEUED_SUPER_PACKETS: usize = 32;

/// One worker: a TUN queue, a UDP socket, and the datapath between them.
pub struct PollWorker {
    tun: crate::device::TunQueue,
    udp: UdpSocket,
    dp: Datapath,
    /// Never sleep in poll(2): spin with a zero timeout.
    busy_poll: bool,
    /// Priority on wakeup (`--wake-nice`).
    boost: WakeBoost,
    /// Looks for packets before sleeping (`--spin`).
    linger: Linger,
    shutdown: Arc<Shutdown>,
    out: Outbound,
    inb: Inbound,
}

/// TUN to peer: the read buffers, the split buffer, and what waits for
/// room. Without flow queueing one buffer (0) takes each read, handled at
/// once; with it, the buffers are the flow queues' pool: `free` ones take
/// reads, queued ones wait in the datapath's queues.
struct Outbound {
    bufs: Vec<Vec<u8>>,
    free: Vec<u32>,
    split: Vec<u8>,
    held: Option<OutHeld>,
}

/// A read being sent: from buffer 0, or a dequeued read of the flow queues.
type Taken = Option<Dequeued>;

fn buffer_of(t: &Taken) -> usize {
    t.map_or(0, |d| d.id as usize)
}

enum OutHeld {
    /// Datagrams waiting for room in the socket.
    Send(Taken, TxPlan),
    /// A reflected packet (bytes of its buffer) waiting for room in the
    /// TUN queue.
    Reflect(Taken, Range<usize>),
}

/// Peer to TUN: the receive buffers, the coalescer, and what waits for
/// room. Without flow queueing one buffer (0) takes each receive, handled
/// at once; with it, the buffers are the receive side's flow queues' pool.
struct Inbound {
    bufs: Vec<Vec<u8>>,
    /// What each queued buffer's receive was.
    received: Vec<Option<crate::datapath::Received>>,
    free: Vec<u32>,
    coalescer: Coalescer,
    cmsg: Vec<u8>,
    held: Option<InHeld>,
}

enum InHeld {
    /// One packet (bytes of its buffer).
    Write(Taken, Range<usize>),
    /// The coalescer's writes from this index on.
    Coalesced(Taken, usize),
}

/// A libc-level result from a std I/O result.
fn errno_of(r: io::Result<usize>) -> std::result::Result<usize, Errno> {
    r.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

impl PollWorker {
    pub fn new(parts: WorkerParts) -> Result<PollWorker> {
        let (udp, setup) = (parts.udp, parts.datapath);
        let label = setup.label().to_string();
        udp.set_nonblocking(true)
            .map_err(|e| Error::io(format!("make UDP socket of {label} nonblocking"), e))?;
        let socket = udp
            .local_addr()
            .map_err(|e| Error::io(format!("query address of UDP socket for {label}"), e))?;
        // With flow queueing, each buffer holds one queued read (or
        // receive); without it, one of each is all a synchronous engine uses.
        let buffers = match (setup.flow_queueing_requested(), setup.offload()) {
            (false, _) => 1,
            (true, true) => QUEUED_SUPER_PACKETS,
            (true, false) => QUEUED_PACKETS,
        };
        let dp = setup.build(Attach {
            socket,
            tun_buffers: buffers,
            udp_buffers: buffers,
        });
        let out = Outbound {
            bufs: (0..buffers)
                .map(|_| vec![0u8; dp.read_headroom() + dp.max_read_len() + dp.read_tailroom()])
                .collect(),
            free: (0..buffers as u32).rev().collect(),
            split: vec![0u8; if dp.offload() { SPLIT_LEN } else { 0 }],
            held: None,
        };
        // One byte more than the largest acceptable datagram (or a whole GRO
        // batch): a longer one is recognised by its length.
        let rx_buffers = if dp.rx_flow_queueing() { buffers } else { 1 };
        let inb = Inbound {
            bufs: (0..rx_buffers)
                .map(|_| vec![0u8; dp.max_receive_len()])
                .collect(),
            received: vec![None; rx_buffers],
            free: (0..rx_buffers as u32).rev().collect(),
            coalescer: Coalescer::new(),
            cmsg: crate::platform::segments_cmsg_space(),
            held: None,
        };
        Ok(PollWorker {
            tun: parts.tun,
            udp,
            dp,
            busy_poll: parts.busy_poll,
            linger: Linger::new(parts.spin),
            boost: WakeBoost::for_this_thread(parts.wake),
            shutdown: parts.shutdown,
            out,
            inb,
        })
    }

    /// Forwards until shutdown, or until the TUN device or socket fails.
    pub fn run(mut self) -> Result<()> {
        while !self.shutdown.is_triggered() {
            let mut tun_events = PollFlags::empty();
            let mut udp_events = PollFlags::empty();
            match self.out.held {
                None => tun_events |= PollFlags::POLLIN,
                Some(OutHeld::Send(..)) => udp_events |= PollFlags::POLLOUT,
                Some(OutHeld::Reflect(..)) => tun_events |= PollFlags::POLLOUT,
            }
            // Queued reads or receives to handle: look, don't sleep.
            let queued = (self.out.held.is_none() && self.dp.tx_queued() > 0)
                || (self.inb.held.is_none() && self.dp.rx_queued() > 0);
            match self.inb.held {
                None => udp_events |= PollFlags::POLLIN,
                Some(_) => tun_events |= PollFlags::POLLOUT,
            }
            let mut fds = [
                PollFd::new(self.tun.as_fd(), tun_events),
                PollFd::new(self.udp.as_fd(), udp_events),
                PollFd::new(self.shutdown.wake_fd(), PollFlags::POLLIN),
            ];
            let look = !(self.busy_poll || queued)
                && self
                    .linger
                    .keep_looking(Instant::now(), self.dp.stats().packets_moved());
            if look {
                std::thread::yield_now();
                let stats = self.dp.stats();
                stats.spin_looks.add(1);
                stats.syscalls.add(1);
            }
            let sleep = !(self.busy_poll || queued || look);
            if sleep {
                let c = self.boost.on_wait(self.dp.stats().packets_moved());
                self.boost.apply(c, self.dp.label(), self.dp.stats());
            }
            let stats = self.dp.stats();
            stats.syscalls.add(1);
            let timeout = if sleep {
                stats.waits.add(1);
                PollTimeout::NONE
            } else {
                PollTimeout::ZERO
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(Error::io(format!("poll {}", self.dp.label()), e.into()));
                }
            }
            let revents = |fd: &PollFd<'_>| fd.revents().unwrap_or(PollFlags::empty());
            let (tun_r, udp_r) = (revents(&fds[0]), revents(&fds[1]));
            if !revents(&fds[2]).is_empty() {
                break;
            }
            if tun_r.contains(PollFlags::POLLNVAL) {
                return Err(Error::config(format!("{} was closed", self.dp.label())));
            }
            if udp_r.contains(PollFlags::POLLERR) {
                // ICMP errors for our sends (IP_RECVERR): count and clear,
                // or POLLERR would stay set.
                stats
                    .peer_unreachable
                    .add(crate::platform::drain_error_queue(&self.udp));
            }
            let woke = PollFlags::POLLERR | PollFlags::POLLHUP;
            let tun_in = tun_r.intersects(PollFlags::POLLIN | woke);
            let tun_out = tun_r.intersects(PollFlags::POLLOUT | woke);
            let udp_in = udp_r.intersects(PollFlags::POLLIN | woke);
            let udp_out = udp_r.intersects(PollFlags::POLLOUT | woke);

            // Retry what the destinations refused last time, then read more.
            let out_ready = match self.out.held {
                Some(OutHeld::Send(..)) => udp_out,
                Some(OutHeld::Reflect(..)) => tun_out,
                None => false,
            };
            if out_ready {
                self.retry_outbound()?;
            }
            if self.inb.held.is_some() && tun_out {
                self.retry_inbound()?;
            }
            if (tun_in || self.dp.tx_queued() > 0) && self.out.held.is_none() {
                self.drain_tun(tun_in)?;
            }
            if (udp_in || self.dp.rx_queued() > 0) && self.inb.held.is_none() {
                self.drain_udp(udp_in)?;
            }
            let c = self.boost.on_pass(self.dp.stats().packets_moved());
            self.boost.apply(c, self.dp.label(), self.dp.stats());
            log_events(&mut self.dp);
        }
        Ok(())
    }

    fn retry_outbound(&mut self) -> Result<()> {
        match self.out.held.take() {
            Some(OutHeld::Send(t, plan)) => self.send_plan(t, plan),
            Some(OutHeld::Reflect(t, range)) => self.reflect(t, range),
            None => Ok(()),
        }
    }

    fn retry_inbound(&mut self) -> Result<()> {
        match self.inb.held.take() {
            Some(InHeld::Write(t, range)) => self.write_packet(t, range),
            Some(InHeld::Coalesced(t, from)) => self.write_coalesced(t, from),
            None => Ok(()),
        }
    }

    /// One visit to the TUN side (`readable`: poll said the TUN queue has
    /// packets): within the visit limits, reads and does what the datapath
    /// says with each, or with flow queueing, reads what the device holds
    /// into the queues and sends what they hand out; stops early when the
    /// socket is full.
    fn drain_tun(&mut self, readable: bool) -> Result<()> {
        let head = self.dp.read_headroom();
        let mut visit = self.dp.begin_visit(Direction::TunToPeer, now_ns());
        let r = if self.dp.flow_queueing() {
            self.fill_queues(head, readable)
                .and_then(|()| self.send_queued(&mut visit))
        } else {
            self.drain_tun_visit(head, &mut visit)
        };
        self.dp.end_visit(visit, now_ns());
        r
    }

    fn drain_tun_visit(&mut self, head: usize, visit: &mut Visit) -> Result<()> {
        while visit.has_room() {
            self.dp.stats().syscalls.add(1);
            let len = match errno_of(self.tun.read(&mut self.out.bufs[0][head..])) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(e) => {
                    visit.took(0);
                    self.dp.on_tun_read_error(e)?;
                    continue;
                }
            };
            visit.took(len);
            match self
                .dp
                .handle_tun_read(&mut self.out.bufs[0], len, &mut self.out.split)
            {
                TunAction::Send(plan) => self.send_plan(None, plan)?,
                TunAction::Reflect(range) => self.reflect(None, range)?,
                TunAction::Dropped => {}
            }
            if self.out.held.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Flow queueing: reads what the TUN queue holds, up to `--batch` reads,
    /// into free buffers and queues each by flow, so the device's FIFO ring
    /// only absorbs bursts. With no buffer free, the rest stays in the
    /// device, unless its ring has been overflowing (overload, from the
    /// device's drop counter, read every 10 ms): then the fattest flow's
    /// head is dropped to make room.
    fn fill_queues(&mut self, head: usize, readable: bool) -> Result<()> {
        let now = now_ns();
        if self.dp.ring_check_due(now) {
            let drops = crate::platform::device_tx_drops(self.dp.device());
            self.dp.tx_ring_drops(drops, now);
        }
        if !readable {
            return Ok(());
        }
        for _ in 0..self.dp.visit_limits().packets {
            if self.out.free.is_empty() {
                // Out of buffers: in overload, the datapath says what to drop.
                let now = now_ns();
                while let Some(id) = self.dp.tx_make_room(now, self.out.free.len()) {
                    self.out.free.push(id);
                }
            }
            let Some(id) = self.out.free.pop() else {
                return Ok(());
            };
            self.dp.stats().syscalls.add(1);
            let buf = &mut self.out.bufs[id as usize];
            match errno_of(self.tun.read(&mut buf[head..])) {
                Ok(len) => {
                    let now = now_ns();
                    self.dp.tx_enqueue(id, buf, len, now);
                }
                Err(e) => {
                    self.out.free.push(id);
                    if e == Errno::EAGAIN {
                        return Ok(());
                    }
                    self.dp.on_tun_read_error(e)?;
                }
            }
        }
        Ok(())
    }

    /// Flow queueing: sends what the queues hand out, within the visit
    /// limits; stops early when the socket is full.
    fn send_queued(&mut self, visit: &mut Visit) -> Result<()> {
        while visit.has_room() && self.out.held.is_none() {
            let now = now_ns();
            let Some(d) = self.dp.tx_next(now) else {
                return Ok(());
            };
            visit.took(d.bytes);
            let buf = &mut self.out.bufs[d.id as usize];
            match self.dp.handle_dequeued(buf, &d, &mut self.out.split) {
                TunAction::Send(plan) => self.send_plan(Some(d), plan)?,
                TunAction::Reflect(range) => self.reflect(Some(d), range)?,
                TunAction::Dropped => self.release(Some(d)),
            }
        }
        Ok(())
    }

    /// A read's buffer is done with: back to the free ones.
    fn release(&mut self, t: Taken) {
        if let Some(d) = t {
            self.dp.tx_done(&d);
            self.out.free.push(d.id);
        }
    }

    /// Sends what is left of `plan` (of the read `t`); holds it if the
    /// socket fills up.
    fn send_plan(&mut self, t: Taken, mut plan: TxPlan) -> Result<()> {
        let mut iov = [IoSlice::new(&[]); MAX_GATHER_PIECES];
        let read = &self.out.bufs[buffer_of(&t)];
        while let Some(send) = self.dp.next_send(&plan) {
            // One slice of the read buffer, or each datagram's headers (in
            // the split buffer) and payload (in the read buffer).
            let n = match plan.buf {
                TxBuf::Read => {
                    iov[0] = IoSlice::new(&read[send.range.clone()]);
                    1
                }
                TxBuf::Split => {
                    iov[0] = IoSlice::new(&self.out.split[send.range.clone()]);
                    1
                }
                TxBuf::Gather(_) => {
                    let mut n = 0;
                    for (h, p) in plan.pieces(&send) {
                        iov[n] = IoSlice::new(&self.out.split[h]);
                        iov[n + 1] = IoSlice::new(&read[p]);
                        n += 2;
                    }
                    n
                }
            };
            self.dp.stats().syscalls.add(1);
            let res = crate::platform::send_gather(
                &self.udp,
                &iov[..n],
                send.gso_size,
                send.tos,
                plan.dest,
            );
            if self.dp.on_send(&mut plan, &send, res) == After::Retry {
                self.out.held = Some(OutHeld::Send(t, plan));
                return Ok(());
            }
        }
        self.release(t);
        Ok(())
    }

    /// Writes a reflected packet back into the TUN queue; holds it if full.
    fn reflect(&mut self, t: Taken, range: Range<usize>) -> Result<()> {
        let info = WriteInfo::plain(range.len());
        self.dp.stats().syscalls.add(1);
        let res = errno_of(self.tun.write(&self.out.bufs[buffer_of(&t)][range.clone()]));
        if self.dp.on_tun_write(&info, res)? == After::Retry {
            self.out.held = Some(OutHeld::Reflect(t, range));
        } else {
            self.release(t);
        }
        Ok(())
    }

    /// One visit to the UDP side (`readable`: poll said the socket has
    /// datagrams): within the visit limits, receives and writes what the
    /// datapath accepts to the TUN queue, or with flow queueing, receives
    /// what the socket holds into the queues and writes what they hand
    /// out; stops early when the TUN queue is full.
    fn drain_udp(&mut self, readable: bool) -> Result<()> {
        let mut visit = self.dp.begin_visit(Direction::PeerToTun, now_ns());
        let r = if self.dp.rx_flow_queueing() {
            self.fill_rx_queues(readable)
                .and_then(|()| self.write_queued(&mut visit))
        } else {
            self.drain_udp_visit(&mut visit)
        };
        self.dp.end_visit(visit, now_ns());
        r
    }

    /// One receive into buffer `id`: None when the socket is empty (or
    /// the receive failed, counted).
    fn receive(&mut self, id: usize) -> Result<Option<crate::datapath::Received>> {
        self.dp.stats().syscalls.add(1);
        let buf = &mut self.inb.bufs[id];
        let got = match crate::platform::recv_segments(&self.udp, buf, &mut self.inb.cmsg) {
            Ok(r) => r,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => {
                // Counted (or fatal); the visit ends, and poll says when
                // there is more.
                self.dp.on_receive_error(e)?;
                return Ok(None);
            }
        };
        Ok(Some(crate::datapath::Received {
            src: got.src,
            payload: 0..got.len,
            gro_size: got.gro_size,
            truncated: got.truncated,
            arrived_ns: got.arrived_ns,
            tos: got.tos,
        }))
    }

    fn drain_udp_visit(&mut self, visit: &mut Visit) -> Result<()> {
        while visit.has_room() {
            let Some(rx) = self.receive(0)? else {
                return Ok(());
            };
            visit.took(rx.payload.len());
            let now = now_ns();
            let buf = &mut self.inb.bufs[0];
            match self
                .dp
                .handle_receive(&rx, buf, &mut self.inb.coalescer, now)
            {
                RxAction::Write(range) => self.write_packet(None, range)?,
                RxAction::Coalesced => self.write_coalesced(None, 0)?,
                RxAction::Dropped => {}
            }
            if self.inb.held.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Flow queueing: receives what the socket holds, up to `--batch`
    /// receives, into free buffers and queues each by flow, so the
    /// socket's FIFO buffer only absorbs bursts (as the TUN side).
    fn fill_rx_queues(&mut self, readable: bool) -> Result<()> {
        if !readable {
            return Ok(());
        }
        for _ in 0..self.dp.visit_limits().packets {
            // With no buffer free, the socket's buffer holds the rest.
            let Some(id) = self.inb.free.pop() else {
                return Ok(());
            };
            let Some(rx) = self.receive(id as usize)? else {
                self.inb.free.push(id);
                return Ok(());
            };
            let now = now_ns();
            self.dp
                .rx_enqueue(id, &rx, &self.inb.bufs[id as usize], now);
            self.inb.received[id as usize] = Some(rx);
        }
        Ok(())
    }

    /// Flow queueing: writes what the receive queues hand out, within the
    /// visit limits; stops early when the TUN queue is full.
    fn write_queued(&mut self, visit: &mut Visit) -> Result<()> {
        while visit.has_room() && self.inb.held.is_none() {
            let now = now_ns();
            let Some(d) = self.dp.rx_next(now) else {
                return Ok(());
            };
            visit.took(d.bytes);
            let id = d.id as usize;
            let Some(rx) = self.inb.received[id].take() else {
                self.release_rx(Some(d));
                continue;
            };
            let buf = &mut self.inb.bufs[id];
            match self
                .dp
                .handle_dequeued_receive(&rx, buf, &mut self.inb.coalescer, &d, now)
            {
                RxAction::Write(range) => self.write_packet(Some(d), range)?,
                RxAction::Coalesced => self.write_coalesced(Some(d), 0)?,
                RxAction::Dropped => self.release_rx(Some(d)),
            }
        }
        Ok(())
    }

    /// A receive's buffer is done with: back to the free ones.
    fn release_rx(&mut self, t: Taken) {
        if let Some(d) = t {
            self.dp.rx_done(&d);
            self.inb.free.push(d.id);
        }
    }

    /// Writes one received packet (bytes of its buffer).
    fn write_packet(&mut self, t: Taken, range: Range<usize>) -> Result<()> {
        let info = WriteInfo::plain(range.len());
        self.dp.stats().syscalls.add(1);
        let res = errno_of(self.tun.write(&self.inb.bufs[buffer_of(&t)][range.clone()]));
        if self.dp.on_tun_write(&info, res)? == After::Retry {
            self.inb.held = Some(InHeld::Write(t, range));
        } else {
            self.release_rx(t);
        }
        Ok(())
    }

    /// Writes the coalescer's writes from index `from` on, in order.
    fn write_coalesced(&mut self, t: Taken, from: usize) -> Result<()> {
        let c = &self.inb.coalescer;
        let buf = &self.inb.bufs[buffer_of(&t)];
        let mut io = [IoSlice::new(&[]); MAX_WRITE_PIECES];
        for (i, w) in c.writes().iter().enumerate().skip(from) {
            let mut n = 0;
            for (slot, piece) in io.iter_mut().zip(c.slices(w, buf)) {
                *slot = IoSlice::new(piece);
                n += 1;
            }
            self.dp.stats().syscalls.add(1);
            let res = errno_of(match &io[..n] {
                [one] => self.tun.write(one),
                pieces => self.tun.write_gather(pieces),
            });
            if self.dp.on_tun_write(&WriteInfo::coalesced(w), res)? == After::Retry {
                self.inb.held = Some(InHeld::Coalesced(t, i));
                return Ok(());
            }
        }
        self.release_rx(t);
        Ok(())
    }
}
