//! Receive steering by inner flow: a classic BPF program for a UDP socket
//! group (`SO_REUSEPORT`) that picks the socket, hence the worker, of each
//! datagram from the IP packet it carries, so that every packet of one
//! inner flow, in both directions, lands on one worker while the flows of
//! one peer (whose datagrams all share a 4-tuple, which the kernel's own
//! choice hashes) spread over all of them.
//!
//! The kernel runs the program with the packet's data starting at the UDP
//! payload (the inner IP header) and takes its return value as an index
//! into the group's sockets, in the order they joined (an index past the
//! last: the kernel's hash decides). The hash is symmetric (source and
//! destination addresses, and ports, are combined with XOR), so a reply
//! lands where its request did. Ports count for TCP and UDP when the packet
//! is not a fragment; other packets, fragments and anything too short or
//! not IP go by addresses, or to socket 0. Pure data: the socket option is
//! set in `crate::platform`.

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Instruction classes and fields (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MSH: u16 = 0xa0;
const XOR: u16 = 0xa0;
const RSH: u16 = 0x70;
const MUL: u16 = 0x20;
const MOD: u16 = 0x90;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JSET: u16 = 0x40;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;

const fn op(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// Appends `A ^= word at abs offset` for each offset (X is clobbered).
fn xor_words(p: &mut Vec<Insn>, offsets: &[u32]) {
    for &off in offsets {
        p.push(op(MISC | TAX, 0));
        p.push(op(LD | W | ABS, off));
        p.push(op(ALU | XOR | X, 0));
    }
}

/// Appends: the XOR of the address words at `words` into M[0], then the
/// protocol byte at `proto_at` tested for TCP and for UDP. Returns the two
/// tests' places, whose jumps the caller fills in.
fn addresses_and_protocol(p: &mut Vec<Insn>, words: &[u32], proto_at: u32) -> (usize, usize) {
    p.push(op(LD | W | ABS, words[0]));
    xor_words(p, &words[1..]);
    p.push(op(ST, 0));
    p.push(op(LD | B | ABS, proto_at));
    let tcp = p.len();
    p.push(jump(JMP | JEQ | K, 6, 0, 0)); // -> ports / next
    let udp = p.len();
    p.push(jump(JMP | JEQ | K, 17, 0, 0)); // -> ports / done
    (tcp, udp)
}

/// Appends loads of the two ports at `at` (`mode`: ABS, or IND from X):
/// the source port into M[1], the destination port into A.
fn ports(p: &mut Vec<Insn>, mode: u16, at: u32) {
    p.push(op(LD | H | mode, at));
    p.push(op(ST, 1));
    p.push(op(LD | H | mode, at + 2));
}

/// The program for a group of `sockets` sockets (at least 2).
pub fn inner_flow_program(sockets: u32) -> Vec<Insn> {
    let sockets = sockets.max(1);
    let mut p = Vec::with_capacity(64);
    // M[0]: the hash so far; M[1]: a port.
    // 0: version nibble.
    p.push(op(LD | B | ABS, 0));
    p.push(op(ALU | RSH | K, 4));
    let v4_test = p.len();
    p.push(jump(JMP | JEQ | K, 4, 0, 0)); // -> v4 / next
    let v6_test = p.len();
    p.push(jump(JMP | JEQ | K, 6, 0, 0)); // -> v6 / socket 0
    p.push(op(RET | K, 0));
    // IPv4: addresses at 12 and 16, protocol at 9.
    let v4 = p.len();
    let (v4_tcp, v4_udp) = addresses_and_protocol(&mut p, &[12, 16], 9);
    let v4_ports = p.len();
    // Fragment offset or more-fragments set: addresses only.
    p.push(op(LD | H | ABS, 6));
    let v4_frag = p.len();
    p.push(jump(JMP | JSET | K, 0x3fff, 0, 0)); // -> done / next
    p.push(op(LDX | B | MSH, 0)); // X = IHL * 4
    ports(&mut p, IND, 0);
    let v4_after = p.len();
    p.push(jump(JMP | JA, 0, 0, 0)); // -> mix ports
    // IPv6: addresses at 8..40, next header at 6, ports at 40 (no
    // extension headers followed: a packet with them goes by addresses).
    let v6 = p.len();
    let (v6_tcp, v6_udp) = addresses_and_protocol(&mut p, &[8, 12, 16, 20, 24, 28, 32, 36], 6);
    let v6_ports = p.len();
    ports(&mut p, ABS, 40);
    // A: one port, M[1]: the other, M[0]: the addresses.
    let mix_ports = p.len();
    p.push(op(LDX | W | MEM, 1));
    p.push(op(ALU | XOR | X, 0));
    p.push(op(LDX | W | MEM, 0));
    p.push(op(ALU | XOR | X, 0));
    p.push(op(ST, 0));
    // Multiplicative hashing (Knuth): the product's high bits depend on
    // every bit of the hash (connect() picks even ephemeral ports, so the
    // low bits alone would not spread a host's flows), then pick.
    let done = p.len();
    p.push(op(LD | MEM, 0));
    p.push(op(ALU | MUL | K, 0x9e37_79b1));
    p.push(op(ALU | RSH | K, 16));
    p.push(op(ALU | MOD | K, sockets));
    p.push(op(RET | A, 0));

    // Jump offsets count from the instruction after the jump.
    let rel = |from: usize, to: usize| -> u8 {
        u8::try_from(to - from - 1).expect("steering program jumps stay short")
    };
    p[v4_test].jt = rel(v4_test, v4);
    p[v4_test].jf = 0;
    p[v6_test].jt = rel(v6_test, v6);
    p[v6_test].jf = 0;
    p[v4_tcp].jt = rel(v4_tcp, v4_ports);
    p[v4_udp].jt = rel(v4_udp, v4_ports);
    p[v4_udp].jf = rel(v4_udp, done);
    p[v4_frag].jt = rel(v4_frag, done);
    p[v4_after].k = u32::from(rel(v4_after, mix_ports));
    p[v6_tcp].jt = rel(v6_tcp, v6_ports);
    p[v6_udp].jt = rel(v6_udp, v6_ports);
    p[v6_udp].jf = rel(v6_udp, done);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ip::tests::{ipv4_udp, ipv6_udp};

    /// A classic BPF interpreter for the instructions the program uses,
    /// with the kernel's rule that a load past the end returns 0.
    fn run(prog: &[Insn], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let load = |at: usize, n: usize| -> Option<u32> {
            let b = pkt.get(at..at + n)?;
            Some(b.iter().fold(0u32, |v, &byte| (v << 8) | u32::from(byte)))
        };
        let mut pc = 0;
        loop {
            let i = prog[pc];
            pc += 1;
            let size = |c: u16| match c & 0x18 {
                W => 4,
                H => 2,
                _ => 1,
            };
            match i.code & 0x07 {
                LD => {
                    a = match i.code & 0xe0 {
                        ABS => match load(i.k as usize, size(i.code)) {
                            Some(v) => v,
                            None => return 0,
                        },
                        IND => match load((x + i.k) as usize, size(i.code)) {
                            Some(v) => v,
                            None => return 0,
                        },
                        MEM => m[i.k as usize],
                        c => panic!("ld mode {c:#x}"),
                    }
                }
                LDX => {
                    x = match i.code & 0xe0 {
                        MSH => match load(i.k as usize, 1) {
                            Some(v) => 4 * (v & 0xf),
                            None => return 0,
                        },
                        MEM => m[i.k as usize],
                        c => panic!("ldx mode {c:#x}"),
                    }
                }
                ST => m[i.k as usize] = a,
                ALU => {
                    let v = if i.code & X != 0 { x } else { i.k };
                    a = match i.code & 0xf0 {
                        XOR => a ^ v,
                        MUL => a.wrapping_mul(v),
                        RSH => a >> v,
                        MOD => a % v,
                        c => panic!("alu op {c:#x}"),
                    }
                }
                JMP => match i.code & 0xf0 {
                    JA => pc += i.k as usize,
                    JEQ => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                    JSET => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                    c => panic!("jmp op {c:#x}"),
                },
                RET => return if i.code & A != 0 { a } else { i.k },
                MISC => x = a,
                c => panic!("class {c:#x}"),
            }
        }
    }

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = ipv4_udp(20);
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[9] = 6;
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn one_flow_one_socket_both_ways_and_flows_spread() {
        let prog = inner_flow_program(2);
        let (a, b) = ([198, 19, 0, 1], [198, 19, 0, 2]);
        let mut seen = [0usize; 2];
        // connect() picks even ephemeral ports: consecutive ones still
        // spread.
        for sport in (40000..40032u16).step_by(2) {
            let out = run(&prog, &tcp4(a, b, sport, 5201));
            let back = run(&prog, &tcp4(b, a, 5201, sport));
            assert_eq!(out, back, "port {sport}: a reply lands with its request");
            assert!(out < 2);
            seen[out as usize] += 1;
        }
        assert!(
            seen[0] >= 4 && seen[1] >= 4,
            "16 flows over two sockets: {seen:?}"
        );
    }

    #[test]
    fn ports_count_only_for_tcp_and_udp_unfragmented() {
        let prog = inner_flow_program(8);
        let (a, b) = ([198, 19, 0, 1], [198, 19, 0, 2]);
        let picks: std::collections::HashSet<u32> = (40000..40128u16)
            .step_by(2)
            .map(|p| run(&prog, &tcp4(a, b, p, 5201)))
            .collect();
        assert!(picks.len() > 4, "TCP ports spread flows: {picks:?}");
        // The sockets picked over many port pairs with byte `at` set to `v`.
        let picks_with = |at: usize, v: u8| -> std::collections::HashSet<u32> {
            (40000..40064u16)
                .map(|p| {
                    let mut pkt = tcp4(a, b, p, 5201);
                    pkt[at] = v;
                    run(&prog, &pkt)
                })
                .collect()
        };
        // ICMP (protocol 1): addresses only, whatever sits where ports would.
        let icmp = picks_with(9, 1);
        assert_eq!(icmp.len(), 1);
        // A fragment (MF set): addresses only, like its later fragments.
        let frag = picks_with(6, 0x20);
        assert_eq!(frag, icmp);
    }

    #[test]
    fn ipv6_flows_are_symmetric_and_spread() {
        let prog = inner_flow_program(4);
        let a: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ];
        let b: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        let mut picks = std::collections::HashSet::new();
        for sport in (40000..40064u16).step_by(2) {
            let mut out = ipv6_udp(8);
            out[8..24].copy_from_slice(&a);
            out[24..40].copy_from_slice(&b);
            out[40..42].copy_from_slice(&sport.to_be_bytes());
            out[42..44].copy_from_slice(&53u16.to_be_bytes());
            let mut back = ipv6_udp(8);
            back[8..24].copy_from_slice(&b);
            back[24..40].copy_from_slice(&a);
            back[40..42].copy_from_slice(&53u16.to_be_bytes());
            back[42..44].copy_from_slice(&sport.to_be_bytes());
            let o = run(&prog, &out);
            assert_eq!(o, run(&prog, &back));
            assert!(o < 4);
            picks.insert(o);
        }
        assert!(picks.len() >= 3, "{picks:?}");
    }

    #[test]
    fn short_or_foreign_payloads_go_to_socket_zero() {
        let prog = inner_flow_program(2);
        assert_eq!(run(&prog, &[]), 0);
        assert_eq!(run(&prog, &[0x45, 0, 0]), 0);
        assert_eq!(run(&prog, &[0x00; 64]), 0);
        // Every jump stays inside the program.
        for (i, insn) in prog.iter().enumerate() {
            if insn.code & 0x07 == JMP {
                let far = if insn.code & 0xf0 == JA {
                    insn.k as usize
                } else {
                    usize::from(insn.jt.max(insn.jf))
                };
                assert!(i + 1 + far < prog.len(), "jump at {i}");
            }
        }
    }
}
