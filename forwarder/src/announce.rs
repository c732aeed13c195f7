//! Holding VIPs on the node's interface over netlink: the owner adds each VIP it holds as a
//! host address (/32 or /128, IPv6 without duplicate address detection, so it is usable at
//! once), marked with ferry's address protocol number, and announces it on the link. Every
//! other ferry address on the interface is removed — marked ones, and host addresses inside a
//! pool (for kernels that drop the mark) — which is how a node that lost a VIP, restarted
//! after a crash, or saw its pool deleted stops answering for it. The node's own addresses
//! are never touched.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ferry_providers::local::ipam::Pool;
use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::neighbour;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no interface holds the node's address {0}")]
    NoInterface(String),
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
}

/// The interface VIPs are added to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
}

fn mac_of(name: &str) -> [u8; 6] {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
    let mut mac = [0u8; 6];
    for (i, part) in text.trim().split(':').take(6).enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap_or(0);
    }
    mac
}

fn index_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the address itself on point-to-point links, IFA_ADDRESS elsewhere.
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

/// `IFA_PROTO` of the addresses ferry adds (`ip addr` shows `proto 102`): user-defined
/// values are free, and 102 is `f`.
const FERRY_ADDRESS_PROTOCOL: u8 = 102;

fn is_ferrys(msg: &AddressMessage) -> bool {
    msg.attributes.iter().any(|a| {
        matches!(
            a,
            AddressAttribute::Protocol(AddressProtocol::Other(FERRY_ADDRESS_PROTOCOL))
        )
    })
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

pub struct Announcer {
    handle: Handle,
    connection: JoinHandle<()>,
    pub interface: Interface,
    /// Addresses never removed: the node's own.
    protected: Vec<IpAddr>,
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Announcer {
    /// Opens netlink and finds the interface: `name` if given, else the one holding one of
    /// `node_ips`.
    pub async fn new(name: Option<&str>, node_ips: &[IpAddr]) -> Result<Self, AnnounceError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = tokio::spawn(connection);
        let index = match name {
            Some(name) => {
                index_of(name).ok_or_else(|| AnnounceError::UnknownInterface(name.to_string()))?
            }
            None => {
                let all: Vec<AddressMessage> =
                    handle.address().get().execute().try_collect().await?;
                all.iter()
                    .find(|m| address_of(m).is_some_and(|ip| node_ips.contains(&ip)))
                    .map(|m| m.header.index)
                    .ok_or_else(|| {
                        AnnounceError::NoInterface(
                            node_ips
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                        )
                    })?
            }
        };
        let name =
            name_of(index).ok_or_else(|| AnnounceError::UnknownInterface(index.to_string()))?;
        Ok(Self {
            handle,
            connection,
            interface: Interface {
                mac: mac_of(&name),
                name,
                index,
            },
            protected: node_ips.to_vec(),
        })
    }

    /// Addresses on the interface that are ferry's: marked as such, or host addresses in a
    /// pool.
    async fn held(&self, pools: &[Pool]) -> Result<Vec<(IpAddr, AddressMessage)>, AnnounceError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.interface.index)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| Some((address_of(&m)?, m)))
            .filter(|(ip, m)| {
                m.header.prefix_len == host_prefix(ip)
                    && (is_ferrys(m) || pools.iter().any(|p| p.contains(ip)))
                    && !self.protected.contains(ip)
            })
            .collect())
    }

    /// Makes the interface hold exactly `want` among ferry's addresses; returns the VIPs added.
    pub async fn sync(
        &self,
        want: &BTreeSet<IpAddr>,
        pools: &[Pool],
    ) -> Result<Vec<IpAddr>, AnnounceError> {
        let held = self.held(pools).await?;
        for (ip, msg) in &held {
            if !want.contains(ip) {
                self.handle.address().del(msg.clone()).execute().await?;
                info!(vip = %ip, interface = %self.interface.name, "withdrew VIP");
            }
        }
        let mut added = Vec::new();
        for ip in want {
            if held.iter().any(|(h, _)| h == ip) || self.protected.contains(ip) {
                continue;
            }
            let mut req = self
                .handle
                .address()
                .add(self.interface.index, *ip, host_prefix(ip));
            req.message_mut()
                .attributes
                .push(AddressAttribute::Protocol(AddressProtocol::Other(
                    FERRY_ADDRESS_PROTOCOL,
                )));
            if ip.is_ipv6() {
                let msg = req.message_mut();
                msg.header.flags |= AddressHeaderFlags::Nodad;
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            match req.execute().await {
                Ok(()) => {}
                // Added meanwhile (by a previous, interrupted pass): fine.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(e.into()),
            }
            info!(vip = %ip, interface = %self.interface.name, "holding VIP");
            added.push(*ip);
        }
        Ok(added)
    }

    /// Announces `ips` now and twice more over the next second, so a lost first packet or a
    /// switch still learning does not leave clients on the old owner.
    pub fn announce(&self, ips: Vec<IpAddr>, on_sent: impl Fn(usize) + Send + 'static) {
        if ips.is_empty() {
            return;
        }
        let (index, mac) = (self.interface.index, self.interface.mac);
        tokio::spawn(async move {
            for delay in [
                Duration::ZERO,
                Duration::from_millis(300),
                Duration::from_millis(700),
            ] {
                tokio::time::sleep(delay).await;
                let mut sent = 0;
                for ip in &ips {
                    match neighbour::announce(index, mac, *ip) {
                        Ok(()) => sent += 1,
                        Err(err) => warn!(vip = %ip, error = %err, "cannot announce VIP"),
                    }
                }
                debug!(count = sent, "announced VIPs");
                on_sent(sent);
            }
        });
    }
}
