//! A ferry process's HTTP endpoints: `/metrics` (Prometheus text format) on the metrics address,
//! `/healthz` and `/readyz` on the health address. Plain hyper, HTTP/1.1, bounded by a
//! per-connection timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Encodes the process's metrics in the Prometheus text format, on each scrape.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Liveness and readiness, flipped by the process as it starts.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn route(path: &str, metrics: &MetricsText, health: &Health) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(),
        ),
        "/healthz" | "/livez" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds `addr` (so a taken port fails at start, not later) and serves in the background.
pub async fn serve(
    addr: SocketAddr,
    metrics: MetricsText,
    health: Arc<Health>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(err) => {
                    warn!(error = %err, "accepting on the metrics/health listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let response = route(req.uri().path(), &metrics, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(Duration::from_secs(30), conn).await {
                    Ok(Err(err)) => debug!(%peer, error = %err, "metrics/health connection"),
                    Err(_) => debug!(%peer, "metrics/health connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok(local)
}

/// Serves `/metrics` on `metrics_addr` and the health endpoints on `health_addr` (one
/// listener when they are the same); returns the bound addresses. Errors name the flag.
pub async fn serve_endpoints(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    metrics: MetricsText,
    health: Arc<Health>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    use anyhow::Context as _;
    let bound_metrics = serve(metrics_addr, metrics.clone(), health.clone())
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {metrics_addr}"))?;
    let bound_health = if health_addr == metrics_addr {
        bound_metrics
    } else {
        serve(health_addr, metrics, health)
            .await
            .with_context(|| format!("cannot listen on --health-addr {health_addr}"))?
    };
    Ok((bound_metrics, bound_health))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_flag() {
        let m: MetricsText = Arc::new(|| "# EOF\n".to_string());
        let h = Health::default();
        assert_eq!(route("/healthz", &m, &h).status(), StatusCode::OK);
        assert_eq!(
            route("/readyz", &m, &h).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_ready(true);
        assert_eq!(route("/readyz", &m, &h).status(), StatusCode::OK);
        assert_eq!(route("/metrics", &m, &h).status(), StatusCode::OK);
        assert_eq!(route("/nope", &m, &h).status(), StatusCode::NOT_FOUND);
    }
}
