//! Address ranges as written in a pool (`192.0.2.0/28`, `192.0.2.10-192.0.2.20`, IPv6 alike):
//! parsing with errors a user can act on, counting, membership, and walking them in order.
//! Addresses are handled as `u128` offsets so both families share one arithmetic.
//!
//! An IPv6 CIDR leaves out its first address, the subnet-router anycast address (RFC 4291
//! 2.6.1), which routers on the link answer; a /127 or /128 keeps it (RFC 6164), and so does
//! an explicit `first-last` range that starts there, which says exactly what it means.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::IpFamily;

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressRange {
    first: IpAddr,
    last: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is neither a CIDR nor a first-last range")]
    Syntax(String),
    #[error("{input:?} has host bits set; did you mean {network}?")]
    HostBits { input: String, network: IpNet },
    #[error("{0:?} mixes IPv4 and IPv6")]
    MixedFamilies(String),
    #[error("{0:?} ends before it starts")]
    Reversed(String),
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(family: IpFamily, n: u128) -> IpAddr {
    match family {
        // Offsets stay within the range, whose ends are IPv4, so this never truncates.
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// `.0` and `.255` IPv4 addresses, which some clients and routers mishandle.
pub fn is_buggy(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

impl AddressRange {
    pub fn new(first: IpAddr, last: IpAddr) -> Option<Self> {
        (IpFamily::of(&first) == IpFamily::of(&last) && to_u128(first) <= to_u128(last))
            .then_some(Self { first, last })
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.first)
    }

    pub fn first(&self) -> IpAddr {
        self.first
    }

    pub fn last(&self) -> IpAddr {
        self.last
    }

    /// Number of addresses, saturating for a whole IPv6 space.
    pub fn len(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Addresses that `avoidBuggyIPs` skips inside this range.
    pub fn buggy_count(&self) -> u128 {
        if self.family() != IpFamily::V4 {
            return 0;
        }
        // Count x in [a, b] with x % 256 in {0, 255}.
        let (a, b) = (to_u128(self.first), to_u128(self.last));
        let upto = |n: u128| -> u128 {
            // Numbers in [0, n] congruent to 0 and to 255 modulo 256.
            (n / 256 + 1) + if n >= 255 { (n - 255) / 256 + 1 } else { 0 }
        };
        upto(b) - if a == 0 { 0 } else { upto(a - 1) }
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self.family()
            && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(*ip))
    }

    pub fn overlaps(&self, other: &AddressRange) -> bool {
        self.family() == other.family()
            && to_u128(self.first) <= to_u128(other.last)
            && to_u128(other.first) <= to_u128(self.last)
    }

    /// The address after `ip` inside the range, if any.
    pub fn next_after(&self, ip: &IpAddr) -> Option<IpAddr> {
        let n = to_u128(*ip);
        (n < to_u128(self.last)).then(|| from_u128(self.family(), n + 1))
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for AddressRange {
    type Err = RangeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if let Some((first, last)) = s.split_once('-') {
            let parse = |p: &str| {
                p.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| RangeError::Syntax(input.to_string()))
            };
            let (first, last) = (parse(first)?, parse(last)?);
            if IpFamily::of(&first) != IpFamily::of(&last) {
                return Err(RangeError::MixedFamilies(input.to_string()));
            }
            return Self::new(first, last).ok_or_else(|| RangeError::Reversed(input.to_string()));
        }
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|_| RangeError::Syntax(input.to_string()))?;
            if net.trunc() != net {
                return Err(RangeError::HostBits {
                    input: input.to_string(),
                    network: net.trunc(),
                });
            }
            let first = match net {
                IpNet::V6(v6) if v6.prefix_len() <= 126 => {
                    IpAddr::V6(Ipv6Addr::from(u128::from(v6.network()) + 1))
                }
                _ => net.network(),
            };
            return Ok(Self {
                first,
                last: net.broadcast(),
            });
        }
        // A bare address is a range of one.
        let ip: IpAddr = s
            .parse()
            .map_err(|_| RangeError::Syntax(input.to_string()))?;
        Ok(Self {
            first: ip,
            last: ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> AddressRange {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cidrs_ranges_and_single_addresses() {
        assert_eq!(r("192.0.2.0/30").len(), 4);
        assert_eq!(r("192.0.2.0/30").first(), ip("192.0.2.0"));
        assert_eq!(r("192.0.2.0/30").last(), ip("192.0.2.3"));
        assert_eq!(r("192.0.2.10 - 192.0.2.20").len(), 11);
        assert_eq!(r("2001:db8::/120").len(), 255);
        assert_eq!(r("2001:db8::/64").len(), (1 << 64) - 1);
        assert_eq!(r("::/0").len(), u128::MAX);
        assert_eq!(r("192.0.2.7").len(), 1);
    }

    #[test]
    fn an_ipv6_cidr_leaves_out_its_subnet_router_anycast_address() {
        assert_eq!(r("2001:db8::/120").first(), ip("2001:db8::1"));
        assert!(!r("2001:db8::/120").contains(&ip("2001:db8::")));
        assert_eq!(r("2001:db8::/120").last(), ip("2001:db8::ff"));
        // Point-to-point and single addresses keep it; so does a range that names it.
        assert_eq!(r("2001:db8::/127").first(), ip("2001:db8::"));
        assert_eq!(r("2001:db8::/128").len(), 1);
        assert_eq!(r("2001:db8::-2001:db8::ff").first(), ip("2001:db8::"));
        // IPv4 networks are whole (avoidBuggyIPs is the knob there).
        assert_eq!(r("192.0.2.0/24").first(), ip("192.0.2.0"));
    }

    #[test]
    fn refuses_malformed_ranges_with_a_reason() {
        assert!(matches!(
            "192.0.2.0/33".parse::<AddressRange>(),
            Err(RangeError::Syntax(_))
        ));
        assert!(matches!(
            "banana".parse::<AddressRange>(),
            Err(RangeError::Syntax(_))
        ));
        assert!(matches!(
            "192.0.2.5/24".parse::<AddressRange>(),
            Err(RangeError::HostBits { .. })
        ));
        assert!(matches!(
            "192.0.2.9-192.0.2.1".parse::<AddressRange>(),
            Err(RangeError::Reversed(_))
        ));
        assert!(matches!(
            "192.0.2.1-2001:db8::1".parse::<AddressRange>(),
            Err(RangeError::MixedFamilies(_))
        ));
        let err = "192.0.2.5/24".parse::<AddressRange>().unwrap_err();
        assert!(err.to_string().contains("192.0.2.0/24"), "{err}");
    }

    #[test]
    fn overlap_and_containment() {
        assert!(r("192.0.2.0/24").overlaps(&r("192.0.2.255-192.0.3.4")));
        assert!(!r("192.0.2.0/25").overlaps(&r("192.0.2.128/25")));
        assert!(!r("192.0.2.0/24").overlaps(&r("2001:db8::/120")));
        assert!(r("2001:db8::/120").contains(&ip("2001:db8::ff")));
        assert!(!r("2001:db8::/120").contains(&ip("192.0.2.1")));
    }

    #[test]
    fn counts_buggy_addresses() {
        assert_eq!(r("192.0.2.0/24").buggy_count(), 2);
        assert_eq!(r("192.0.2.1-192.0.2.254").buggy_count(), 0);
        assert_eq!(r("192.0.2.0/23").buggy_count(), 4);
        assert_eq!(r("0.0.0.0/32").buggy_count(), 1);
        assert_eq!(r("192.0.2.255-192.0.3.0").buggy_count(), 2);
        assert_eq!(r("2001:db8::/120").buggy_count(), 0);
        // Brute-force check on an odd range.
        let range = r("10.0.0.200-10.0.3.7");
        let mut n = 0;
        let mut cur = Some(range.first());
        while let Some(c) = cur {
            n += u128::from(is_buggy(&c));
            cur = range.next_after(&c);
        }
        assert_eq!(range.buggy_count(), n);
    }
}
