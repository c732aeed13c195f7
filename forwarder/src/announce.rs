//! Holding VIPs on the node's interface over netlink: the owner adds each VIP it holds as a
//! host address (/32 or /128, IPv6 without duplicate address detection, so it is usable at
//! once), marked with ferry's address protocol number (`ip addr` shows `proto 102`), and
//! announces it on the link. Every other address carrying that mark is removed, which is how
//! a node that lost a VIP, or restarted after a crash, stops answering for it. Addresses
//! without the mark are never touched, even inside a pool: they are another program's (a
//! keepalived or kube-vip API-server VIP), and so are the node's own.
//!
//! **A dead forwarder's VIPs die with it.** Each VIP is added with a finite lifetime
//! (`valid_lft`/`preferred_lft`, `Announcer::lifetime`), which a task of the live forwarder
//! renews every quarter of it; a forwarder that is killed (OOM, SIGKILL) stops renewing, and
//! the kernel removes its VIPs when the lifetime runs out, so the dead node stops answering
//! ARP beside the new owner. Netlink calls are serialized (a renewal never puts back a VIP
//! just withdrawn) and each is bounded by a timeout.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol, CacheInfo,
};
use tokio::sync::Mutex;
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
    #[error("netlink did not answer within {0:?}")]
    TimedOut(Duration),
}

/// How long one netlink call may take.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(3);

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, AnnounceError> {
    tokio::time::timeout(NETLINK_TIMEOUT, call)
        .await
        .map_err(|_| AnnounceError::TimedOut(NETLINK_TIMEOUT))?
        .map_err(AnnounceError::from)
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
    /// How long a VIP lives on the interface unless renewed.
    pub lifetime: Duration,
    /// What the interface should hold; the lock also serializes every change to it.
    want: Arc<Mutex<BTreeSet<IpAddr>>>,
    refresher: Option<JoinHandle<()>>,
}

impl Drop for Announcer {
    fn drop(&mut self) {
        if let Some(r) = &self.refresher {
            r.abort();
        }
        self.connection.abort();
    }
}

impl Announcer {
    /// Opens netlink and finds the interface: `name` if given, else the one holding one of
    /// `node_ips`. VIPs it adds live `lifetime` unless renewed (whole seconds, at least 2).
    pub async fn new(
        name: Option<&str>,
        node_ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<Self, AnnounceError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = tokio::spawn(connection);
        let index = match name {
            Some(name) => {
                index_of(name).ok_or_else(|| AnnounceError::UnknownInterface(name.to_string()))?
            }
            None => {
                let all: Vec<AddressMessage> =
                    bounded(handle.address().get().execute().try_collect()).await?;
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
        let mut me = Self {
            handle,
            connection,
            interface: Interface {
                mac: mac_of(&name),
                name,
                index,
            },
            protected: node_ips.to_vec(),
            lifetime: Duration::from_secs(lifetime.as_secs().max(2)),
            want: Arc::default(),
            refresher: None,
        };
        me.refresher = Some(me.spawn_refresher());
        Ok(me)
    }

    /// Renews the lifetime of every VIP held, every quarter of it.
    fn spawn_refresher(&self) -> JoinHandle<()> {
        let (handle, want, index, lifetime) = (
            self.handle.clone(),
            self.want.clone(),
            self.interface.index,
            self.lifetime,
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lifetime / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let want = want.lock().await;
                for ip in want.iter() {
                    if let Err(err) = add(&handle, index, *ip, lifetime, true).await {
                        warn!(vip = %ip, error = %err, "cannot renew the VIP's lifetime");
                    }
                }
            }
        })
    }

    /// Addresses on the interface that ferry added: those carrying its mark.
    async fn held(&self) -> Result<Vec<(IpAddr, AddressMessage)>, AnnounceError> {
        let msgs: Vec<AddressMessage> = bounded(
            self.handle
                .address()
                .get()
                .set_link_index_filter(self.interface.index)
                .execute()
                .try_collect(),
        )
        .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| Some((address_of(&m)?, m)))
            .filter(|(ip, m)| {
                m.header.prefix_len == host_prefix(ip)
                    && is_ferrys(m)
                    && !self.protected.contains(ip)
            })
            .collect())
    }

    /// Makes the interface hold exactly `want` among ferry's addresses; returns the VIPs added.
    pub async fn sync(&self, want: &BTreeSet<IpAddr>) -> Result<Vec<IpAddr>, AnnounceError> {
        let mut wanted = self.want.lock().await;
        // What is withdrawn is not renewed any more, even if a step below fails.
        wanted.retain(|ip| want.contains(ip));
        let held = self.held().await?;
        for (ip, msg) in &held {
            if !want.contains(ip) {
                bounded(self.handle.address().del(msg.clone()).execute()).await?;
                info!(vip = %ip, interface = %self.interface.name, "withdrew VIP");
            }
        }
        let mut added = Vec::new();
        for ip in want {
            if held.iter().any(|(h, _)| h == ip) || self.protected.contains(ip) {
                wanted.insert(*ip);
                continue;
            }
            add(
                &self.handle,
                self.interface.index,
                *ip,
                self.lifetime,
                false,
            )
            .await?;
            wanted.insert(*ip);
            info!(vip = %ip, interface = %self.interface.name, lifetime = ?self.lifetime, "holding VIP");
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

/// Adds `ip` to interface `index` as a ferry VIP living `lifetime` (`renew`: replacing the
/// one there, which resets its lifetime).
async fn add(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    lifetime: Duration,
    renew: bool,
) -> Result<(), AnnounceError> {
    let mut req = handle.address().add(index, ip, host_prefix(&ip));
    if renew {
        req = req.replace();
    }
    let seconds = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let mut cache = CacheInfo::default();
    // An IPv6 VIP is deprecated from the start (preferred for nothing, valid for its
    // lifetime): it still receives, but the kernel never picks it as the source of the
    // node's own connections, as it otherwise would (a /128 beats the node's /64).
    cache.ifa_preferred = if ip.is_ipv6() { 0 } else { seconds };
    cache.ifa_valid = seconds;
    let msg = req.message_mut();
    msg.attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(
            FERRY_ADDRESS_PROTOCOL,
        )));
    msg.attributes.push(AddressAttribute::CacheInfo(cache));
    if ip.is_ipv6() {
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match bounded(req.execute()).await {
        Ok(()) => Ok(()),
        // Added meanwhile (by a previous, interrupted pass): fine.
        Err(AnnounceError::Netlink(rtnetlink::Error::NetlinkError(e)))
            if e.raw_code() == -libc::EEXIST =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
