//! The address allocator of the local provider: pure state, no I/O. It decides which
//! addresses a Service gets, honours requested addresses or refuses them (never silently
//! replaces them), shares an address between Services with the same key and disjoint ports,
//! and is rebuilt from Services' status after a restart (`restore`) so that no address is
//! ever handed out twice.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use kube::core::SelectorExt;

use super::ranges::{AddressRange, is_buggy};
use crate::{IpFamily, IpFamilyPolicy, LoadBalancerId, Protocol};
pub use ferry_model::pools::Pool;

/// Whether the pool's selectors admit the Service.
fn selects(pool: &Pool, req: &AllocationRequest) -> bool {
    pool.service_selector
        .as_ref()
        .is_none_or(|s| s.matches(&req.service_labels))
        && pool
            .namespace_selector
            .as_ref()
            .is_none_or(|s| s.matches(&req.namespace_labels))
}

fn has_selector(pool: &Pool) -> bool {
    pool.service_selector.is_some() || pool.namespace_selector.is_some()
}

/// What a Service asks of the allocator.
#[derive(Clone, Debug, Default)]
pub struct AllocationRequest {
    pub id: LoadBalancerId,
    pub service_labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    pub families: Vec<IpFamily>,
    pub policy: IpFamilyPolicy,
    pub requested: Vec<IpAddr>,
    pub pool: Option<String>,
    pub sharing_key: Option<String>,
    pub ports: Vec<(Protocol, u16)>,
    /// `externalTrafficPolicy: Local`; Services sharing an address must agree on it.
    pub local_traffic: bool,
}

/// An address given to a Service, and the pool it came from (if it is in one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub ip: IpAddr,
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{ip} is not in any address pool")]
    NotInAnyPool { ip: IpAddr },
    #[error("{ip} is in address pool {pool:?}, whose selectors do not match this Service")]
    NotSelected { ip: IpAddr, pool: String },
    #[error("{ip} is in address pool {pool:?}, not in the requested pool {requested:?}")]
    WrongPool {
        ip: IpAddr,
        pool: String,
        requested: String,
    },
    #[error("{ip} is in address pool {pool:?}, which is not ready (see its conditions)")]
    PoolNotReady { ip: IpAddr, pool: String },
    #[error(
        "{ip} is in address pool {pool:?}, which serves other loadBalancerClasses (its spec.loadBalancerClasses)"
    )]
    OtherClass { ip: IpAddr, pool: String },
    #[error("address pool {0:?} does not exist or is not ready")]
    UnknownPool(String),
    #[error("address pool {0:?} serves other loadBalancerClasses (its spec.loadBalancerClasses)")]
    ForeignPool(String),
    #[error("address pool {0:?} does not select this Service")]
    PoolNotSelecting(String),
    #[error(
        "{ip} is already used by {holder}; to share it, give both Services the same `ferry.dev/allow-shared-ip` key, ports that do not overlap and the same externalTrafficPolicy"
    )]
    InUse { ip: IpAddr, holder: String },
    #[error("no address pool with automatic assignment serves {family} for this Service")]
    NoPool { family: IpFamily },
    #[error("every address pool that serves {family} for this Service is exhausted")]
    Exhausted { family: IpFamily },
    #[error("{ip} is an {family} address; the Service asks for {wanted:?}")]
    FamilyMismatch {
        ip: IpAddr,
        family: IpFamily,
        wanted: Vec<IpFamily>,
    },
}

impl AllocError {
    /// CamelCase reason for the Service's condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotInAnyPool { .. } => "IPNotInAnyPool",
            Self::NotSelected { .. } | Self::PoolNotSelecting(_) => "PoolDoesNotSelectService",
            Self::WrongPool { .. } => "IPNotInRequestedPool",
            Self::PoolNotReady { .. } => "PoolNotReady",
            Self::OtherClass { .. } => "PoolOfAnotherClass",
            Self::UnknownPool(_) => "UnknownPool",
            Self::ForeignPool(_) => "PoolOfAnotherClass",
            Self::InUse { .. } => "IPInUse",
            Self::NoPool { .. } => "NoPoolForFamily",
            Self::Exhausted { .. } => "PoolExhausted",
            Self::FamilyMismatch { .. } => "IPFamilyMismatch",
        }
    }
}

#[derive(Clone, Debug)]
struct Holder {
    id: LoadBalancerId,
    sharing_key: Option<String>,
    ports: Vec<(Protocol, u16)>,
    local_traffic: bool,
}

impl Holder {
    fn of(req: &AllocationRequest) -> Self {
        Self {
            id: req.id.clone(),
            sharing_key: req.sharing_key.clone(),
            ports: req.ports.clone(),
            local_traffic: req.local_traffic,
        }
    }

