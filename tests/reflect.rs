//! `tunfwd reflect` against the real kernel, both engines: pings (IPv4 and
//! IPv6) to another address of the device's subnet are answered, and UDP
//! datagrams come back to their sender byte for byte. Needs root.

#![cfg(target_os = "linux")]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;

#[test]
fn reflector_answers_ping_and_udp() {
    if !can_run_kernel_tests("reflector_answers_ping_and_udp") {
        return;
    }
    for engine in engines("reflector_answers_ping_and_udp") {
        let ns = Netns::new("r");
        let args: Vec<String> = [
            "reflect",
            "--engine",
            engine,
            "--dev",
            "tun0",
            "--address",
            "198.19.0.1/24",
            "--address",
            "2001:db8:19::1/64",
        ]
        .map(String::from)
        .to_vec();
        let mut r = Proc::tunfwd(&ns, &args);
        assert!(
            ns.ping("198.19.0.2"),
            "{engine}: IPv4 ping through the reflector"
        );
        assert!(
            ns.ping("2001:db8:19::2"),
            "{engine}: IPv6 ping through the reflector"
        );

        for (local, remote) in [
            ("198.19.0.1:0", "198.19.0.2:7"),
            ("[2001:db8:19::1]:0", "[2001:db8:19::2]:7"),
        ] {
            let got = ns
                .spawn(move || {
                    let s = UdpSocket::bind(local).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut replies = Vec::new();
                    for i in 0..50u32 {
                        let msg: Vec<u8> = (0..(i * 20 + 1)).map(|j| (i + j) as u8).collect();
                        s.send_to(&msg, remote).unwrap();
                        let mut buf = [0u8; 2048];
                        let (n, from) = s.recv_from(&mut buf).expect("reflected datagram");
                        assert_eq!(from.to_string(), remote, "reply comes from where it went");
                        replies.push((msg, buf[..n].to_vec()));
                    }
                    replies
                })
                .join()
                .unwrap();
            for (sent, back) in got {
                assert_eq!(sent, back, "{engine}: UDP payload reflected byte for byte");
            }
        }
        assert!(r.terminate().success());
        let out = r.stdout();
        assert!(stat_sum(&out, "summary total", "packets") >= 106, "{out}"); // 6 pings + 100 datagrams
    }
}
