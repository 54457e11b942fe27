use super::*;
use crate::packet::offload::tests::{refresh_tcp_checksums, tcp_packet};

const PEER: &str = "198.18.0.2:5000";

/// One datagram of `len` bytes from `src`, queued at `arrived_ns`.
fn datagram(src: SocketAddr, len: usize, arrived_ns: Option<u64>) -> Received {
    Received {
        src: Some(src),
        payload: 0..len,
        gro_size: None,
        truncated: false,
        arrived_ns,
        tos: None,
    }
}

fn setup(offload: bool) -> Setup {
    let fwd = Forwarder::new(1500, PEER.parse().unwrap());
    Setup::new(
        "test".into(),
        fwd,
        Arc::new(WorkerStats::default()),
        offload,
    )
}

fn dp(offload: bool) -> Datapath {
    setup(offload).build(Attach::harness(1))
}

/// A TSO super-packet as the TUN device hands it over.
fn tso_read(payload_len: usize, mss: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let mut p = tcp_packet(false, 1, 0x10, &[], &payload);
    // The checksum field holds the pseudo-header sum (NEEDS_CSUM).
    let partial =
        crate::packet::checksum::fold_partial(crate::packet::checksum::pseudo_header_sum(
            [198, 19, 0, 1].into(),
            [198, 19, 0, 2].into(),
            6,
            p.len() - 20,
        ));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: virtio::F_NEEDS_CSUM,
        gso_type: virtio::GSO_TCPV4,
        hdr_len: 40,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut read = vec![0u8; virtio::LEN];
    hdr.write(&mut read);
    read.extend_from_slice(&p);
    read
}

/// The plan of a TSO read of `payload_len` bytes cut at MSS 1400.
fn offload_plan(d: &mut Datapath, payload_len: usize) -> TxPlan {
    let mut read = tso_read(payload_len, 1400);
    let len = read.len();
    let mut split = vec![0u8; SPLIT_LEN];
    plan_of(d.handle_tun_read(&mut read, len, &mut split))
}

fn plan_of(a: TunAction) -> TxPlan {
    match a {
        TunAction::Send(p) => p,
        other => panic!("not a send: {other:?}"),
    }
}

