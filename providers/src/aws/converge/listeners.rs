//! Listeners, one per Service port and protocol, each forwarding to its target group;
//! changed in place, removed when the Service no longer has the port.

use super::*;

impl AwsProvider {
    pub(in crate::aws) async fn ensure_listeners(
        &self,
        spec: &BalancerSpec,
        lb_arn: &str,
        groups: &BTreeMap<String, KnownGroup>,
    ) -> Result<(), ProviderError> {
        let out = self
            .calls
            .run("DescribeListeners", || {
                self.elb
                    .describe_listeners()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await?;
        let mut existing: HashMap<i32, _> = out
            .listeners()
            .iter()
            .filter_map(|l| Some((l.port()?, l.clone())))
            .collect();
        for want in &spec.target_groups {
            let Some(group) = groups.get(&want.name) else {
                continue;
            };
            let action = Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&group.arn)
                .build();
            let port = i32::from(want.port);
            match existing.remove(&port) {
                Some(l) => {
                    let forwards = l
                        .default_actions()
                        .iter()
                        .any(|a| a.target_group_arn() == Some(group.arn.as_str()))
                        && l.default_actions().len() == 1;
                    if l.protocol() == Some(&tg_protocol(want.protocol)) && forwards {
                        continue;
                    }
                    let listener_arn = l.listener_arn().ok_or_else(|| missing("a listener ARN"))?;
                    self.calls
                        .run("ModifyListener", || {
                            self.elb
                                .modify_listener()
                                .listener_arn(listener_arn)
                                .protocol(tg_protocol(want.protocol))
                                .default_actions(action.clone())
                                .send()
                        })
                        .await?;
                }
                None => {
                    self.calls
                        .run("CreateListener", || {
                            self.elb
                                .create_listener()
                                .load_balancer_arn(lb_arn)
                                .port(port)
                                .protocol(tg_protocol(want.protocol))
                                .default_actions(action.clone())
                                .send()
                        })
                        .await?;
                }
            }
        }
        for l in existing.values() {
            let Some(listener_arn) = l.listener_arn() else {
                continue;
            };
            match self
                .calls
                .run("DeleteListener", || {
                    self.elb.delete_listener().listener_arn(listener_arn).send()
                })
                .await
            {
                Ok(_) => {}
                Err(e) if e.is("ListenerNotFound") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
