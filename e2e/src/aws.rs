//! AWS for the tests: moto's server (PyPI `moto[server]`) on a loopback port, seeded with a
//! VPC, tagged subnets, instances and Elastic IPs through the real SDK; and `AwsProxy`, a
//! small HTTP proxy in front of it that counts calls by service and action, answers some
//! with AWS's own throttling errors, and can hold back a response (so a test can kill the
//! operator after AWS acted but before the operator heard).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::types::{DomainType, ResourceType, Tag, TagSpecification};
use bytes_body::{Body, full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::process::ProcessUnderTest;

mod bytes_body {
    use http_body_util::Full;
    use hyper::body::Bytes;
    pub type Body = Full<Bytes>;
    pub fn full(data: impl Into<Bytes>) -> Body {
        Full::new(data.into())
    }
}

/// moto's server, stopped when dropped.
pub struct Moto {
    _process: ProcessUnderTest,
    pub addr: SocketAddr,
}

impl Moto {
    /// Starts moto's server on a free loopback port (`python3 -m moto.server`, so no script
    /// on PATH is needed; `test.sh` installs the package).
    pub async fn start(dir: &Path) -> anyhow::Result<Moto> {
        let port = crate::control_plane::free_port()?;
        let log = dir.join(format!("moto-{}.log", crate::operator::next_log_number()));
        let process = ProcessUnderTest::start("moto's", log, move || {
            let mut cmd = Command::new("python3");
            cmd.args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ]);
            Ok(cmd)
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "moto's server did not listen on {addr} within 30 s:\n{}",
                    process.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Moto {
            _process: process,
            addr,
        })
    }
}

#[derive(Default)]
struct ProxyState {
    /// (service, action) → calls, in arrival order too.
    log: Mutex<Vec<(String, String)>>,
    /// Every n-th call is refused with a throttling error (0: none).
    throttle_every: AtomicU64,
    /// Every n-th call fails with AWS's internal server error (0: none).
    fail_every: AtomicU64,
    failed: AtomicU64,
    throttled: AtomicU64,
    seen: AtomicU64,
    /// The next call of this action is held back this long after AWS answered it.
    hold: Mutex<Option<(String, Duration)>>,
}

