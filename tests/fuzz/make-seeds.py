#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target into corpus/<target>/.

Run from tests/fuzz: python3 make-seeds.py. The seeds are committed; this
script documents how they were made. Addresses are from 198.18.0.0/15 and
2001:db8::/32.
"""
import os
import random
import struct


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(proto, payload, src=(198, 19, 0, 2), dst=(198, 19, 0, 1), options=b""):
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    h = struct.pack("!BBHHHBBH4B4B", 0x40 | ihl, 0, total, 1, 0x4000, 64, proto, 0, *src, *dst) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ipv6(nh, payload, src="20010db8001900000000000000000002", dst="20010db8001900000000000000000001"):
    return struct.pack("!IHBB", 0x60000000, len(payload), nh, 64) + bytes.fromhex(src) + bytes.fromhex(dst) + payload


def udp(payload, sport=7001, dport=7000):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(payload, flags=0x18, seq=1000):
    return struct.pack("!HHIIBBHHH", 7001, 7000, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload


def icmp_echo(v6=False):
    t = 128 if v6 else 8
    body = struct.pack("!BBHHH", t, 0, 0, 7, 1) + b"ping" * 8
    return body[:2] + struct.pack("!H", 0 if v6 else csum(body)) + body[4:]


def virtio(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset):
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def mtu_field(mtu):
    return struct.pack("!H", mtu - 68)


def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


v4udp = ipv4(17, udp(b"hello tunnel" * 4))
v6udp = ipv6(17, udp(b"hello tunnel" * 4))
write("ip_validation", "empty", b"")
write("ip_validation", "ipv4-udp", v4udp)
write("ip_validation", "ipv4-options", ipv4(17, udp(b"x" * 20), options=b"\x01\x01\x01\x00"))
write("ip_validation", "ipv4-icmp-echo", ipv4(1, icmp_echo()))
write("ip_validation", "ipv6-udp", v6udp)
write("ip_validation", "ipv6-icmp-echo", ipv6(58, icmp_echo(True)))
write("ip_validation", "ipv4-truncated", v4udp[:12])
write("ip_validation", "ipv4-ihl4", bytes([0x44]) + v4udp[1:])
write("ip_validation", "ipv4-wrong-total", v4udp[:2] + b"\x05\xdc" + v4udp[4:])
write("ip_validation", "ipv6-wrong-payload-len", v6udp[:4] + b"\x00\x01" + v6udp[6:])
write("ip_validation", "bad-version", bytes([0x55]) + v4udp[1:])

frame = bytes.fromhex("020000000002020000000001") + b"\x08\x00" + v4udp
vx = bytes([0x08, 0, 0, 0]) + struct.pack("!I", 42 << 8)
write("vxlan_decode", "valid-vni42", vx + frame)
write("vxlan_decode", "no-i-flag", bytes([0x00, 0, 0, 0]) + struct.pack("!I", 42 << 8) + frame)
write("vxlan_decode", "vni43", bytes([0x08, 0, 0, 0]) + struct.pack("!I", 43 << 8) + frame)
write("vxlan_decode", "truncated", vx + frame[:6])
write("vxlan_decode", "header-only", vx)

write("virtio_header", "none", virtio(0, 0, 0, 0, 0, 0))
write("virtio_header", "tcpv4", virtio(1, 1, 40, 1400, 20, 16))
write("virtio_header", "tcpv6-ecn", virtio(1, 0x84, 60, 1400, 40, 16))
write("virtio_header", "udp-l4", virtio(1, 5, 28, 1400, 20, 6))
write("virtio_header", "short", virtio(1, 1, 40, 1400, 20, 16)[:7])

payload = bytes(range(256)) * 12
write("split_coalesce", "tso4", virtio(1, 1, 40, 1000, 20, 16) + mtu_field(1400) + ipv4(6, tcp(payload)))
write("split_coalesce", "tso6", virtio(1, 4, 60, 1000, 40, 16) + mtu_field(1400) + ipv6(6, tcp(payload)))
write("split_coalesce", "uso4", virtio(1, 5, 28, 1000, 20, 6) + mtu_field(1400) + ipv4(17, udp(payload)))
write("split_coalesce", "csum-only", virtio(1, 0, 0, 0, 20, 16) + mtu_field(1400) + ipv4(6, tcp(b"abc" * 100)))
write("split_coalesce", "plain", virtio(0, 0, 0, 0, 0, 0) + mtu_field(1400) + v4udp)

# flow_queues: 4-byte operations (enqueue, dequeue, overload drop, clock),
# then read by the datapath half as (op, length, packet) records.
ops = b"".join(bytes([0, f, 5, 220]) for f in range(8)) + bytes([1, 3, 0, 0]) * 4 + bytes([2, 0, 0, 0]) * 3
write("flow_queues", "enqueue-dequeue-drop", ops + bytes([3, 40, 1, 0]) + bytes([1, 200, 0, 0]) * 6)
ect_tcp = ipv4(6, tcp(b"d" * 60))
ect_tcp = ect_tcp[:1] + b"\x02" + ect_tcp[2:10] + struct.pack("!H", 0) + ect_tcp[12:]
ect_tcp = ect_tcp[:10] + struct.pack("!H", csum(ect_tcp[:20])) + ect_tcp[20:]
records = b"".join(bytes([op, len(p)]) + p for op, p in [(0, ect_tcp)] * 6 + [(1, ect_tcp), (250, ect_tcp), (4, v4udp)] * 20)
write("flow_queues", "ect-tcp-standing-queue", records)
write("flow_queues", "udp-and-acks", b"".join(bytes([3, len(p)]) + p for p in [v4udp, ipv4(6, tcp(b""))] * 30))
write("flow_queues", "clock-jumps", b"".join(bytes([op, 40]) + ipv4(17, udp(b"p" * 12)) for op in [0, 255, 3, 128, 1, 2] * 10))
# peer_table: a mode byte, 5-byte prefixes (length, 24 bits of network,
# owner; the high bit of the length picks IPv6), then query bytes.
nested = b"".join(bytes([ln, 0, i, 0, i]) for i, ln in enumerate([16, 24, 28, 32, 8, 0, 20]))
write("peer_table", "nested-v4", b"\0" + nested + bytes(range(40)))
write("peer_table", "nested-v6", b"\0" + b"".join(bytes([0x80 | ln, 0, i, 7, i]) for i, ln in enumerate([32, 48, 56, 64, 128, 0, 40])) + bytes(range(60)))
write("peer_table", "spread-many", b"\1" + b"".join(bytes([(i * 7) % 33 + (0x80 if i % 3 == 0 else 0), i, i * 3 % 256, i * 5 % 256, i % 16]) for i in range(120)) + bytes(range(200)))
write("peer_table", "duplicates", b"\0" + bytes([24, 1, 2, 3, 1]) * 3 + bytes([0x80 | 64, 1, 2, 3, 2]) * 2 + bytes(16))
# wg_receive: WireGuard messages by shape (type, sizes, a receiver index
# the fuzz device's session may hold), none of them authentic: random
# ephemeral keys, MACs and ciphertext.
rnd = random.Random(24)
def rbytes(n):
    return bytes(rnd.randrange(256) for _ in range(n))
write("wg_receive", "initiation", struct.pack("<I", 1) + rbytes(144))
write("wg_receive", "response", struct.pack("<III", 2, 7, 1) + rbytes(80))
write("wg_receive", "cookie-reply", struct.pack("<II", 3, 1) + rbytes(56))
write("wg_receive", "data-1400", struct.pack("<IIQ", 4, 1, 5) + rbytes(1400 + 16))
write("wg_receive", "keepalive", struct.pack("<IIQ", 4, 1, 6) + rbytes(16))
write("wg_receive", "data-unknown-index", struct.pack("<IIQ", 4, 77 << 8, 1) + rbytes(100))