#[test]
fn a_hub_routes_each_read_to_its_peer_counts_per_peer_and_takes_reloads() {
    use crate::peers::{PeerSpec, PeerTable, SharedPeers};
    let specs = |l: &[&str]| -> Vec<PeerSpec> { l.iter().map(|s| s.parse().unwrap()).collect() };
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let first = PeerTable::build(
        &specs(&[
            "198.18.0.11:5000=198.19.0.2/32",
            "198.18.0.12:5000=198.19.0.1/32",
        ]),
        1,
        false,
        None,
    )
    .unwrap();
    let shared = Arc::new(SharedPeers::new(Arc::new(first)));
    let mut d = setup(true)
        .with_shared_peers(shared.clone())
        .build(Attach::harness(1));
    let peer = |d: &Datapath, i| d.forwarder().peers().peer(i).stats.snapshot();
    // A super-packet to 198.19.0.2: every datagram to spoke 11, one plan.
    let plan = offload_plan(&mut d, 20 * 1400);
    assert_eq!(plan.dest, addr("198.18.0.11:5000"));
    assert_eq!(plan.datagrams(), 20);
    assert_eq!(peer(&d, 0).tx_packets, 20);
    assert_eq!(peer(&d, 1).tx_packets, 0);
    // From spoke 12, which owns the packet's source 198.19.0.1:
    // accepted; the same from spoke 11: source_not_allowed.
    let pkt = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
    let mut c = Coalescer::new();
    let from = |src: &str| datagram(addr(src), pkt.len(), None);
    let a = d.handle_receive(&from("198.18.0.12:5000"), &mut pkt.clone(), &mut c, 5);
    assert_eq!(a, RxAction::Coalesced);
    let a = d.handle_receive(&from("198.18.0.11:5000"), &mut pkt.clone(), &mut c, 7);
    assert_eq!(a, RxAction::Dropped);
    let a = d.handle_receive(&from("198.18.0.13:5000"), &mut pkt.clone(), &mut c, 9);
    assert_eq!(a, RxAction::Dropped);
    assert_eq!((peer(&d, 1).rx_packets, peer(&d, 1).last_rx_ns), (1, 5));
    assert_eq!(peer(&d, 1).rx_bytes, pkt.len() as u64);
    assert_eq!(peer(&d, 0).drops_for(DropReason::SourceNotAllowed), 1);
    assert_eq!(peer(&d, 0).last_rx_ns, 7);
    let s = d.stats().snapshot().peer_to_tun;
    assert_eq!(s.drops_for(DropReason::SourceNotAllowed), 1);
    assert_eq!(s.drops_for(DropReason::NotFromPeer), 1);
    // A reload: spoke 11 goes, spoke 13 takes 198.19.0.0/24. The
    // worker takes it at its next visit; spoke 12 keeps its counters.
    let old = shared.load().1;
    let next = specs(&[
        "198.18.0.13:5000=198.19.0.0/24",
        "198.18.0.12:5000=198.19.0.1/32",
    ]);
    shared.store(Arc::new(
        PeerTable::build(&next, 1, false, Some(&old)).unwrap(),
    ));
    assert_eq!(offload_plan(&mut d, 2800).dest, addr("198.18.0.11:5000"));
    let v = d.begin_visit(Direction::TunToPeer, 0);
    d.end_visit(v, 0);
    assert_eq!(offload_plan(&mut d, 2800).dest, addr("198.18.0.13:5000"));
    assert_eq!(peer(&d, 1).rx_packets, 1);
    assert_eq!(peer(&d, 0).tx_packets, 2);
    let a = d.handle_receive(&from("198.18.0.11:5000"), &mut pkt.clone(), &mut c, 11);
    assert_eq!(a, RxAction::Dropped);
    assert_eq!(
        d.stats()
            .snapshot()
            .peer_to_tun
            .drops_for(DropReason::NotFromPeer),
        2
    );
    // A destination in no prefix: no_route, nothing sent.
    let mut d = setup(false)
        .with_shared_peers(shared)
        .build(Attach::harness(1));
    let mut read = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
    read[16..20].copy_from_slice(&[198, 19, 1, 9]);
    let len = read.len();
    assert_eq!(
        d.handle_tun_read(&mut read, len, &mut []),
        TunAction::Dropped
    );
    assert_eq!(
        d.stats()
            .snapshot()
            .tun_to_peer
            .drops_for(DropReason::NoRoute),
        1
    );
}

#[test]
fn plain_read_is_one_datagram_in_place() {
    let mut d = dp(false);
    let pkt = tcp_packet(false, 0, 0x10, &[], &[7; 100]);
    let mut read = pkt.clone();
    let mut plan = plan_of(d.handle_tun_read(&mut read, pkt.len(), &mut []));
    assert_eq!(plan.buf, TxBuf::Read);
    let send = d.next_send(&plan).unwrap();
    assert_eq!(
        send,
        TxSend {
            range: 0..pkt.len(),
            gso_size: None,
            tos: 0,
        }
    );
    assert_eq!(d.on_send(&mut plan, &send, Ok(pkt.len())), After::Next);
    assert!(d.next_send(&plan).is_none());
    let s = d.stats().snapshot();
    assert_eq!(
        (s.tun_to_peer.packets, s.tun_to_peer.bytes),
        (1, pkt.len() as u64)
    );
}

