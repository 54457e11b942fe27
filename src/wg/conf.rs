//! The configuration format `wg setconf` reads (wg(8), CONFIGURATION FILE
//! FORMAT): an `[Interface]` section (PrivateKey, ListenPort, FwMark) and
//! `[Peer]` sections (PublicKey, PresharedKey, Endpoint, AllowedIPs,
//! PersistentKeepalive). Keys are case-insensitive, `#` starts a comment,
//! AllowedIPs may be given on several lines. Parsing does no I/O: the
//! caller reads the file and resolves endpoints. Errors name the line and
//! never repeat a key's text.

use std::net::SocketAddr;

use super::key::{PublicKey, Secret};
use crate::types::Prefix;

/// An interface and its peers, as the file says.
#[derive(Clone, Debug)]
pub struct WgConf {
    /// None: no key yet (an interface `wg` has not configured); it
    /// neither sends nor accepts anything. A file must give one.
    pub private_key: Option<Secret>,
    /// `None`: a port the kernel picks.
    pub listen_port: Option<u16>,
    /// `None`: off.
    pub fwmark: Option<u32>,
    pub peers: Vec<WgPeer>,
}

impl WgConf {
    /// An interface with nothing set: no key, a port the kernel picks, no
    /// peers (`wg` configures it).
    pub fn empty() -> WgConf {
        WgConf {
            private_key: None,
            listen_port: None,
            fwmark: None,
            peers: Vec::new(),
        }
    }
}

/// One `[Peer]` section.
#[derive(Clone, Debug)]
pub struct WgPeer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Secret>,
    /// Where to send before the peer has sent anything (it follows the
    /// peer's latest authenticated datagram afterwards); `None`: the peer
    /// must contact us first.
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses routed to the peer and accepted from it.
    pub allowed_ips: Vec<Prefix>,
    /// Seconds between keepalives sent while idle; `None`: off.
    pub persistent_keepalive: Option<u16>,
    /// The line of its `[Peer]` header, for errors.
    pub line: usize,
}

/// Keys of `wg-quick` files that `wg setconf` refuses, with what tunfwd
/// takes instead.
const WG_QUICK_KEYS: &[(&str, &str)] = &[
    ("address", "--address"),
    ("mtu", "--mtu"),
    ("dns", "the system's resolver configuration"),
    ("table", "routes of your own"),
    ("preup", "your service manager"),
    ("postup", "your service manager"),
    ("predown", "your service manager"),
    ("postdown", "your service manager"),
    ("saveconfig", "nothing (tunfwd never writes the file)"),
];

/// Parses `text`; `endpoint` resolves an `Endpoint` value (`HOST:PORT`,
/// `[IPv6]:PORT`).
pub fn parse(
    text: &str,
    endpoint: impl Fn(&str) -> Result<SocketAddr, String>,
) -> Result<WgConf, String> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut section = Section::None;
    let mut private_key = None;
    let mut listen_port = None;
    let mut fwmark = None;
    let mut interfaces = 0;
    let mut peers: Vec<PeerDraft> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: String| format!("line {n}: {e}");
        if line.starts_with('[') {
            match line.to_ascii_lowercase().as_str() {
                "[interface]" => {
                    interfaces += 1;
                    if interfaces > 1 {
                        return Err(at("a second [Interface] section".into()));
                    }
                    section = Section::Interface;
                }
                "[peer]" => {
                    section = Section::Peer;
                    peers.push(PeerDraft::new(n));
                }
                _ => return Err(at(format!("{line}: not [Interface] or [Peer]"))),
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(at(format!("{line:?} is not Key = Value")));
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        if let Some((_, instead)) = WG_QUICK_KEYS.iter().find(|(k, _)| *k == key) {
            return Err(at(format!(
                "{} is a wg-quick key, not part of the wg setconf format: use {instead}",
                key_name(&key)
            )));
        }
        match (&section, key.as_str()) {
            (Section::None, _) => {
                return Err(at("a key before any [Interface] or [Peer] section".into()));
            }
            (Section::Interface, "privatekey") => {
                private_key = Some(Secret::parse(value, "PrivateKey").map_err(at)?);
            }
            (Section::Interface, "listenport") => {
                listen_port =
                    Some(value.parse::<u16>().map_err(|_| {
                        at(format!("ListenPort {value:?} is not a port (0-65535)"))
                    })?);
            }
            (Section::Interface, "fwmark") => fwmark = parse_fwmark(value).map_err(at)?,
            (Section::Peer, _) => {
                let draft = peers.last_mut().expect("a [Peer] section was opened");
                draft.set(&key, value, &endpoint).map_err(at)?;
            }
            (Section::Interface, _) => {
                return Err(at(format!(
                    "{} is not a key of [Interface]",
                    key_name(&key)
                )));
            }
        }
    }
    let private_key = private_key.ok_or("no PrivateKey in [Interface]")?;
    let own = private_key.public_key();
    let mut done: Vec<WgPeer> = Vec::with_capacity(peers.len());
    for d in peers {
        let line = d.line;
        let peer = d.finish()?;
        if peer.public_key == own {
            return Err(format!(
                "line {line}: the [Peer] has this interface's own public key"
            ));
        }
        if let Some(first) = done.iter().find(|p| p.public_key == peer.public_key) {
            return Err(format!(
                "line {line}: the [Peer] public key of line {} again",
                first.line
            ));
        }
        done.push(peer);
    }
    Ok(WgConf {
        private_key: Some(private_key),
        listen_port: listen_port.filter(|&p| p != 0),
        fwmark,
        peers: done,
    })
}

