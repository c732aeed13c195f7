//! An in-memory provider for tests of code that drives providers: it records calls, hands
//! out addresses from 203.0.113.0/24 (or a hostname) and fails on demand.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{
    DesiredLoadBalancer, ForeignResource, Ingress, IpMode, LoadBalancerId, LoadBalancerProvider,
    ObservedLoadBalancer, Owned, ProviderError, ProviderSignal,
};

/// A recorded call, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Ensure(String),
    UpdateTargets(String, Vec<String>),
    Delete(String),
}

#[derive(Default)]
struct State {
    balancers: BTreeMap<LoadBalancerId, ObservedLoadBalancer>,
    calls: Vec<Call>,
    fail_next: Vec<ProviderError>,
    foreign: Vec<ForeignResource>,
    next_octet: u8,
    delay: std::time::Duration,
}

/// A Service annotated with this gets its value back as a provider notice.
pub const NOTICE_ANNOTATION: &str = "fake.ferry.dev/notice";

pub struct FakeProvider {
    state: Mutex<State>,
    hostnames: bool,
    signals: Mutex<Option<mpsc::Receiver<ProviderSignal>>>,
    signal_tx: mpsc::Sender<ProviderSignal>,
}

impl Default for FakeProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProvider {
    pub fn new() -> Self {
        let (signal_tx, rx) = mpsc::channel(16);
        Self {
            state: Mutex::new(State {
                next_octet: 1,
                ..State::default()
            }),
            hostnames: false,
            signals: Mutex::new(Some(rx)),
            signal_tx,
        }
    }

    /// Publishes DNS names instead of addresses, as an NLB does.
    pub fn with_hostnames() -> Self {
        Self {
            hostnames: true,
            ..Self::new()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every `ensure` takes this long, as a cloud does.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.state().delay = delay;
    }

    /// The next call fails with `err`.
    pub fn fail_next(&self, err: ProviderError) {
        self.state().fail_next.push(err);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn balancers(&self) -> Vec<LoadBalancerId> {
        self.state().balancers.keys().cloned().collect()
    }

    /// Pretends another cluster (same cluster id, other identity) has a balancer.
    pub fn insert_foreign(&self, foreign: ForeignResource) {
        self.state().foreign.push(foreign);
    }

    /// Pretends a balancer exists that no Service claims.
    pub fn insert_orphan(&self, id: LoadBalancerId) {
        self.state()
            .balancers
            .insert(id, ObservedLoadBalancer::default());
    }

    pub async fn signal(&self, signal: ProviderSignal) {
        let _ = self.signal_tx.send(signal).await;
    }

    fn take_failure(&self) -> Result<(), ProviderError> {
        let mut state = self.state();
        if state.fail_next.is_empty() {
            Ok(())
        } else {
            Err(state.fail_next.remove(0))
        }
    }
}

#[async_trait]
impl LoadBalancerProvider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn ensure(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        let delay = {
            let mut state = self.state();
            state.calls.push(Call::Ensure(desired.id.to_string()));
            state.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.take_failure()?;
        let hostnames = self.hostnames;
        let mut state = self.state();
        if let Some(existing) = state.balancers.get(&desired.id) {
            return Ok(existing.clone());
        }
        let octet = state.next_octet;
        state.next_octet = state.next_octet.wrapping_add(1);
        let ingress = if hostnames {
            Ingress::hostname(format!("{}-{}.elb.example.com", desired.id.name, octet))
        } else {
            let ip = desired
                .requested_ips
                .first()
                .copied()
                .unwrap_or(IpAddr::V4(Ipv4Addr::new(203, 0, 113, octet)));
            Ingress::ip(ip, IpMode::Proxy)
        };
        let observed = ObservedLoadBalancer {
            ingress: vec![ingress],
            port_errors: Vec::new(),
            notices: desired
                .annotations
                .get(NOTICE_ANNOTATION)
                .cloned()
                .into_iter()
                .collect(),
        };
        state.balancers.insert(desired.id.clone(), observed.clone());
        Ok(observed)
    }

    async fn update_targets(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        let targets = desired.targets.iter().map(|t| t.name.clone()).collect();
        self.state()
            .calls
            .push(Call::UpdateTargets(desired.id.to_string(), targets));
        self.take_failure()?;
        self.state()
            .balancers
            .get(&desired.id)
            .cloned()
            .ok_or_else(|| ProviderError::transient("no such balancer"))
    }

    async fn delete(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
        self.state().calls.push(Call::Delete(id.to_string()));
        self.take_failure()?;
        self.state().balancers.remove(id);
        Ok(())
    }

    async fn get(
        &self,
        id: &LoadBalancerId,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        Ok(self.state().balancers.get(id).cloned())
    }

    async fn list_owned(&self) -> Result<Owned, ProviderError> {
        Ok(Owned {
            ours: self.balancers(),
            foreign: self.state().foreign.clone(),
        })
    }

    fn take_signals(&self) -> Option<mpsc::Receiver<ProviderSignal>> {
        self.signals.lock().ok().and_then(|mut s| s.take())
    }
}
