//! The target pool's legacy HTTP health check (global): kube-proxy's `/healthz` for a
//! `Cluster` Service, the Service's `healthCheckNodePort` for a `Local` one. Port and path
//! change in place.

use google_cloud_compute_v1::model::HttpHealthCheck;

use crate::ProviderError;
use crate::gce::GceProvider;
use crate::gce::api::Scope;
use crate::gce::spec::Plan;

/// Upstream's values: a node out after 3 misses 8 s apart, in again after one answer.
const INTERVAL_SEC: i32 = 8;
const TIMEOUT_SEC: i32 = 1;
const HEALTHY: i32 = 1;
const UNHEALTHY: i32 = 3;

impl GceProvider {
    pub(super) async fn find_health_check(
        &self,
        name: &str,
    ) -> Result<Option<HttpHealthCheck>, ProviderError> {
        let p = self.api.project();
        Ok(self
            .api
            .calls
            .find("httpHealthChecks.get", || {
                self.api
                    .clients
                    .health_checks
                    .get()
                    .set_project(p)
                    .set_http_health_check(name)
                    .send()
            })
            .await?)
    }

    /// The health check's URL, the check made or corrected.
    pub(super) async fn health_check(
        &self,
        uid: &str,
        plan: &Plan,
    ) -> Result<String, ProviderError> {
        let want = &plan.health_check;
        let p = self.api.project();
        let link = self.api.global("httpHealthChecks", &want.name);
        match self.find_health_check(&want.name).await? {
            None => {
                let body = HttpHealthCheck::new()
                    .set_name(want.name.clone())
                    .set_description(plan.description.clone())
                    .set_port(i32::from(want.port))
                    .set_request_path(want.path)
                    .set_check_interval_sec(INTERVAL_SEC)
                    .set_timeout_sec(TIMEOUT_SEC)
                    .set_healthy_threshold(HEALTHY)
                    .set_unhealthy_threshold(UNHEALTHY);
                let created = self
                    .api
                    .calls
                    .run("httpHealthChecks.insert", || {
                        self.api
                            .clients
                            .health_checks
                            .insert()
                            .set_project(p)
                            .set_body(body.clone())
                            .send()
                    })
                    .await;
                self.created(
                    uid,
                    Scope::Global,
                    "httpHealthChecks.insert",
                    "health check",
                    &want.name,
                    created,
                )
                .await?
            }
            Some(have) => {
                self.ours("health check", &want.name, have.description.as_deref(), uid)?;
                if have.port != Some(i32::from(want.port))
                    || have.request_path.as_deref() != Some(want.path)
                {
                    let body = HttpHealthCheck::new()
                        .set_port(i32::from(want.port))
                        .set_request_path(want.path);
                    let op = self
                        .api
                        .calls
                        .run("httpHealthChecks.patch", || {
                            self.api
                                .clients
                                .health_checks
                                .patch()
                                .set_project(p)
                                .set_http_health_check(want.name.clone())
                                .set_body(body.clone())
                                .send()
                        })
                        .await?;
                    self.api
                        .settle(
                            uid,
                            Scope::Global,
                            format!("httpHealthChecks.patch {}", want.name),
                            op,
                        )
                        .await?;
                }
            }
        }
        Ok(link)
    }
}