    /// Two Services may hold one address when they opt in with the same key, agree on the
    /// traffic policy and no (protocol, port) pair is used by both.
    fn can_share_with(&self, other: &Holder) -> bool {
        match (&self.sharing_key, &other.sharing_key) {
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        self.local_traffic == other.local_traffic
            && !self.ports.iter().any(|p| other.ports.contains(p))
    }
}

/// Allocation state for every pool.
#[derive(Debug, Default)]
pub struct PoolAllocator {
    /// Valid pools, in preference order: pools with selectors (more specific) first, then
    /// by name.
    pools: Vec<Pool>,
    /// Parsed ranges of pools that exist but are not ready (overlapping, bad selector): their
    /// addresses stay with the Services holding them, but nothing new comes from them.
    unready: Vec<(String, Vec<AddressRange>)>,
    /// Pools of other classes: only named in errors.
    foreign: Vec<(String, Vec<AddressRange>)>,
    by_ip: BTreeMap<IpAddr, BTreeMap<String, Holder>>,
    by_service: HashMap<String, Vec<Assigned>>,
    /// Counts commits; each Service remembers the commit that gave it what it holds, so a
    /// repair pass can tell allocations made after it listed Services from leaks.
    epoch: u64,
    committed: HashMap<String, u64>,
}

impl PoolAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_pools(&mut self, mut pools: Vec<Pool>, unready: Vec<(String, Vec<AddressRange>)>) {
        pools.sort_by(|a, b| {
            has_selector(b)
                .cmp(&has_selector(a))
                .then_with(|| a.name.cmp(&b.name))
        });
        self.pools = pools;
        self.unready = unready;
    }