#[test]
fn super_packet_is_cut_into_gso_sends_in_order() {
    let mut d = dp(true);
    // 46 segments of 1400: more than one GSO send may carry (65507 B).
    let mut plan = offload_plan(&mut d, 46 * 1400);
    assert!(
        matches!(plan.buf, TxBuf::Gather(_)),
        "a super-packet is sent as a gather list"
    );
    assert_eq!(plan.datagrams(), 46);
    let mut sends = Vec::new();
    while let Some(s) = d.next_send(&plan) {
        assert_eq!(d.on_send(&mut plan, &s, Ok(s.range.len())), After::Next);
        sends.push(s);
    }
    // In order, back to back: 45 datagrams of 1440 bytes fill one GSO
    // send (65507 bytes hold no more), the last goes alone.
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[0].range, 0..45 * 1440);
    assert_eq!(sends[0].gso_size, Some(1440));
    assert_eq!(sends[1].range, 45 * 1440..46 * 1440);
    assert_eq!(sends[1].gso_size, None);
    let st = d.stats().snapshot();
    assert_eq!(st.tun_to_peer.packets, 46);
    assert_eq!(st.gso_sends, 1);
    assert_eq!(st.gso_segments, 45);
}

#[test]
fn gso_refused_resends_the_same_datagrams_one_by_one() {
    let mut d = dp(true);
    let mut plan = offload_plan(&mut d, 10 * 1400);
    let first = d.next_send(&plan).unwrap();
    assert!(first.gso_size.is_some());
    assert_eq!(d.poll_event(), None);
    assert_eq!(d.on_send(&mut plan, &first, Err(Errno::EIO)), After::Next);
    // Said once, as an event for the engine to log.
    assert_eq!(d.poll_event(), Some(Event::GsoRefused(Errno::EIO)));
    assert_eq!(d.poll_event(), None);
    let mut n = 0;
    let mut at = 0;
    while let Some(s) = d.next_send(&plan) {
        assert_eq!(s.gso_size, None);
        assert_eq!(s.range.start, at, "nothing skipped");
        at = s.range.end;
        d.on_send(&mut plan, &s, Ok(s.range.len()));
        n += 1;
    }
    assert_eq!(n, 10);
    let st = d.stats().snapshot();
    assert_eq!(st.tun_to_peer.packets, 10);
    assert_eq!(st.tun_to_peer.dropped(), 0);
    // GSO stays off for the next read.
    let plan = offload_plan(&mut d, 3 * 1400);
    assert_eq!(d.next_send(&plan).unwrap().gso_size, None);
}

#[test]
fn full_socket_retries_the_same_send_and_errors_count_losses() {
    let mut d = dp(true);
    let mut plan = offload_plan(&mut d, 4 * 1400);
    let s = d.next_send(&plan).unwrap();
    assert_eq!(d.on_send(&mut plan, &s, Err(Errno::EAGAIN)), After::Retry);
    assert_eq!(d.next_send(&plan).unwrap(), s, "the same send again");
    assert_eq!(
        d.on_send(&mut plan, &s, Err(Errno::ECONNREFUSED)),
        After::Next
    );
    assert!(plan.is_done());
    let st = d.stats().snapshot();
    assert_eq!(st.tun_to_peer.backpressure, 1);
    assert_eq!(st.tun_to_peer.drops_for(DropReason::SendFailed), 4);
}

#[test]
fn receive_with_gro_coalesces_and_drops_bad_checksums() {
    let mut d = dp(true);
    let peer: SocketAddr = PEER.parse().unwrap();
    let seg = |seq: u32| tcp_packet(false, seq, 0x10, &[], &[seq as u8; 100]);
    let mut bad = seg(100);
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    let mut buf = Vec::new();
    for p in [seg(0), bad, seg(100), seg(200)] {
        buf.extend_from_slice(&p);
    }
    let rx = Received {
        src: Some(peer),
        payload: 0..buf.len(),
        gro_size: Some(n),
        truncated: false,
        arrived_ns: None,
        tos: None,
    };
    let mut c = Coalescer::new();
    assert_eq!(
        d.handle_receive(&rx, &mut buf, &mut c, 0),
        RxAction::Coalesced
    );
    let writes = c.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].packets, 3);
    let info = WriteInfo::coalesced(&writes[0]);
    assert_eq!(d.on_tun_write(&info, Ok(10)).unwrap(), After::Next);
    let st = d.stats().snapshot();
    assert_eq!(st.peer_to_tun.drops_for(DropReason::BadChecksum), 1);
    assert_eq!(st.peer_to_tun.packets, 3);
    assert_eq!(st.peer_to_tun.bytes, 3 * n as u64);
    assert_eq!((st.gro_receives, st.gro_datagrams), (1, 4));
    assert_eq!((st.vnet_writes, st.vnet_write_packets), (1, 3));
}