/// A counting, throttling HTTP proxy in front of moto.
pub struct AwsProxy {
    pub url: String,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The `Action` and the service (`elasticloadbalancing` or `ec2`, from the API version) of
/// a query-protocol request body.
fn action_of(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let field = |name: &str| {
        text.split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    };
    let service = match field("Version").as_str() {
        "2015-12-01" => "elasticloadbalancing",
        "2016-11-15" => "ec2",
        _ => "other",
    };
    (service.to_string(), field("Action"))
}

fn server_error(service: &str) -> Response<Body> {
    let body = if service == "ec2" {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>InternalError</Code><Message>An internal error has occurred</Message></Error></Errors><RequestID>ferry-proxy</RequestID></Response>"
    } else {
        "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>Receiver</Type><Code>InternalFailure</Code><Message>Internal failure</Message></Error><RequestId>ferry-proxy</RequestId></ErrorResponse>"
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    r
}

fn throttling(service: &str) -> Response<Body> {
    // The shapes each service really sends.
    let (status, body) = if service == "ec2" {
        (
            503,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>ferry-proxy</RequestID></Response>",
        )
    } else {
        (
            400,
            "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>ferry-proxy</RequestId></ErrorResponse>",
        )
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    r
}

async fn forward(
    upstream: SocketAddr,
    parts: http::request::Parts,
    body: hyper::body::Bytes,
) -> anyhow::Result<Response<Body>> {
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let response = sender
        .send_request(Request::from_parts(parts, full(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
    Ok(Response::from_parts(parts, full(bytes)))
}

async fn handle(
    upstream: SocketAddr,
    state: Arc<ProxyState>,
    req: Request<hyper::body::Incoming>,
) -> anyhow::Result<Response<Body>> {
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
    let (service, action) = action_of(&body);
    let n = state.seen.fetch_add(1, Ordering::SeqCst) + 1;
    let every = state.throttle_every.load(Ordering::SeqCst);
    if every > 0 && n.is_multiple_of(every) {
        state.throttled.fetch_add(1, Ordering::SeqCst);
        return Ok(throttling(&service));
    }
    let fail = state.fail_every.load(Ordering::SeqCst);
    if fail > 0 && n.is_multiple_of(fail) {
        state.failed.fetch_add(1, Ordering::SeqCst);
        return Ok(server_error(&service));
    }
    if let Ok(mut log) = state.log.lock() {
        log.push((service, action.clone()));
    }
    let response = forward(upstream, parts, body).await?;
    let hold = state.hold.lock().ok().and_then(|mut h| match h.as_ref() {
        Some((a, d)) if *a == action => {
            let d = *d;
            *h = None;
            Some(d)
        }
        _ => None,
    });
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    Ok(response)
}

impl AwsProxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<AwsProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState::default());
        let accept_state = state.clone();
        let accept = crate::http_server::serve(listener, move |req| {
            let state = accept_state.clone();
            async move {
                match handle(upstream, state, req).await {
                    Ok(r) => r,
                    Err(e) => {
                        let mut r = Response::new(full(e.to_string()));
                        *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                        r
                    }
                }
            }
        });
        Ok(AwsProxy {
            url: format!("http://{addr}"),
            state,
            accept,
        })
    }

    /// Every `n`-th call from now on gets a throttling error (0 stops it).
    pub fn throttle_every(&self, n: u64) {
        self.state.throttle_every.store(n, Ordering::SeqCst);
    }

    /// Every `n`-th call from now on fails with a 500 (0 stops it).
    pub fn fail_every(&self, n: u64) {
        self.state.fail_every.store(n, Ordering::SeqCst);
    }

    /// Calls answered with a server error so far.
    pub fn failed(&self) -> u64 {
        self.state.failed.load(Ordering::SeqCst)
    }

    /// Calls refused with a throttling error so far.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::SeqCst)
    }

    /// Holds back the answer to the next call of `action` for `hold` (AWS has acted on it).
    pub fn hold_next(&self, action: &str, hold: Duration) {
        if let Ok(mut h) = self.state.hold.lock() {
            *h = Some((action.to_string(), hold));
        }
    }

    /// The calls that reached moto, in order, as (service, action).
    pub fn calls(&self) -> Vec<(String, String)> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many calls reached moto so far (a mark for `calls_since`).
    pub fn mark(&self) -> usize {
        self.state.log.lock().map(|l| l.len()).unwrap_or_default()
    }

    /// Calls since `mark`, counted by action.
    pub fn calls_since(&self, mark: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, action) in self.calls().into_iter().skip(mark) {
            *counts.entry(action).or_default() += 1;
        }
        counts
    }
}

/// An instance standing in for a node.
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub zone: String,
}

impl Instance {
    pub fn provider_id(&self) -> String {
        format!("aws:///{}/{}", self.zone, self.id)
    }
}

/// A seeded AWS account: one VPC with two public subnets (`kubernetes.io/role/elb`), one
/// private subnet per zone only when asked (`internal-elb`), instances and Elastic IPs.
pub struct AwsWorld {
    pub moto: Moto,
    pub proxy: AwsProxy,
    pub region: String,
    pub cluster_id: String,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub vpc: String,
    pub public_subnets: Vec<String>,
    pub private_subnets: Vec<String>,
    pub instances: Vec<Instance>,
    pub eips: Vec<(String, String)>,
}

/// What to seed.
#[derive(Clone, Debug)]
pub struct Seed {
    pub instances: usize,
    pub eips: usize,
    /// Also tag private subnets for internal balancers.
    pub internal_subnets: bool,
}

async fn sdk_config(endpoint: &str, region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(ferry_providers::aws::http_client())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "ferry-e2e",
        ))
        .load()
        .await
}

fn tags(pairs: &[(&str, &str)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(ResourceType::Subnet)
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                .collect(),
        ))
        .build()
}

