//! Telling the link a VIP has moved here: a gratuitous ARP (IPv4; a request and a reply, as
//! `arping -U` and `-A` send them, since stacks differ in which they honour) or an
//! unsolicited neighbour advertisement with the override flag (IPv6, RFC 4861 7.2.6).
//! Packets are built by pure functions and sent from an `AF_PACKET` or raw ICMPv6 socket.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// The 28-byte ARP payload announcing that `ip` is at `mac`.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr, operation: u16) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&operation.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // A reply names the sender as target too; a request leaves the target MAC zero.
    if operation == ARP_REPLY {
        p[18..24].copy_from_slice(&mac);
    }
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// The 32-byte ICMPv6 neighbour advertisement for `target` at `mac` (checksum left to the
/// kernel, which fills it on raw ICMPv6 sockets).
pub fn neighbour_advertisement(mac: [u8; 6], target: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // Neighbor Advertisement
    p[4] = 0x20; // Override
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // Target Link-Layer Address option
    p[25] = 1; // in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to<A>(fd: &OwnedFd, payload: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: `payload` and `addr` are valid for the lengths given for the whole call.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (addr as *const A).cast(),
            size_of::<A>() as libc::socklen_t,
        ) as libc::c_int
    })
    .map(drop)
}

fn send_arp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_DGRAM,
        i32::from(ETH_P_ARP.to_be()),
    )?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for op in [ARP_REQUEST, ARP_REPLY] {
        send_to(&fd, &gratuitous_arp(mac, ip, op), &addr)?;
    }
    Ok(())
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives for the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn send_na(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    // Neighbour discovery is only accepted with a hop limit of 255.
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
    set_int(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_IF,
        ifindex as i32,
    )?;
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid start.
    let mut src: libc::sockaddr_in6 = unsafe { zeroed() };
    src.sin6_family = libc::AF_INET6 as u16;
    src.sin6_addr.s6_addr = ip.octets();
    // Sent from the VIP itself (added without DAD, so it is usable at once).
    // SAFETY: `src` is a valid sockaddr_in6 for the call.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&src as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    let mut dst: libc::sockaddr_in6 = unsafe { zeroed() };
    dst.sin6_family = libc::AF_INET6 as u16;
    dst.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    dst.sin6_scope_id = ifindex;
    send_to(&fd, &neighbour_advertisement(mac, ip), &dst)
}

/// Announces `ip` at `mac` on interface `ifindex`.
pub fn announce(ifindex: u32, mac: [u8; 6], ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(v4) => send_arp(ifindex, mac, v4),
        IpAddr::V6(v6) => send_na(ifindex, mac, v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];

    #[test]
    fn gratuitous_arp_request_and_reply() {
        let req = gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 10), ARP_REQUEST);
        assert_eq!(&req[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[8..14], &MAC);
        assert_eq!(&req[14..18], &[192, 0, 2, 10]);
        assert_eq!(&req[18..24], &[0; 6]);
        assert_eq!(&req[24..28], &[192, 0, 2, 10]);
        let reply = gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 10), ARP_REPLY);
        assert_eq!(&reply[6..8], &[0, 2]);
        assert_eq!(&reply[18..24], &MAC);
    }

    #[test]
    fn unsolicited_neighbour_advertisement_overrides() {
        let target: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let na = neighbour_advertisement(MAC, target);
        assert_eq!(na[0], 136);
        assert_eq!(
            na[4] & 0xe0,
            0x20,
            "override set, solicited and router clear"
        );
        assert_eq!(&na[8..24], &target.octets());
        assert_eq!(&na[24..26], &[2, 1]);
        assert_eq!(&na[26..32], &MAC);
    }
}