#[test]
fn receive_checks_source_truncation_and_strips_encapsulation() {
    let peer: SocketAddr = PEER.parse().unwrap();
    let stranger: SocketAddr = "198.18.0.9:5000".parse().unwrap();
    let mut pkt = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
    refresh_tcp_checksums(&mut pkt);
    let rx = |src, truncated| Received {
        src,
        payload: 0..pkt.len(),
        gro_size: None,
        truncated,
        arrived_ns: None,
        tos: None,
    };
    for offload in [false, true] {
        let mut d = dp(offload);
        let mut c = Coalescer::new();
        let want = if offload {
            RxAction::Coalesced
        } else {
            RxAction::Write(0..pkt.len())
        };
        assert_eq!(
            d.handle_receive(&rx(Some(peer), false), &mut pkt.clone(), &mut c, 0),
            want
        );
        for (src, trunc, reason) in [
            (None, false, DropReason::NotFromPeer),
            (Some(stranger), false, DropReason::NotFromPeer),
            (Some(peer), true, DropReason::OverMtu),
            (Some(stranger), true, DropReason::NotFromPeer),
        ] {
            let before = d.stats().snapshot().peer_to_tun.drops_for(reason);
            assert_eq!(
                d.handle_receive(&rx(src, trunc), &mut pkt.clone(), &mut c, 0),
                RxAction::Dropped
            );
            assert_eq!(
                d.stats().snapshot().peer_to_tun.drops_for(reason),
                before + 1
            );
        }
    }
    // TAP mode: the VXLAN header stays out of the TUN write.
    let fwd = Forwarder::vxlan(1450, peer, 42);
    let mut d = Setup::new("t".into(), fwd, Arc::new(WorkerStats::default()), false)
        .build(Attach::harness(1));
    let mut dgram = vec![0u8; 8];
    crate::packet::vxlan::write_header(&mut dgram, 42);
    dgram.extend_from_slice(&[0xaa; 60]);
    let rx = datagram(peer, dgram.len(), None);
    assert_eq!(
        d.handle_receive(&rx, &mut dgram, &mut Coalescer::new(), 0),
        RxAction::Write(8..68)
    );
}

#[test]
fn one_truncation_rule_for_every_engine() {
    for offload in [false, true] {
        let d = dp(offload);
        let room = d.max_receive_len();
        // Where the payload lies does not matter (a multishot receive has
        // the kernel's header in front of it).
        let rx = |len, gro_size, truncated| Received {
            src: Some(PEER.parse().unwrap()),
            payload: 100..100 + len,
            gro_size,
            truncated,
            arrived_ns: None,
            tos: None,
        };
        assert!(!d.is_truncated(&rx(room - 1, None, false)));
        assert!(
            d.is_truncated(&rx(room, None, false)),
            "as long as a receive buffer: over the MTU"
        );
        assert!(d.is_truncated(&rx(10, None, true)), "the kernel cut it");
        assert!(
            !d.is_truncated(&rx(room, Some(1400), false)),
            "a GRO batch may fill its buffer"
        );
    }
}