impl AwsWorld {
    pub async fn start(dir: &Path, seed: Seed) -> anyhow::Result<AwsWorld> {
        let moto = Moto::start(dir).await?;
        let proxy = AwsProxy::start(moto.addr).await?;
        let region = "us-east-1".to_string();
        let cluster_id = "e2e".to_string();
        // The test's own calls go straight to moto: they are not the operator's to count.
        let sdk = sdk_config(&format!("http://{}", moto.addr), &region).await;
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await?
            .vpc
            .and_then(|v| v.vpc_id)
            .context("no VPC id")?;
        let cluster_tag = format!("kubernetes.io/cluster/{cluster_id}");
        let mut public_subnets = Vec::new();
        let mut private_subnets = Vec::new();
        for (i, zone) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
            let public = ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(format!("10.0.{}.0/24", i + 1))
                .availability_zone(*zone)
                .tag_specifications(tags(&[
                    ("kubernetes.io/role/elb", "1"),
                    (&cluster_tag, "shared"),
                    ("Name", &format!("public-{zone}")),
                ]))
                .send()
                .await?;
            public_subnets.push(
                public
                    .subnet
                    .and_then(|s| s.subnet_id)
                    .context("no subnet id")?,
            );
            let private_tags: Vec<(&str, &str)> = if seed.internal_subnets {
                vec![
                    ("kubernetes.io/role/internal-elb", "1"),
                    (&cluster_tag, "shared"),
                ]
            } else {
                vec![]
            };
            let mut all = private_tags.clone();
            let name = format!("private-{zone}");
            all.push(("Name", &name));
            let private = ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(format!("10.0.{}.0/24", i + 11))
                .availability_zone(*zone)
                .tag_specifications(tags(&all))
                .send()
                .await?;
            private_subnets.push(
                private
                    .subnet
                    .and_then(|s| s.subnet_id)
                    .context("no subnet id")?,
            );
        }
        let mut instances = Vec::new();
        for i in 0..seed.instances {
            let zone = if i % 2 == 0 {
                "us-east-1a"
            } else {
                "us-east-1b"
            };
            let out = ec2
                .run_instances()
                .image_id("ami-12c6146b")
                .min_count(1)
                .max_count(1)
                .subnet_id(&private_subnets[i % 2])
                .send()
                .await?;
            let id = out
                .instances()
                .first()
                .and_then(|i| i.instance_id())
                .context("no instance id")?
                .to_string();
            instances.push(Instance {
                id,
                zone: zone.to_string(),
            });
        }
        let mut eips = Vec::new();
        for _ in 0..seed.eips {
            let out = ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .send()
                .await?;
            eips.push((
                out.allocation_id().context("no allocation id")?.to_string(),
                out.public_ip().context("no public ip")?.to_string(),
            ));
        }
        Ok(AwsWorld {
            moto,
            proxy,
            region,
            cluster_id,
            elb,
            ec2,
            vpc,
            public_subnets,
            private_subnets,
            instances,
            eips,
        })
    }

    /// The environment the operator needs to reach this account through the proxy.
    pub fn operator_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.proxy.url.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            // No instance metadata lookups from a test machine.
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            (
                "FERRY_LOG".into(),
                "info,ferry_operator=debug,ferry_providers=trace".into(),
            ),
        ]
    }

    /// An SDK configuration that goes through the counting proxy, as the operator does.
    pub async fn sdk_via_proxy(&self) -> aws_config::SdkConfig {
        sdk_config(&self.proxy.url, &self.region).await
    }

    /// The operator's flags for this account.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            "--provider".into(),
            "aws".into(),
            "--cluster-id".into(),
            self.cluster_id.clone(),
            "--load-balancer-class".into(),
            "ferry.dev/aws".into(),
        ]
    }

    /// Every balancer named `name` (moto would happily hold two).
    pub async fn balancers_named(
        &self,
        name: &str,
    ) -> anyhow::Result<Vec<aws_sdk_elasticloadbalancingv2::types::LoadBalancer>> {
        let out = self.elb.describe_load_balancers().send().await?;
        Ok(out
            .load_balancers()
            .iter()
            .filter(|lb| lb.load_balancer_name() == Some(name))
            .cloned()
            .collect())
    }
}