/// `FwMark`: `off`, or a number (decimal or `0x` hex); 0 is off.
fn parse_fwmark(value: &str) -> Result<Option<u32>, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let n = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse::<u32>(),
    }
    .map_err(|_| format!("FwMark {value:?} is not off or a 32-bit number"))?;
    Ok((n != 0).then_some(n))
}

/// A key as the format spells it, for messages.
fn key_name(lower: &str) -> &str {
    match lower {
        "privatekey" => "PrivateKey",
        "listenport" => "ListenPort",
        "fwmark" => "FwMark",
        "publickey" => "PublicKey",
        "presharedkey" => "PresharedKey",
        "endpoint" => "Endpoint",
        "allowedips" => "AllowedIPs",
        "persistentkeepalive" => "PersistentKeepalive",
        "address" => "Address",
        "mtu" => "MTU",
        "dns" => "DNS",
        "table" => "Table",
        "preup" => "PreUp",
        "postup" => "PostUp",
        "predown" => "PreDown",
        "postdown" => "PostDown",
        "saveconfig" => "SaveConfig",
        other => other,
    }
}

/// A `[Peer]` section being read.
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<Secret>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<Prefix>,
    persistent_keepalive: Option<u16>,
}

impl PeerDraft {
    fn new(line: usize) -> PeerDraft {
        PeerDraft {
            line,
            public_key: None,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }

    fn set(
        &mut self,
        key: &str,
        value: &str,
        endpoint: &impl Fn(&str) -> Result<SocketAddr, String>,
    ) -> Result<(), String> {
        match key {
            "publickey" => self.public_key = Some(PublicKey::parse(value)?),
            "presharedkey" => {
                let k = Secret::parse(value, "PresharedKey")?;
                // All zeros is wg's "no preshared key".
                self.preshared_key = (k.bytes() != &[0; 32]).then_some(k);
            }
            "endpoint" => {
                self.endpoint = Some(endpoint(value).map_err(|e| format!("Endpoint {e}"))?)
            }
            "allowedips" => {
                for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    // As wg: an address alone is one host, and host bits
                    // are masked off (10.0.0.1/24 is 10.0.0.0/24).
                    let whole = match (p.contains('/'), p.contains(':')) {
                        (true, _) => p.to_string(),
                        (false, true) => format!("{p}/128"),
                        (false, false) => format!("{p}/32"),
                    };
                    let prefix: Prefix = whole
                        .parse()
                        .map_err(|e| format!("AllowedIPs {p:?}: {e}"))?;
                    if !self.allowed_ips.contains(&prefix) {
                        self.allowed_ips.push(prefix);
                    }
                }
            }
            "persistentkeepalive" => {
                self.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    let s = value.parse::<u16>().map_err(|_| {
                        format!("PersistentKeepalive {value:?} is not off or 0-65535 seconds")
                    })?;
                    (s != 0).then_some(s)
                }
            }
            other => return Err(format!("{} is not a key of [Peer]", key_name(other))),
        }
        Ok(())
    }

    fn finish(self) -> Result<WgPeer, String> {
        let line = self.line;
        Ok(WgPeer {
            public_key: self
                .public_key
                .ok_or_else(|| format!("line {line}: the [Peer] has no PublicKey"))?,
            preshared_key: self.preshared_key,
            endpoint: self.endpoint,
            allowed_ips: self.allowed_ips,
            persistent_keepalive: self.persistent_keepalive,
            line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(s: &str) -> Result<SocketAddr, String> {
        s.parse().map_err(|_| format!("{s:?} is not ADDR:PORT"))
    }

    fn keys() -> (Secret, Secret, Secret) {
        (
            Secret::generate().unwrap(),
            Secret::generate().unwrap(),
            Secret::generate().unwrap(),
        )
    }

    #[test]
    fn a_wg_setconf_file_parses() {
        let (own, a, b) = keys();
        let psk = Secret::generate().unwrap();
        let text = format!(
            "# a comment\n[Interface]\nPrivateKey = {}\nlistenport=51820\nFwMark = 0x1234\n\n\
             [Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = 198.18.0.2:51820\n\
             AllowedIPs = 198.19.0.2, 2001:db8::2/128\nAllowedIPs = 198.19.1.0/24 # more\n\
             PersistentKeepalive = 25\n[peer]\nPUBLICKEY = {}\nAllowedIPs = 198.19.2.1/24\n",
            own.to_base64(),
            a.public_key(),
            psk.to_base64(),
            b.public_key()
        );
        let c = parse(&text, endpoint).unwrap();
        assert_eq!(
            c.private_key.as_ref().unwrap().public_key(),
            own.public_key()
        );
        assert_eq!((c.listen_port, c.fwmark), (Some(51820), Some(0x1234)));
        assert_eq!(c.peers.len(), 2);
        let p = &c.peers[0];
        assert_eq!(p.public_key, a.public_key());
        assert_eq!(
            p.preshared_key.as_ref().map(|k| *k.bytes()),
            Some(*psk.bytes())
        );
        assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips.len(), 3);
        assert_eq!(
            p.allowed_ips[0],
            "198.19.0.2/32".parse().unwrap(),
            "an address alone: one host"
        );
        assert_eq!(p.persistent_keepalive, Some(25));
        let q = &c.peers[1];
        assert_eq!(
            (q.endpoint, q.persistent_keepalive, q.line),
            (None, None, 14)
        );
        assert_eq!(
            q.allowed_ips,
            vec!["198.19.2.0/24".parse().unwrap()],
            "host bits masked"
        );
        // What is printed of it never holds a secret.
        let shown = format!("{c:?}");
        for secret in [own.to_base64(), psk.to_base64()] {
            assert!(!shown.contains(&secret[..20]), "{shown}");
        }
    }

    #[test]
    fn errors_name_the_line_and_never_the_key() {
        let (own, a, _) = keys();
        let iface = format!("[Interface]\nPrivateKey = {}\n", own.to_base64());
        let peer = format!("[Peer]\nPublicKey = {}\n", a.public_key());
        for (text, want) in [
            (
                format!("PrivateKey = {}\n", own.to_base64()),
                "line 1: a key before any",
            ),
            (
                format!("{iface}ListenPort = 70000\n"),
                "line 3: ListenPort \"70000\"",
            ),
            (format!("{iface}FwMark = -1\n"), "line 3: FwMark"),
            (
                format!("{iface}Address = 10.0.0.1/24\n"),
                "line 3: Address is a wg-quick key",
            ),
            (format!("{iface}MTU = 1420\n"), "use --mtu"),
            (
                format!("{iface}Bogus = 1\n"),
                "line 3: bogus is not a key of [Interface]",
            ),
            (
                format!("{iface}[Peer]\n"),
                "line 3: the [Peer] has no PublicKey",
            ),
            (
                format!("{iface}{peer}AllowedIPs = 10.0.0.0/33\n"),
                "line 5: AllowedIPs \"10.0.0.0/33\"",
            ),
            (
                format!("{iface}{peer}Endpoint = nowhere\n"),
                "line 5: Endpoint \"nowhere\"",
            ),
            (
                format!("{iface}{peer}PersistentKeepalive = x\n"),
                "line 5: PersistentKeepalive",
            ),
            (
                format!("{iface}{peer}{peer}"),
                "line 5: the [Peer] public key of line 3 again",
            ),
            (
                format!("{iface}[Peer]\nPublicKey = {}\n", own.public_key()),
                "line 3: the [Peer] has this interface's own public key",
            ),
            (
                format!("{iface}[Interface]\n"),
                "line 3: a second [Interface]",
            ),
            (format!("{iface}[Peers]\n"), "line 3: [Peers]: not"),
            (peer.clone(), "no PrivateKey"),
            (
                format!("[Interface]\nPrivateKey = {}x\n", &own.to_base64()[..43]),
                "line 2: PrivateKey is not a key",
            ),
        ] {
            let e = parse(&text, endpoint).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains(&own.to_base64()[..20]), "{e}");
        }
    }

    #[test]
    fn zero_values_mean_off() {
        let own = Secret::generate().unwrap();
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 0\nFwMark = off\n[Peer]\nPublicKey = {}\n\
             PresharedKey = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nPersistentKeepalive = 0\n",
            own.to_base64(),
            Secret::generate().unwrap().public_key()
        );
        let c = parse(&text, endpoint).unwrap();
        assert_eq!((c.listen_port, c.fwmark), (None, None));
        assert!(c.peers[0].preshared_key.is_none());
        assert_eq!(c.peers[0].persistent_keepalive, None);
    }
}