#[test]
fn codel_marks_ect_packets_and_drops_others_in_a_standing_queue() {
    let peer: SocketAddr = PEER.parse().unwrap();
    for offload in [false, true] {
        let mut d = setup(offload)
            .with_aqm(Some(crate::aqm::CodelParams::default()))
            .build(Attach::harness(1));
        assert!(d.wants_timestamps());
        let mut c = Coalescer::new();
        // ECT(0) TCP segments, each having waited 2 ms in the socket
        // (target 500 us, interval 10 ms): one every 100 us.
        let mut marked_at = None;
        for i in 0..300u64 {
            let mut p = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
            p[1] = 0x02;
            refresh_tcp_checksums(&mut p);
            let now = 1_000_000_000 + i * 100_000;
            let rx = datagram(peer, p.len(), Some(now - 2_000_000));
            let action = d.handle_receive(&rx, &mut p, &mut c, now);
            assert_ne!(
                action,
                RxAction::Dropped,
                "an ECT packet is marked, never dropped"
            );
            if p[1] & 0b11 == 0b11 {
                marked_at.get_or_insert(i);
                // The mark keeps the IPv4 header valid.
                assert_eq!(crate::packet::checksum::checksum(&p[..20]), 0);
            }
        }
        // The first signal one interval (10 ms = 100 packets) after
        // the queue went above target.
        assert_eq!(marked_at, Some(100), "offload {offload}");
        // Then at 100 + 100/sqrt(1) and + 100/sqrt(2) packets: 3 marks.
        let s = d.stats().snapshot();
        assert_eq!(s.aqm_marks, 3, "{s}");
        assert_eq!(s.peer_to_tun.dropped(), 0);

        // Not ECN-capable: the signal is a drop, counted as aqm.
        let mut p = tcp_packet(false, 0, 0x10, &[], &[1; 10]);
        let mut dropped = 0;
        for i in 0..200u64 {
            let now = 2_000_000_000 + i * 100_000;
            let rx = datagram(peer, p.len(), Some(now - 2_000_000));
            if d.handle_receive(&rx, &mut p, &mut c, now) == RxAction::Dropped {
                dropped += 1;
            }
        }
        let s = d.stats().snapshot();
        // A new episode (the last one ended 97 intervals ago, so the
        // count starts over): the first signal one interval after the
        // queue went above target (packet 100), the next one interval
        // later (packet 200), past these 200 packets: exactly one.
        assert_eq!(dropped, 1, "offload {offload}");
        assert_eq!(s.peer_to_tun.drops_for(DropReason::Aqm), dropped);
    }
}

#[test]
fn flow_queued_super_packet_marked_whole_or_loses_one_datagram() {
    let params = crate::aqm::CodelParams {
        target: std::time::Duration::from_micros(1),
        interval: std::time::Duration::from_micros(10),
    };
    for ect in [false, true] {
        let mut d = setup(true)
            .with_flow_queues(Some(params), 1 << 20)
            .build(Attach::harness(1));
        let mut read = tso_read(14_000, 1400);
        if ect {
            // ECT(0), header checksum left to the split (it rewrites it).
            read[virtio::LEN + 1] = 0x02;
        }
        let len = read.len();
        let mut split = vec![0u8; SPLIT_LEN];
        // Queued long enough ago that CoDel signals on dequeue: first
        // an interval above target, then the signal.
        let mut signalled = None;
        for t in 0..100u64 {
            d.tx_enqueue(0, &read, len, t * 1_000);
            let q = d.tx_next(t * 1_000 + 50_000).expect("queued");
            if q.signal {
                signalled = Some(q);
                break;
            }
            d.tx_done(&q);
        }
        let q = signalled.expect("CoDel signalled");
        let plan = plan_of(d.handle_dequeued(&mut read, &q, &mut split));
        let s = d.stats().snapshot();
        if ect {
            assert_eq!(s.aqm_marks, 1);
            assert_eq!(s.tun_to_peer.dropped(), 0);
            assert_eq!(plan.datagrams(), 10);
            assert!(!plan.is_done());
            assert_eq!(plan.sent, 0, "all ten go, marked");
            let send = d.next_send(&plan).expect("a send");
            for (h, _) in plan.pieces(&send) {
                let ip = &split[h];
                assert_eq!(ip[1] & 0b11, 0b11, "CE in every datagram");
                assert_eq!(crate::packet::checksum::checksum(&ip[..20]), 0);
            }
        } else {
            assert_eq!(s.aqm_marks, 0);
            assert_eq!(s.tun_to_peer.drops_for(DropReason::Aqm), 1);
            assert_eq!(plan.sent, plan.seg, "the first datagram is the one dropped");
            let first = d.next_send(&plan).expect("nine left");
            assert_eq!(first.range.start, plan.seg);
            assert_eq!(first.range.len(), 9 * 1440);
        }
    }
}

