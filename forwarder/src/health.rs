//! Active health checks of the backends (node NodePorts) the plan forwards to: a TCP connect,
//! or `GET /healthz` on the node's `healthCheckNodePort` for `externalTrafficPolicy: Local`.
//! A backend is taken out after `FALL` failures in a row and back in after one success; when
//! every backend of a frontend is out, all are used (failing open beats refusing everyone
//! on a checker's mistake).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::plan::{Frontend, HealthCheck};

/// Consecutive failures that take a backend out.
const FALL: u32 = 2;

/// One thing to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    Connect(SocketAddr),
    Http(SocketAddr),
}

/// The probe deciding whether `backend` of `frontend` gets traffic.
pub fn probe_for(frontend: &Frontend, backend: SocketAddr) -> Option<Probe> {
    match frontend.health {
        HealthCheck::None => None,
        HealthCheck::Connect => Some(Probe::Connect(backend)),
        HealthCheck::Http { ip, port } => Some(Probe::Http(SocketAddr::new(ip, port))),
    }
}

/// Every probe the frontends need.
pub fn probes(frontends: &[Frontend]) -> BTreeSet<Probe> {
    frontends
        .iter()
        .flat_map(|f| f.backends.iter().filter_map(|b| probe_for(f, *b)))
        .collect()
}

/// The frontends with their backends narrowed to the healthy ones (all, if none is).
pub fn effective(frontends: &[Frontend], healthy: impl Fn(&Probe) -> bool) -> Vec<Frontend> {
    frontends
        .iter()
        .map(|f| {
            let up: Vec<SocketAddr> = f
                .backends
                .iter()
                .copied()
                .filter(|b| probe_for(f, *b).is_none_or(|p| healthy(&p)))
                .collect();
            Frontend {
                backends: if up.is_empty() {
                    f.backends.clone()
                } else {
                    up
                },
                ..f.clone()
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Runs the probes and keeps their verdicts.
pub struct HealthChecker {
    settings: Settings,
    verdicts: Arc<Mutex<HashMap<Probe, bool>>>,
    tasks: HashMap<Probe, JoinHandle<()>>,
    changed: Arc<Notify>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl HealthChecker {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            verdicts: Arc::default(),
            tasks: HashMap::new(),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Notified whenever a verdict changes.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Starts the probes that are new and stops the ones no longer wanted.
    pub fn set_probes(&mut self, wanted: &BTreeSet<Probe>) {
        self.tasks.retain(|probe, task| {
            let keep = wanted.contains(probe);
            if !keep {
                task.abort();
            }
            keep
        });
        self.verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|probe, _| wanted.contains(probe));
        for probe in wanted {
            if self.tasks.contains_key(probe) {
                continue;
            }
            let (settings, verdicts, changed) =
                (self.settings, self.verdicts.clone(), self.changed.clone());
            let probe = *probe;
            self.tasks.insert(
                probe,
                tokio::spawn(
                    async move { check_forever(probe, settings, verdicts, changed).await },
                ),
            );
        }
    }

    /// Whether `probe` passes; unknown probes count as healthy until checked.
    pub fn healthy(&self, probe: &Probe) -> bool {
        self.verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(probe)
            .copied()
            .unwrap_or(true)
    }
}

async fn check_forever(
    probe: Probe,
    settings: Settings,
    verdicts: Arc<Mutex<HashMap<Probe, bool>>>,
    changed: Arc<Notify>,
) {
    let mut failures = 0u32;
    let mut up = true;
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = tokio::time::timeout(settings.timeout, check(probe)).await;
        let ok = matches!(result, Ok(Ok(())));
        failures = if ok { 0 } else { failures + 1 };
        let now_up = if up { failures < FALL } else { ok };
        if now_up != up {
            up = now_up;
            match (up, result) {
                (true, _) => info!(?probe, "backend is healthy again"),
                (false, Ok(Err(err))) => warn!(?probe, error = %err, "backend is unhealthy"),
                (false, _) => warn!(?probe, "backend is unhealthy (timed out)"),
            }
            verdicts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(probe, up);
            changed.notify_one();
        }
    }
}

async fn check(probe: Probe) -> std::io::Result<()> {
    match probe {
        Probe::Connect(addr) => TcpStream::connect(addr).await.map(drop),
        Probe::Http(addr) => {
            let mut stream = TcpStream::connect(addr).await?;
            let request = format!(
                "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ferry-forwarder\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            if head.starts_with(b"HTTP/1.") && &head[9..12] == b"200" {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "health check answered {:?}",
                    String::from_utf8_lossy(&head)
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Protocol;

    fn frontend(health: HealthCheck, backends: &[&str]) -> Frontend {
        Frontend {
            service: "default/web".into(),
            vip: "192.0.2.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            health,
            affinity: None,
            proxy_protocol: false,
            source_ranges: vec![],
            local: false,
        }
    }

    #[test]
    fn unhealthy_backends_are_left_out_but_never_all_of_them() {
        let f = frontend(HealthCheck::Connect, &["10.0.0.1:30080", "10.0.0.2:30080"]);
        let down: SocketAddr = "10.0.0.1:30080".parse().unwrap();
        let e = effective(std::slice::from_ref(&f), |p| *p != Probe::Connect(down));
        assert_eq!(
            e[0].backends,
            ["10.0.0.2:30080".parse::<SocketAddr>().unwrap()]
        );
        let e = effective(std::slice::from_ref(&f), |_| false);
        assert_eq!(e[0].backends, f.backends);
    }

    #[test]
    fn local_frontends_share_one_http_probe_and_udp_has_none() {
        let hc = HealthCheck::Http {
            ip: "10.0.0.2".parse().unwrap(),
            port: 31999,
        };
        let fs = [
            frontend(hc, &["10.0.0.2:30080"]),
            frontend(hc, &["10.0.0.2:30081"]),
            frontend(HealthCheck::None, &["10.0.0.2:30053"]),
        ];
        assert_eq!(
            probes(&fs),
            BTreeSet::from([Probe::Http("10.0.0.2:31999".parse().unwrap())])
        );
    }

    #[tokio::test]
    async fn probes_detect_a_closed_port_and_an_http_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(check(Probe::Connect(open)).await.is_ok());
        drop(listener);
        assert!(check(Probe::Connect(open)).await.is_err());

        for (status, ok) in [("200 OK", true), ("503 Service Unavailable", false)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
            assert_eq!(check(Probe::Http(addr)).await.is_ok(), ok, "{status}");
            server.await.unwrap();
        }
    }
}