    /// Pools other instances allocate from, so that a request for one of their addresses
    /// is refused with the right reason.
    pub fn set_foreign(&mut self, foreign: Vec<(String, Vec<AddressRange>)>) {
        self.foreign = foreign;
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// What `uid` holds now.
    pub fn assigned(&self, uid: &str) -> Option<&[Assigned]> {
        self.by_service.get(uid).map(Vec::as_slice)
    }

    /// Every Service holding an address.
    pub fn holders(&self) -> Vec<LoadBalancerId> {
        let mut ids: Vec<_> = self
            .by_ip
            .values()
            .flat_map(|h| h.values().map(|h| h.id.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The Services holding `ip`.
    pub fn holders_of(&self, ip: &IpAddr) -> Vec<LoadBalancerId> {
        self.by_ip
            .get(ip)
            .map(|h| h.values().map(|h| h.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Distinct addresses held inside `pool`.
    pub fn allocated_in(&self, pool: &Pool) -> u128 {
        self.by_ip.keys().filter(|ip| pool.contains(ip)).count() as u128
    }

    fn pool_of(&self, ip: &IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.contains(ip))
    }

    fn unready_pool_of(&self, ip: &IpAddr) -> Option<&str> {
        self.unready
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|r| r.contains(ip)))
            .map(|(name, _)| name.as_str())
    }

    fn foreign_pool_of(&self, ip: &IpAddr) -> Option<&str> {
        self.foreign
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|r| r.contains(ip)))
            .map(|(name, _)| name.as_str())
    }

    /// Whether `ip` lies in one of this instance's pools, ready or not.
    pub fn is_ours(&self, ip: &IpAddr) -> bool {
        self.pool_of(ip).is_some() || self.unready_pool_of(ip).is_some()
    }

    /// Families to allocate, in order: those of the requested addresses, else as the
    /// Service's policy says. The second entry of a PreferDualStack Service is optional.
    fn wanted(req: &AllocationRequest) -> Vec<IpFamily> {
        if !req.requested.is_empty() {
            return req.requested.iter().map(IpFamily::of).collect();
        }
        let mut families = if req.families.is_empty() {
            vec![IpFamily::V4]
        } else {
            req.families.clone()
        };
        if req.policy == IpFamilyPolicy::SingleStack {
            families.truncate(1);
        }
        families
    }

    /// Whether another Service holding `ip` keeps `req` from holding it too.
    fn conflict(&self, ip: &IpAddr, req: &AllocationRequest) -> Option<&Holder> {
        let me = Holder::of(req);
        self.by_ip
            .get(ip)?
            .values()
            .find(|h| h.id.uid != req.id.uid && !me.can_share_with(h))
    }

    fn check_requested(&self, ip: IpAddr, req: &AllocationRequest) -> Result<Assigned, AllocError> {
        if !req.families.is_empty() && !req.families.contains(&IpFamily::of(&ip)) {
            return Err(AllocError::FamilyMismatch {
                ip,
                family: IpFamily::of(&ip),
                wanted: req.families.clone(),
            });
        }
        let Some(pool) = self.pool_of(&ip) else {
            return Err(
                match (self.unready_pool_of(&ip), self.foreign_pool_of(&ip)) {
                    (Some(pool), _) => AllocError::PoolNotReady {
                        ip,
                        pool: pool.to_string(),
                    },
                    (None, Some(pool)) => AllocError::OtherClass {
                        ip,
                        pool: pool.to_string(),
                    },
                    (None, None) => AllocError::NotInAnyPool { ip },
                },
            );
        };
        if let Some(requested) = &req.pool
            && requested != &pool.name
        {
            return Err(AllocError::WrongPool {
                ip,
                pool: pool.name.clone(),
                requested: requested.clone(),
            });
        }
        if !selects(pool, req) {
            return Err(AllocError::NotSelected {
                ip,
                pool: pool.name.clone(),
            });
        }
        if let Some(holder) = self.conflict(&ip, req) {
            return Err(AllocError::InUse {
                ip,
                holder: holder.id.to_string(),
            });
        }
        Ok(Assigned {
            ip,
            pool: Some(pool.name.clone()),
        })
    }

    fn candidate_pools(
        &self,
        req: &AllocationRequest,
        family: IpFamily,
    ) -> Result<Vec<&Pool>, AllocError> {
        let serves = |p: &&Pool| p.ranges.iter().any(|r| r.family() == family);
        if let Some(name) = &req.pool {
            let pool = self.pools.iter().find(|p| &p.name == name).ok_or_else(|| {
                if self.foreign.iter().any(|(n, _)| n == name) {
                    AllocError::ForeignPool(name.clone())
                } else {
                    AllocError::UnknownPool(name.clone())
                }
            })?;
            if !selects(pool, req) {
                return Err(AllocError::PoolNotSelecting(name.clone()));
            }
            return Ok([pool].into_iter().filter(serves).collect());
        }
        Ok(self
            .pools
            .iter()
            .filter(|p| p.auto_assign && selects(p, req))
            .filter(serves)
            .collect())
    }

    fn pick(&self, req: &AllocationRequest, family: IpFamily) -> Result<Assigned, AllocError> {
        let pools = self.candidate_pools(req, family)?;
        if pools.is_empty() {
            return Err(AllocError::NoPool { family });
        }
        let me = Holder::of(req);
        // An address already shared under our key comes first: that is what the key is for.
        if req.sharing_key.is_some() {
            for (ip, holders) in &self.by_ip {
                let others: Vec<_> = holders
                    .values()
                    .filter(|h| h.id.uid != req.id.uid)
                    .collect();
                if IpFamily::of(ip) == family
                    && !others.is_empty()
                    && others.iter().all(|h| me.can_share_with(h))
                    && let Some(pool) = pools.iter().find(|p| p.contains(ip))
                {
                    return Ok(Assigned {
                        ip: *ip,
                        pool: Some(pool.name.clone()),
                    });
                }
            }
        }
        for pool in pools {
            for range in pool.ranges.iter().filter(|r| r.family() == family) {
                if let Some(ip) = self.first_free(range, pool.avoid_buggy_ips, &req.id.uid) {
                    return Ok(Assigned {
                        ip,
                        pool: Some(pool.name.clone()),
                    });
                }
            }
        }
        Err(AllocError::Exhausted { family })
    }

    /// The lowest address of `range` nobody but `uid` holds. Walks the held addresses of the
    /// range in order alongside a cursor, so the cost is the number of held addresses below
    /// the first gap, not a map lookup per address.
    fn first_free(&self, range: &AddressRange, avoid_buggy: bool, uid: &str) -> Option<IpAddr> {
        let mut cursor = Some(range.first());
        let mut held = self
            .by_ip
            .range(range.first()..=range.last())
            .filter(|(_, h)| h.keys().any(|holder| holder != uid))
            .map(|(ip, _)| *ip)
            .peekable();
        while let Some(ip) = cursor {
            while held.next_if(|h| *h < ip).is_some() {}
            let taken = held.peek() == Some(&ip);
            let skipped = avoid_buggy && is_buggy(&ip);
            if !taken && !skipped {
                return Some(ip);
            }
            cursor = range.next_after(&ip);
        }
        None
    }

    /// Whether what `req` holds still satisfies it, so a Service keeps its address.
    fn still_valid(&self, req: &AllocationRequest, current: &[Assigned]) -> bool {
        let wanted = Self::wanted(req);
        let held: Vec<IpFamily> = current.iter().map(|a| IpFamily::of(&a.ip)).collect();
        let families_ok =
            if req.requested.is_empty() && req.policy == IpFamilyPolicy::PreferDualStack {
                held.first() == wanted.first() && held.iter().all(|f| wanted.contains(f))
            } else {
                held == wanted
            };
        if !families_ok {
            return false;
        }
        if !req.requested.is_empty() {
            let mut a: Vec<_> = current.iter().map(|a| a.ip).collect();
            let mut b = req.requested.clone();
            a.sort();
            b.sort();
            if a != b {
                return false;
            }
        }
        current.iter().all(|a| {
            let in_pool = match self.pool_of(&a.ip) {
                Some(pool) => {
                    selects(pool, req) && req.pool.as_ref().is_none_or(|n| n == &pool.name)
                }
                // Held in a pool that exists but is not ready: keep it rather than take
                // addresses away because of an edit elsewhere in the pool.
                None => self
                    .unready_pool_of(&a.ip)
                    .is_some_and(|name| req.pool.as_ref().is_none_or(|n| n == name)),
            };
            in_pool && self.conflict(&a.ip, req).is_none()
        })
    }

    /// Gives `req` its addresses: what it already holds if that still fits, else a fresh
    /// choice. On error nothing changes, so a Service keeps what it had.
    pub fn allocate(&mut self, req: &AllocationRequest) -> Result<Vec<Assigned>, AllocError> {
        if let Some(current) = self.by_service.get(&req.id.uid).cloned()
            && self.still_valid(req, &current)
        {
            let mut result = current;
            // A PreferDualStack Service that got one family may get the other later.
            if req.requested.is_empty() && req.policy == IpFamilyPolicy::PreferDualStack {
                for family in Self::wanted(req) {
                    if !result.iter().any(|a| IpFamily::of(&a.ip) == family)
                        && let Ok(extra) = self.pick(req, family)
                    {
                        result.push(extra);
                    }
                }
            }
            self.commit(req, result.clone());
            return Ok(result);
        }
        let plan = self.plan(req)?;
        self.commit(req, plan.clone());
        Ok(plan)
    }

    fn plan(&self, req: &AllocationRequest) -> Result<Vec<Assigned>, AllocError> {
        if !req.requested.is_empty() {
            return req
                .requested
                .iter()
                .map(|ip| self.check_requested(*ip, req))
                .collect();
        }
        let wanted = Self::wanted(req);
        let mut plan = Vec::new();
        for (i, family) in wanted.iter().enumerate() {
            match self.pick(req, *family) {
                Ok(a) => plan.push(a),
                Err(_) if i > 0 && req.policy == IpFamilyPolicy::PreferDualStack => {}
                Err(e) => return Err(e),
            }
        }
        Ok(plan)
    }

    /// The number of the last commit.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The commit that gave `uid` what it holds.
    pub fn committed_at(&self, uid: &str) -> Option<u64> {
        self.committed.get(uid).copied()
    }

    fn commit(&mut self, req: &AllocationRequest, assigned: Vec<Assigned>) {
        self.release(&req.id.uid);
        self.epoch += 1;
        self.committed.insert(req.id.uid.clone(), self.epoch);
        for a in &assigned {
            self.by_ip
                .entry(a.ip)
                .or_default()
                .insert(req.id.uid.clone(), Holder::of(req));
        }
        self.by_service.insert(req.id.uid.clone(), assigned);
    }

    /// Frees what `uid` holds; returns whether it held anything.
    pub fn release(&mut self, uid: &str) -> bool {
        self.committed.remove(uid);
        let Some(assigned) = self.by_service.remove(uid) else {
            return false;
        };
        for a in assigned {
            if let Some(holders) = self.by_ip.get_mut(&a.ip) {
                holders.remove(uid);
                if holders.is_empty() {
                    self.by_ip.remove(&a.ip);
                }
            }
        }
        true
    }

    /// Records addresses a Service already has (from its status) when state is rebuilt.
    /// Refuses, changing nothing, when another Service that cannot share already holds one:
    /// callers restore the oldest Services first so the first holder keeps its address.
    pub fn restore(&mut self, req: &AllocationRequest, ips: &[IpAddr]) -> Result<(), AllocError> {
        for ip in ips {
            if let Some(holder) = self.conflict(ip, req) {
                return Err(AllocError::InUse {
                    ip: *ip,
                    holder: holder.id.to_string(),
                });
            }
        }
        let assigned = ips
            .iter()
            .map(|ip| Assigned {
                ip: *ip,
                pool: self.pool_of(ip).map(|p| p.name.clone()),
            })
            .collect();
        self.commit(req, assigned);
        Ok(())
    }

    /// Forgets everything, before a rebuild.
    pub fn clear(&mut self) {
        self.by_ip.clear();
        self.by_service.clear();
        self.committed.clear();
    }
}

#[cfg(test)]
#[path = "ipam_tests.rs"]
mod tests;