#[test]
fn overload_is_the_rings_drop_counter_rising_recently() {
    let mut d = setup(false)
        .with_device("tun9")
        .with_flow_queues(Some(crate::aqm::CodelParams::default()), 1 << 20)
        .build(Attach::harness(4));
    let pkt = crate::packet::offload::tests::tcp_packet(false, 1, 0x10, &[], &[7; 100]);
    for id in 0..4 {
        d.tx_enqueue(id, &pkt, pkt.len(), 0);
    }
    let ms = 1_000_000;
    assert!(d.ring_check_due(0) || d.ring_check_due(RING_CHECK_NS));
    d.tx_ring_drops(Some(100), RING_CHECK_NS);
    // No increase: a full pool is a burst, the ring holds the rest.
    assert_eq!(d.tx_make_room(RING_CHECK_NS, 0), None);
    // An increase since a reading 10 ms ago: overload, the fattest
    // flow's head makes room, counted, until half the buffers are free.
    d.tx_ring_drops(Some(150), 2 * RING_CHECK_NS);
    let t = 2 * RING_CHECK_NS + ms;
    assert_eq!(d.tx_make_room(t, 0), Some(0));
    assert_eq!(d.tx_make_room(t, 1), Some(1));
    assert_eq!(d.tx_make_room(t, 2), None, "half of the 4 buffers are free");
    assert_eq!(d.tx_queued(), 2);
    assert_eq!(
        d.stats()
            .snapshot()
            .tun_to_peer
            .drops_for(DropReason::Overload),
        2
    );
    // It holds for OVERLOAD_HOLD_NS, then ends.
    let later = 2 * RING_CHECK_NS + OVERLOAD_HOLD_NS;
    assert_eq!(d.tx_make_room(later, 0), None);
    // An increase found after a long quiet spell is not current.
    d.tx_ring_drops(Some(900), later + 50 * ms);
    assert_eq!(d.tx_make_room(later + 51 * ms, 0), None);
    // Not due more often than every RING_CHECK_NS.
    assert!(d.ring_check_due(later + 60 * ms));
    assert!(!d.ring_check_due(later + 61 * ms));
    // With the queues empty, only after a visit's worth of reads: a worker
    // that keeps up reads rarely, one that reads full visits does.
    while let Some(q) = d.tx_next(later + 100 * ms) {
        d.tx_done(&q);
    }
    assert_eq!(d.tx_queued(), 0);
    assert!(!d.ring_check_due(later + 200 * ms));
    let visit = d.visit_limits().packets;
    for i in 0..visit {
        assert!(!d.ring_check_due(later + 300 * ms), "{i} reads");
        d.tx_enqueue(0, &pkt, pkt.len(), later + 300 * ms);
        let q = d.tx_next(later + 300 * ms).expect("handed out");
        d.tx_done(&q);
    }
    assert_eq!(d.tx_queued(), 0);
    assert!(d.ring_check_due(later + 300 * ms), "after {visit} reads");
    assert!(!d.ring_check_due(later + 400 * ms), "counted afresh");
}

