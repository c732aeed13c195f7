//! Where the balancer lives: the subnets (chosen by annotation, or discovered by the
//! cluster's role tags, one per zone) and, for an internet-facing balancer with static
//! addresses, one Elastic IP per subnet, found again by ferry's tags.

use super::*;

/// A subnet the balancer lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::aws) struct Subnet {
    pub(in crate::aws) id: String,
    pub(in crate::aws) zone: String,
    pub(in crate::aws) vpc: String,
}

/// An Elastic IP for one subnet.
#[derive(Clone, Debug)]
pub(in crate::aws) struct Eip {
    pub(in crate::aws) allocation: String,
    pub(in crate::aws) ip: Option<IpAddr>,
}

/// Subnets and Elastic IPs paired as the balancer's `ferry.dev/eip-allocations` tag records
/// them, empty when the balancer has no static addresses.
pub(in crate::aws) fn eip_tag(subnets: &[Subnet], eips: &[Eip]) -> String {
    subnets
        .iter()
        .zip(eips)
        .map(|(s, e)| format!("{}:{}", s.id, e.allocation))
        .collect::<Vec<_>>()
        .join(",")
}

impl AwsProvider {
    pub(in crate::aws) async fn subnets(
        &self,
        spec: &BalancerSpec,
    ) -> Result<Vec<Subnet>, ProviderError> {
        let role = match spec.scheme {
            Scheme::Internal => "kubernetes.io/role/internal-elb",
            Scheme::InternetFacing => "kubernetes.io/role/elb",
        };
        let cluster_tag = format!("kubernetes.io/cluster/{}", self.cluster_id);
        let to_subnets = |subnets: &[aws_sdk_ec2::types::Subnet]| -> Vec<Subnet> {
            subnets
                .iter()
                .filter_map(|s| {
                    Some(Subnet {
                        id: s.subnet_id()?.to_string(),
                        zone: s.availability_zone()?.to_string(),
                        vpc: s.vpc_id()?.to_string(),
                    })
                })
                .collect()
        };
        let chosen = match &spec.subnets {
            SubnetChoice::Discover => {
                // One filter server-side; the cluster tag is checked here, because a second
                // `tag-key` filter is not honoured alike by every EC2 implementation.
                let out = self
                    .calls
                    .run("DescribeSubnets", || {
                        self.ec2
                            .describe_subnets()
                            .filters(Filter::builder().name("tag-key").values(role).build())
                            .send()
                    })
                    .await?;
                let ours: Vec<aws_sdk_ec2::types::Subnet> = out
                    .subnets()
                    .iter()
                    .filter(|s| {
                        s.tags()
                            .iter()
                            .any(|t| t.key() == Some(cluster_tag.as_str()))
                    })
                    .cloned()
                    .collect();
                let mut found = to_subnets(&ours);
                found.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
                // One subnet per zone: the first by id.
                found.dedup_by(|b, a| a.zone == b.zone);
                if found.is_empty() {
                    return Err(ProviderError::Configuration {
                        reason: "NoSubnets",
                        message: format!(
                            "no subnets are tagged {role} and {cluster_tag}; tag one per zone or name them in annotation {PREFIX}subnets"
                        ),
                    });
                }
                found
            }
            SubnetChoice::Named(names) => {
                let (ids, tagged): (Vec<&String>, Vec<&String>) =
                    names.iter().partition(|n| n.starts_with("subnet-"));
                let mut found = Vec::new();
                if !ids.is_empty() {
                    let out = self
                        .calls
                        .run("DescribeSubnets", || {
                            self.ec2
                                .describe_subnets()
                                .set_subnet_ids(Some(ids.iter().map(|s| s.to_string()).collect()))
                                .send()
                        })
                        .await;
                    match out {
                        Ok(out) => found.extend(to_subnets(out.subnets())),
                        Err(e) if e.is("InvalidSubnetID.NotFound") || e.is("SubnetNotFound") => {
                            return Err(ProviderError::invalid(
                                "SubnetNotFound",
                                format!("annotation {PREFIX}subnets: {}", e.message),
                            ));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if !tagged.is_empty() {
                    let out = self
                        .calls
                        .run("DescribeSubnets", || {
                            self.ec2
                                .describe_subnets()
                                .filters(
                                    Filter::builder()
                                        .name("tag:Name")
                                        .set_values(Some(
                                            tagged.iter().map(|s| s.to_string()).collect(),
                                        ))
                                        .build(),
                                )
                                .send()
                        })
                        .await?;
                    let named: HashMap<String, Subnet> = out
                        .subnets()
                        .iter()
                        .filter_map(|s| {
                            let name =
                                s.tags().iter().find(|t| t.key() == Some("Name"))?.value()?;
                            Some((name.to_string(), to_subnets(std::slice::from_ref(s)).pop()?))
                        })
                        .collect();
                    for name in &tagged {
                        found.push(named.get(name.as_str()).cloned().ok_or_else(|| {
                            ProviderError::invalid(
                                "SubnetNotFound",
                                format!("annotation {PREFIX}subnets: no subnet is named {name:?}"),
                            )
                        })?);
                    }
                }
                let zones: BTreeSet<&str> = found.iter().map(|s| s.zone.as_str()).collect();
                if zones.len() != found.len() {
                    return Err(ProviderError::invalid(
                        "InvalidAnnotation",
                        format!(
                            "annotation {PREFIX}subnets: a balancer takes one subnet per availability zone"
                        ),
                    ));
                }
                found
            }
        };
        // A cloud that names subnets it then does not describe whole (no id, zone or VPC):
        // nothing to put a balancer in, and nothing to index.
        if chosen.is_empty() {
            return Err(ProviderError::Configuration {
                reason: "NoSubnets",
                message: format!(
                    "EC2 described no usable subnet (with an id, a zone and a VPC) for {role}"
                ),
            });
        }
        let vpcs: BTreeSet<&str> = chosen.iter().map(|s| s.vpc.as_str()).collect();
        if vpcs.len() > 1 {
            return Err(ProviderError::Configuration {
                reason: "SubnetsInManyVPCs",
                message: format!(
                    "the balancer's subnets are in more than one VPC ({})",
                    vpcs.into_iter().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(chosen)
    }

    pub(in crate::aws) async fn eips(
        &self,
        spec: &BalancerSpec,
        subnets: &[Subnet],
    ) -> Result<Vec<Eip>, ProviderError> {
        let (out, source) = if !spec.eip_allocations.is_empty() {
            if spec.eip_allocations.len() != subnets.len() {
                return Err(ProviderError::invalid(
                    "EIPCountMismatch",
                    format!(
                        "annotation {PREFIX}eip-allocations names {} allocations but the balancer has {} subnets ({}); give one per subnet",
                        spec.eip_allocations.len(),
                        subnets.len(),
                        subnets
                            .iter()
                            .map(|s| s.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let out = self
                .calls
                .run("DescribeAddresses", || {
                    self.ec2
                        .describe_addresses()
                        .set_allocation_ids(Some(spec.eip_allocations.clone()))
                        .send()
                })
                .await;
            (out, format!("annotation {PREFIX}eip-allocations"))
        } else if let Some(ip) = spec.requested_ip {
            if subnets.len() != 1 {
                return Err(ProviderError::invalid(
                    "EIPCountMismatch",
                    format!(
                        "spec.loadBalancerIP is one address but the balancer has {} subnets; use annotation {PREFIX}eip-allocations with one allocation per subnet, or name one subnet",
                        subnets.len()
                    ),
                ));
            }
            let out = self
                .calls
                .run("DescribeAddresses", || {
                    self.ec2
                        .describe_addresses()
                        .filters(
                            Filter::builder()
                                .name("public-ip")
                                .values(ip.to_string())
                                .build(),
                        )
                        .send()
                })
                .await;
            (out, format!("spec.loadBalancerIP {ip}"))
        } else {
            return Ok(Vec::new());
        };
        let out = match out {
            Ok(out) => out,
            Err(e) if e.is("InvalidAllocationID.NotFound") || e.is("InvalidAddress.NotFound") => {
                return Err(ProviderError::allocation(
                    "EIPNotFound",
                    format!("{source}: {}", e.message),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let found: HashMap<&str, Option<IpAddr>> = out
            .addresses()
            .iter()
            .filter_map(|a| {
                Some((
                    a.allocation_id()?,
                    a.public_ip().and_then(|ip| ip.parse().ok()),
                ))
            })
            .collect();
        let wanted: Vec<String> = if spec.eip_allocations.is_empty() {
            found.keys().map(|s| s.to_string()).collect()
        } else {
            spec.eip_allocations.clone()
        };
        if wanted.is_empty() {
            return Err(ProviderError::allocation(
                "EIPNotFound",
                format!("{source} matches no Elastic IP allocation of this account"),
            ));
        }
        wanted
            .into_iter()
            .map(|allocation| match found.get(allocation.as_str()) {
                Some(ip) => Ok(Eip {
                    ip: *ip,
                    allocation,
                }),
                None => Err(ProviderError::allocation(
                    "EIPNotFound",
                    format!("{source}: allocation {allocation} does not exist"),
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterIdentity;
    use crate::LoadBalancerProvider;
    use crate::aws::{AwsConfig, AwsProvider};

    /// An EC2 endpoint that answers every call with an empty subnet list: a cloud's odd
    /// answer, on the wire, through the real SDK.
    async fn empty_subnets_endpoint() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        buf.drain(..end + 4 + length);
                        let body = "<DescribeSubnetsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><subnetSet/></DescribeSubnetsResponse>";
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_cloud_that_returns_no_subnets_is_an_error_not_a_panic() {
        let endpoint = empty_subnets_endpoint().await;
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(crate::aws::http_client())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "a", "b", None, None, "test",
            ))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        let provider = AwsProvider::with_clients(
            AwsConfig::new(ClusterIdentity {
                id: "c".into(),
                uid: "u".into(),
            }),
            aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            aws_sdk_ec2::Client::new(&sdk),
        );
        for annotation in [None, Some("subnet-0abc")] {
            let mut svc = crate::fixtures::service("web").lb().port(80, 30080);
            if let Some(subnets) = annotation {
                svc = svc.annotate(&format!("{PREFIX}subnets"), subnets);
            }
            let desired = crate::desired::desired(&svc.build(), &[]).unwrap();
            let err = provider.ensure(&desired).await.unwrap_err();
            assert_eq!(err.reason(), "NoSubnets", "{err}");
        }
    }

    #[test]
    fn the_eip_tag_pairs_subnets_with_allocations() {
        let subnets = [
            Subnet {
                id: "subnet-a".into(),
                zone: "z1".into(),
                vpc: "v".into(),
            },
            Subnet {
                id: "subnet-b".into(),
                zone: "z2".into(),
                vpc: "v".into(),
            },
        ];
        let eips = [
            Eip {
                allocation: "eipalloc-1".into(),
                ip: None,
            },
            Eip {
                allocation: "eipalloc-2".into(),
                ip: None,
            },
        ];
        assert_eq!(
            eip_tag(&subnets, &eips),
            "subnet-a:eipalloc-1,subnet-b:eipalloc-2"
        );
        assert_eq!(eip_tag(&subnets, &[]), "");
    }
}
