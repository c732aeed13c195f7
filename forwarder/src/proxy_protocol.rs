//! The PROXY protocol v2 header (haproxy.org's proxy-protocol.txt, section 2.2) that the
//! userspace path writes ahead of a forwarded TCP connection when a Service asks for it
//! (`ferry.dev/proxy-protocol: v2`), so the backend learns the client's address and the VIP.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The header for a connection from `client` to `destination` (the VIP and port).
pub fn header(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (client.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(TCP_OVER_IPV4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push(TCP_OVER_IPV6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src));
            out.extend_from_slice(&v6(dst));
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// Reads a v2 header back: (client, destination) and the header's length. For tests and
/// for the test backends that check what a backend receives.
pub fn parse(bytes: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    if bytes.len() < 16 || bytes[..12] != SIGNATURE || bytes[12] != VERSION_PROXY {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let body = bytes.get(16..16 + len)?;
    let (src, dst, ports) = match bytes[13] {
        TCP_OVER_IPV4 if len >= 12 => {
            let src: [u8; 4] = body[0..4].try_into().ok()?;
            let dst: [u8; 4] = body[4..8].try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), &body[8..12])
        }
        TCP_OVER_IPV6 if len >= 36 => {
            let src: [u8; 16] = body[0..16].try_into().ok()?;
            let dst: [u8; 16] = body[16..32].try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), &body[32..36])
        }
        _ => return None,
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Some((
        SocketAddr::new(src, port(&ports[0..2])),
        SocketAddr::new(dst, port(&ports[2..4])),
        16 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_specification_byte_for_byte() {
        let h = header(
            "198.51.100.7:51234".parse().unwrap(),
            "192.0.2.10:80".parse().unwrap(),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[198, 51, 100, 7, 192, 0, 2, 10]);
        want.extend_from_slice(&[0xc8, 0x22, 0x00, 0x50]);
        assert_eq!(h, want);
    }

    #[test]
    fn headers_round_trip_for_both_families() {
        for (c, d) in [
            ("198.51.100.7:51234", "192.0.2.10:80"),
            ("[2001:db8::7]:40000", "[2001:db8::10]:443"),
        ] {
            let (c, d): (SocketAddr, SocketAddr) = (c.parse().unwrap(), d.parse().unwrap());
            let h = header(c, d);
            assert_eq!(parse(&h), Some((c, d, h.len())));
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