#[test]
fn visits_stop_at_their_packet_or_byte_bound_and_are_timed() {
    // A visit from `at` ns, taking `bytes` at a time until full, ending
    // 1 us per take later.
    let take_all = |d: &mut Datapath, dir, bytes, at: u64| {
        let mut v = d.begin_visit(dir, at);
        let mut n = 0;
        while v.has_room() {
            v.took(bytes);
            n += 1;
        }
        d.end_visit(v, at + n * 1_000);
        n
    };
    let mut d = setup(true)
        .with_visit_limits(VisitLimits {
            packets: 64,
            bytes: 256 << 10,
        })
        .build(Attach::harness(1));
    // Four 64 KiB super-packets, or 64 small packets.
    assert_eq!(take_all(&mut d, Direction::TunToPeer, 65536, 10_000), 4);
    assert_eq!(take_all(&mut d, Direction::PeerToTun, 1400, 20_000), 64);
    assert_eq!(take_all(&mut d, Direction::TunToPeer, 65536, 90_000), 4);
    // No byte bound: only packets.
    let mut d2 = setup(true)
        .with_visit_limits(VisitLimits {
            packets: 8,
            bytes: 0,
        })
        .build(Attach::harness(1));
    assert_eq!(take_all(&mut d2, Direction::TunToPeer, 65536, 0), 8);
    // A visit that took nothing is not counted.
    let v = d.begin_visit(Direction::PeerToTun, 100_000);
    d.end_visit(v, 200_000);
    let s = d.stats().snapshot();
    assert_eq!(s.tun_to_peer.visits.count, 2);
    assert_eq!(s.peer_to_tun.visits.count, 1);
    // Timed with the clock passed in: exactly.
    assert_eq!(
        (s.tun_to_peer.visits.total_ns, s.tun_to_peer.visits.max_ns),
        (8_000, 4_000)
    );
    assert_eq!(s.peer_to_tun.visits.total_ns, 64_000);
}

#[test]
fn queue_delay_is_measured_from_arrival_timestamps() {
    let peer: SocketAddr = PEER.parse().unwrap();
    let mut d = setup(false)
        .with_aqm(Some(crate::aqm::CodelParams::default()))
        .build(Attach::harness(1));
    for (i, waited_us) in [100u64, 300, 200].into_iter().enumerate() {
        let mut p = tcp_packet(false, i as u32, 0x10, &[], &[1; 10]);
        refresh_tcp_checksums(&mut p);
        let now = 1_000_000_000 + i as u64 * 1_000_000;
        let rx = datagram(peer, p.len(), Some(now - waited_us * 1000));
        d.handle_receive(&rx, &mut p, &mut Coalescer::new(), now);
    }
    let q = d.stats().snapshot().peer_to_tun.queue_delay;
    assert_eq!((q.count, q.total_ns, q.max_ns), (3, 600_000, 300_000));
    assert_eq!(q.avg_us(), 200.0);
}

#[test]
fn write_and_receive_error_policy() {
    let d = dp(false);
    let w = WriteInfo::plain(100);
    assert_eq!(
        d.on_tun_write(&w, Err(Errno::EAGAIN)).unwrap(),
        After::Retry
    );
    assert_eq!(d.on_tun_write(&w, Err(Errno::EIO)).unwrap(), After::Next);
    assert!(d.on_tun_write(&w, Err(Errno::ENODEV)).is_err());
    assert_eq!(d.on_receive_error(Errno::EAGAIN).unwrap(), After::Retry);
    assert_eq!(
        d.on_receive_error(Errno::ECONNREFUSED).unwrap(),
        After::Next
    );
    assert_eq!(d.on_receive_error(Errno::ENOBUFS).unwrap(), After::Next);
    assert!(d.on_receive_error(Errno::EBADF).is_err());
    assert!(d.on_tun_read_error(Errno::EAGAIN).is_ok());
    assert!(d.on_tun_read_error(Errno::ENODEV).is_err());
    let s = d.stats().snapshot();
    assert_eq!(s.peer_to_tun.drops_for(DropReason::TunWriteFailed), 1);
    assert_eq!(s.peer_to_tun.backpressure, 1);
    assert_eq!(s.io_errors, 2);
}

#[test]
fn reflect_answers_in_place() {
    let fwd = Forwarder::reflector(1500, PEER.parse().unwrap());
    let mut d = Setup::new("t".into(), fwd, Arc::new(WorkerStats::default()), false)
        .build(Attach::harness(1));
    // An ICMP echo request.
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&[198, 19, 0, 2]);
    p[16..20].copy_from_slice(&[198, 19, 0, 1]);
    p[20] = 8;
    let c = crate::packet::checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let c = crate::packet::checksum::checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        d.handle_tun_read(&mut p, 28, &mut []),
        TunAction::Reflect(0..28)
    );
    assert_eq!(p[20], 0, "an echo reply");
}
