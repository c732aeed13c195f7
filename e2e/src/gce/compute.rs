//! The compute v1 REST contract for the resources ferry's GCE provider uses, as state and a
//! request handler without HTTP: regional addresses, forwarding rules and target pools,
//! global legacy HTTP health checks and firewall rules, zonal instances (seeded by tests),
//! and the regional and global Operations every write returns.
//!
//! What a client can see is what GCE documents: full-URL `selfLink`s, uint64 fields as
//! strings, `items` left out of an empty list, `filter`/`maxResults`/`pageToken` on lists,
//! the error envelope with the HTTP status and a `reason`, 409 `alreadyExists` for a taken
//! name (also while its insert is still running), 404 `notFound`, 400
//! `resourceInUseByAnotherResource` when deleting what something still references, an
//! address going from RESERVED to IN_USE with its `users`. A write takes effect when its
//! Operation is DONE: at once by default, or after `slow_operations(n)` polls (`get` or
//! `wait` of the Operation), so a resource being created is not there yet and its name is
//! already taken.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Value, json};

/// Where a resource lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Global,
    Region(String),
    Zone(String),
}

impl Scope {
    fn path(&self) -> String {
        match self {
            Self::Global => "global".into(),
            Self::Region(r) => format!("regions/{r}"),
            Self::Zone(z) => format!("zones/{z}"),
        }
    }
}

/// An answer: HTTP status and JSON body.
pub type Answer = (u16, Value);

/// The error envelope GCE answers with.
pub fn error(code: u16, reason: &str, message: &str) -> Answer {
    (
        code,
        json!({"error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }}),
    )
}

/// The collections this fake implements: the path segment, the kind of one item, its scope.
const COLLECTIONS: [(&str, &str, &str); 6] = [
    ("addresses", "compute#address", "region"),
    ("forwardingRules", "compute#forwardingRule", "region"),
    ("targetPools", "compute#targetPool", "region"),
    ("httpHealthChecks", "compute#httpHealthCheck", "global"),
    ("firewalls", "compute#firewall", "global"),
    ("instances", "compute#instance", "zone"),
];

/// What an Operation does once it is DONE.
#[derive(Clone, Debug)]
enum Effect {
    Insert(Scope, String, Value),
    Delete(Scope, String, String),
    Replace(Scope, String, String, Value),
}

#[derive(Clone, Debug)]
struct Operation {
    body: Value,
    effect: Option<Effect>,
    polls_left: u32,
}

/// The fake's state: one project.
#[derive(Debug)]
pub struct Compute {
    base: String,
    project: String,
    next_id: u64,
    resources: BTreeMap<(Scope, String, String), Value>,
    /// Names taken by inserts still running.
    reserved: BTreeMap<(Scope, String, String), String>,
    operations: BTreeMap<(Scope, String), Operation>,
    slow: u32,
    next_address: u32,
}

fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.3f-00:00")
        .to_string()
}

impl Compute {
    /// A project reached at `base` (`http://127.0.0.1:port`).
    pub fn new(base: &str, project: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            project: project.to_string(),
            next_id: 1_000_000_000_000_000_000,
            resources: BTreeMap::new(),
            reserved: BTreeMap::new(),
            operations: BTreeMap::new(),
            slow: 0,
            next_address: 10,
        }
    }

    /// Writes from now on finish after `polls` polls of their Operation (0: at once).
    pub fn slow_operations(&mut self, polls: u32) {
        self.slow = polls;
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    fn url(&self, scope: &Scope, collection: &str, name: &str) -> String {
        format!(
            "{}/compute/v1/projects/{}/{}/{collection}/{name}",
            self.base,
            self.project,
            scope.path()
        )
    }

    fn scope_url(&self, scope: &Scope) -> String {
        format!(
            "{}/compute/v1/projects/{}/{}",
            self.base,
            self.project,
            scope.path()
        )
    }

    /// Finishes every Operation still running, as GCE does in its own time.
    pub fn finish_pending(&mut self) {
        let running: Vec<(Scope, String)> = self
            .operations
            .iter()
            .filter(|(_, o)| o.body["status"] != "DONE")
            .map(|(k, _)| k.clone())
            .collect();
        for (scope, name) in running {
            self.finish(&scope, &name);
        }
    }

    /// How many Operations are still running.
    pub fn running_operations(&self) -> usize {
        self.operations
            .values()
            .filter(|o| o.body["status"] != "DONE")
            .count()
    }

    /// Seeds an instance with network tags.
    pub fn add_tagged_instance(&mut self, zone: &str, name: &str, tags: &[&str]) {
        self.add_instance(zone, name);
        let key = (
            Scope::Zone(zone.to_string()),
            "instances".to_string(),
            name.to_string(),
        );
        if let Some(i) = self.resources.get_mut(&key) {
            i["tags"] = json!({"items": tags, "fingerprint": "42WmSpB8rSM="});
        }
    }

    /// Seeds an instance (a node's VM) in `zone`.
    pub fn add_instance(&mut self, zone: &str, name: &str) {
        let scope = Scope::Zone(zone.to_string());
        let id = self.id();
        let body = json!({
            "kind": "compute#instance",
            "id": id,
            "name": name,
            "zone": self.scope_url(&scope),
            "status": "RUNNING",
            "creationTimestamp": now(),
            "selfLink": self.url(&scope, "instances", name),
        });
        self.resources
            .insert((scope, "instances".into(), name.into()), body);
    }

    /// Every resource of `collection`, as (scope, name, body).
    pub fn resources(&self, collection: &str) -> Vec<(Scope, String, Value)> {
        self.resources
            .iter()
            .filter(|((_, c, _), _)| c == collection)
            .map(|((s, _, n), v)| (s.clone(), n.clone(), v.clone()))
            .collect()
    }

    /// Removes a resource behind the API's back (an out-of-band change by a user).
    pub fn remove(&mut self, scope: &Scope, collection: &str, name: &str) -> bool {
        let gone = self
            .resources
            .remove(&(scope.clone(), collection.to_string(), name.to_string()))
            .is_some();
        if gone {
            self.refresh_users();
        }
        gone
    }

    /// Handles one request: `path` below `/compute/v1/`, `query` its decoded parameters.
    pub fn handle(
        &mut self,
        method: &str,
        path: &str,
        query: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Answer {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let Some(("projects", project, rest)) = parts
            .split_first()
            .and_then(|(a, r)| r.split_first().map(|(p, rest)| (*a, *p, rest)))
        else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        if project != self.project {
            return error(
                404,
                "notFound",
                &format!("The resource 'projects/{project}' was not found"),
            );
        }
        let (scope, rest) = match rest {
            ["global", rest @ ..] => (Scope::Global, rest),
            ["regions", r, rest @ ..] => (Scope::Region(r.to_string()), rest),
            ["zones", z, rest @ ..] => (Scope::Zone(z.to_string()), rest),
            _ => {
                return error(
                    404,
                    "notFound",
                    &format!("The resource '{path}' was not found"),
                );
            }
        };
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return error(400, "parseError", &format!("Parse Error: {e}")),
            }
        };
        match (method, rest) {
            ("GET", ["operations", name]) => self.poll(&scope, name),
            ("POST", ["operations", name, "wait"]) => self.poll(&scope, name),
            (_, [collection, ..]) if !self.collection_in(collection, &scope) => error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            ),
            ("GET", [collection]) => self.list(&scope, collection, query),
            ("POST", [collection]) if *collection != "instances" => {
                self.insert(&scope, collection, body)
            }
            ("GET", [collection, name]) => self.get(&scope, collection, name),
            ("DELETE", [collection, name]) if *collection != "instances" => {
                self.delete(&scope, collection, name)
            }
            ("POST", ["targetPools", name, verb]) => self.pool_verb(&scope, name, verb, &body),
            ("POST", ["forwardingRules", name, "setTarget"]) => {
                self.set_target(&scope, name, &body)
            }
            ("PATCH" | "PUT", [collection @ ("firewalls" | "httpHealthChecks"), name]) => {
                self.update(&scope, collection, name, body, method == "PATCH")
            }
            _ => error(
                400,
                "invalid",
                &format!("{method} {path} is not a method this compute API serves"),
            ),
        }
    }

    fn collection_in(&self, collection: &str, scope: &Scope) -> bool {
        COLLECTIONS.iter().any(|(c, _, s)| {
            *c == collection
                && matches!(
                    (*s, scope),
                    ("region", Scope::Region(_))
                        | ("global", Scope::Global)
                        | ("zone", Scope::Zone(_))
                )
        })
    }

    fn key(scope: &Scope, collection: &str, name: &str) -> (Scope, String, String) {
        (scope.clone(), collection.to_string(), name.to_string())
    }

    fn resource_path(&self, scope: &Scope, collection: &str, name: &str) -> String {
        format!(
            "projects/{}/{}/{collection}/{name}",
            self.project,
            scope.path()
        )
    }

    fn get(&self, scope: &Scope, collection: &str, name: &str) -> Answer {
        match self.resources.get(&Self::key(scope, collection, name)) {
            Some(v) => (200, v.clone()),
            None => error(
                404,
                "notFound",
                &format!(
                    "The resource '{}' was not found",
                    self.resource_path(scope, collection, name)
                ),
            ),
        }
    }

    fn list(&self, scope: &Scope, collection: &str, query: &BTreeMap<String, String>) -> Answer {
        let matches = match query.get("filter").map(|f| Filter::parse(f)) {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                return error(
                    400,
                    "invalid",
                    &format!("Invalid value for field 'filter': {e}"),
                );
            }
        };
        let max = match query.get("maxResults").map(|m| m.parse::<usize>()) {
            None => 500,
            Some(Ok(m)) if m <= 500 => m.max(1),
            _ => {
                return error(
                    400,
                    "invalid",
                    "Invalid value for field 'maxResults': must be between 0 and 500",
                );
            }
        };
        let start = match query
            .get("pageToken")
            .map(|t| t.strip_prefix("page-").map(str::parse::<usize>))
        {
            None => 0,
            Some(Some(Ok(n))) => n,
            _ => return error(400, "invalid", "Invalid value for field 'pageToken'"),
        };
        let all: Vec<&Value> = self
            .resources
            .iter()
            .filter(|((s, c, _), _)| s == scope && c == collection)
            .map(|(_, v)| v)
            .filter(|v| matches.as_ref().is_none_or(|f| f.matches(v)))
            .collect();
        let page: Vec<Value> = all
            .iter()
            .skip(start)
            .take(max)
            .map(|v| (*v).clone())
            .collect();
        let kind = COLLECTIONS
            .iter()
            .find(|(c, _, _)| *c == collection)
            .map(|(_, k, _)| format!("{k}List"))
            .unwrap_or_default();
        let mut out = json!({
            "kind": kind,
            "id": format!("projects/{}/{}/{collection}", self.project, scope.path()),
            "selfLink": format!("{}/{collection}", self.scope_url(scope)),
        });
        if !page.is_empty() {
            out["items"] = Value::Array(page);
        }
        if start + max < all.len() {
            out["nextPageToken"] = json!(format!("page-{}", start + max));
        }
        (200, out)
    }

    fn insert(&mut self, scope: &Scope, collection: &str, mut body: Value) -> Answer {
        let Some(name) = body.get("name").and_then(Value::as_str).map(str::to_string) else {
            return error(
                400,
                "required",
                "Required field 'resource.name' not specified",
            );
        };
        if !valid_name(&name) {
            return error(
                400,
                "invalid",
                &format!(
                    "Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'"
                ),
            );
        }
        let key = Self::key(scope, collection, &name);
        if self.resources.contains_key(&key) || self.reserved.contains_key(&key) {
            return error(
                409,
                "alreadyExists",
                &format!(
                    "The resource '{}' already exists",
                    self.resource_path(scope, collection, &name)
                ),
            );
        }
        if let Err(e) = self.complete(scope, collection, &name, &mut body) {
            return e;
        }
        let link = self.url(scope, collection, &name);
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let op = self.operation(
            scope,
            "insert",
            &link,
            &id,
            Some(Effect::Insert(scope.clone(), collection.to_string(), body)),
        );
        if op.1["status"] != "DONE" {
            self.reserved
                .insert(key, op.1["name"].as_str().unwrap_or_default().into());
        }
        op
    }

    /// Fills in what GCE sets on insert, and checks what the body references.
    fn complete(
        &mut self,
        scope: &Scope,
        collection: &str,
        name: &str,
        body: &mut Value,
    ) -> Result<(), Answer> {
        let kind = COLLECTIONS
            .iter()
            .find(|(c, _, _)| *c == collection)
            .map(|(_, k, _)| *k)
            .unwrap_or_default();
        body["kind"] = json!(kind);
        body["id"] = json!(self.id());
        body["creationTimestamp"] = json!(now());
        body["selfLink"] = json!(self.url(scope, collection, name));
        if let Scope::Region(_) = scope {
            body["region"] = json!(self.scope_url(scope));
        }
        match collection {
            "addresses" => {
                let wanted = body
                    .get("address")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let ip = match wanted {
                    Some(ip) => {
                        if self.address_named_by_ip(scope, &ip).is_some() {
                            return Err(error(
                                409,
                                "alreadyExists",
                                &format!("The address '{ip}' is already reserved"),
                            ));
                        }
                        ip
                    }
                    None => self.fresh_ip(),
                };
                body["address"] = json!(ip);
                body["status"] = json!("RESERVED");
                set_default(body, "addressType", "EXTERNAL");
                set_default(body, "networkTier", "PREMIUM");
            }
            "forwardingRules" => {
                if let Some(target) = body
                    .get("target")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                {
                    // GCE answers references as full URLs, whichever form it was given.
                    let Some(full) = self.by_link(&target).map(|t| t["selfLink"].clone()) else {
                        return Err(error(
                            404,
                            "notFound",
                            &format!("The resource '{target}' was not found"),
                        ));
                    };
                    body["target"] = full;
                }
                let ip = match body
                    .get("IPAddress")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                {
                    // An address resource's URL stands for its IP.
                    Some(link) if link.contains("/addresses/") => match self.by_link(&link) {
                        Some(a) => a["address"].as_str().unwrap_or_default().to_string(),
                        None => {
                            return Err(error(
                                404,
                                "notFound",
                                &format!("The resource '{link}' was not found"),
                            ));
                        }
                    },
                    Some(ip) => ip,
                    None => self.fresh_ip(),
                };
                body["IPAddress"] = json!(ip);
                set_default(body, "IPProtocol", "TCP");
                set_default(body, "loadBalancingScheme", "EXTERNAL");
                set_default(body, "networkTier", "PREMIUM");
                body["fingerprint"] = json!(fingerprint(&self.next_id));
            }
            "targetPools" => {
                for field in ["instances", "healthChecks"] {
                    let mut full = Vec::new();
                    for link in links(body, field) {
                        let Some(found) = self.by_link(&link).map(|r| r["selfLink"].clone()) else {
                            return Err(error(
                                404,
                                "notFound",
                                &format!("The resource '{link}' was not found"),
                            ));
                        };
                        full.push(found);
                    }
                    if body.get(field).is_some() {
                        body[field] = Value::Array(full);
                    }
                }
                set_default(body, "sessionAffinity", "NONE");
            }
            "httpHealthChecks" => {
                for (field, default) in [
                    ("port", json!(80)),
                    ("requestPath", json!("/")),
                    ("checkIntervalSec", json!(5)),
                    ("timeoutSec", json!(5)),
                    ("healthyThreshold", json!(2)),
                    ("unhealthyThreshold", json!(2)),
                ] {
                    if body.get(field).is_none() {
                        body[field] = default;
                    }
                }
            }
            "firewalls" => {
                set_default(
                    body,
                    "network",
                    &format!(
                        "{}/compute/v1/projects/{}/global/networks/default",
                        self.base, self.project
                    ),
                );
                if let Some(network) = body["network"].as_str()
                    && let Some(i) = network.find("projects/")
                    && !network.starts_with("http")
                {
                    body["network"] = json!(format!("{}/compute/v1/{}", self.base, &network[i..]));
                }
                set_default(body, "direction", "INGRESS");
                if body.get("priority").is_none() {
                    body["priority"] = json!(1000);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn fresh_ip(&mut self) -> String {
        self.next_address += 1;
        format!("203.0.113.{}", self.next_address % 250 + 1)
    }

    fn address_named_by_ip(&self, scope: &Scope, ip: &str) -> Option<String> {
        self.resources
            .iter()
            .find(|((s, c, _), v)| s == scope && c == "addresses" && v["address"] == ip)
            .map(|((_, _, n), _)| n.clone())
    }

    /// The resource `link` names: its full URL, or the part from `projects/` on (GCE takes
    /// both, whichever host a full URL names).
    fn by_link(&self, link: &str) -> Option<&Value> {
        self.resources
            .values()
            .find(|v| v["selfLink"].as_str().is_some_and(|s| same_link(s, link)))
    }

    /// `firewalls.patch`/`update`, `httpHealthChecks.patch`/`update`: a patch merges the
    /// fields given, an update replaces the resource; name, id and links stay.
    fn update(
        &mut self,
        scope: &Scope,
        collection: &str,
        name: &str,
        body: Value,
        patch: bool,
    ) -> Answer {
        let key = Self::key(scope, collection, name);
        let Some(existing) = self.resources.get(&key).cloned() else {
            return error(
                404,
                "notFound",
                &format!(
                    "The resource '{}' was not found",
                    self.resource_path(scope, collection, name)
                ),
            );
        };
        let Value::Object(given) = body else {
            return error(400, "required", "Required field 'resource' not specified");
        };
        if given
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n != name)
        {
            return error(
                400,
                "invalid",
                "Invalid value for field 'resource.name': a resource cannot be renamed",
            );
        }
        let mut updated = if patch { existing.clone() } else { json!({}) };
        for (k, v) in given {
            updated[k.as_str()] = v;
        }
        updated["name"] = json!(name);
        // Defaults and references as an insert has them.
        if let Err(e) = self.complete(scope, collection, name, &mut updated) {
            return e;
        }
        for k in ["kind", "id", "name", "selfLink", "creationTimestamp"] {
            updated[k] = existing[k].clone();
        }
        let link = existing["selfLink"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = existing["id"].as_str().unwrap_or_default().to_string();
        self.operation(
            scope,
            if patch { "patch" } else { "update" },
            &link,
            &id,
            Some(Effect::Replace(
                scope.clone(),
                collection.to_string(),
                name.to_string(),
                updated,
            )),
        )
    }

    /// `forwardingRules.setTarget`: points a rule at another target pool.
    fn set_target(&mut self, scope: &Scope, name: &str, body: &Value) -> Answer {
        let key = Self::key(scope, "forwardingRules", name);
        let Some(rule) = self.resources.get(&key).cloned() else {
            return error(
                404,
                "notFound",
                &format!(
                    "The resource '{}' was not found",
                    self.resource_path(scope, "forwardingRules", name)
                ),
            );
        };
        let Some(target) = body.get("target").and_then(Value::as_str) else {
            return error(400, "required", "Required field 'target' not specified");
        };
        let Some(pool) = self.by_link(target) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{target}' was not found"),
            );
        };
        let mut updated = rule.clone();
        updated["target"] = pool["selfLink"].clone();
        let link = rule["selfLink"].as_str().unwrap_or_default().to_string();
        let id = rule["id"].as_str().unwrap_or_default().to_string();
        self.operation(
            scope,
            "SetTarget",
            &link,
            &id,
            Some(Effect::Replace(
                scope.clone(),
                "forwardingRules".into(),
                name.into(),
                updated,
            )),
        )
    }

    fn delete(&mut self, scope: &Scope, collection: &str, name: &str) -> Answer {
        let key = Self::key(scope, collection, name);
        let Some(existing) = self.resources.get(&key) else {
            return error(
                404,
                "notFound",
                &format!(
                    "The resource '{}' was not found",
                    self.resource_path(scope, collection, name)
                ),
            );
        };
        let link = existing["selfLink"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let id = existing["id"].as_str().unwrap_or_default().to_string();
        if let Some(user) = self.user_of(&link, existing) {
            return error(
                400,
                "resourceInUseByAnotherResource",
                &format!(
                    "The {} resource '{}' is already being used by '{user}'",
                    singular(collection),
                    self.resource_path(scope, collection, name)
                ),
            );
        }
        self.operation(
            scope,
            "delete",
            &link,
            &id,
            Some(Effect::Delete(
                scope.clone(),
                collection.to_string(),
                name.to_string(),
            )),
        )
    }

    /// What references `link`: a rule its target pool or address, a pool its health check.
    fn user_of(&self, link: &str, resource: &Value) -> Option<String> {
        let ip = resource.get("address").cloned();
        self.resources.values().find_map(|v| {
            let uses = v["target"].as_str().is_some_and(|t| same_link(t, link))
                || links(v, "healthChecks").any(|h| same_link(&h, link))
                || (resource["kind"] == "compute#address"
                    && v["kind"] == "compute#forwardingRule"
                    && Some(&v["IPAddress"]) == ip.as_ref()
                    && v["region"] == resource["region"]);
            uses.then(|| v["selfLink"].as_str().unwrap_or_default().to_string())
        })
    }

    fn pool_verb(&mut self, scope: &Scope, name: &str, verb: &str, body: &Value) -> Answer {
        let key = Self::key(scope, "targetPools", name);
        let Some(pool) = self.resources.get(&key).cloned() else {
            return error(
                404,
                "notFound",
                &format!(
                    "The resource '{}' was not found",
                    self.resource_path(scope, "targetPools", name)
                ),
            );
        };
        let (field, list_key, item_key) = match verb {
            "addInstance" | "removeInstance" => ("instances", "instances", "instance"),
            "addHealthCheck" | "removeHealthCheck" => {
                ("healthChecks", "healthChecks", "healthCheck")
            }
            _ => {
                return error(
                    400,
                    "invalid",
                    &format!("targetPools.{verb} is not a method this compute API serves"),
                );
            }
        };
        let given: Vec<String> = body
            .get(list_key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get(item_key).and_then(Value::as_str).map(str::to_string))
            .collect();
        if given.is_empty() {
            return error(
                400,
                "required",
                &format!("Required field '{list_key}' not specified"),
            );
        }
        let mut current: Vec<String> = links(&pool, field).collect();
        for link in &given {
            if verb.starts_with("add") {
                let Some(full) = self
                    .by_link(link)
                    .and_then(|r| r["selfLink"].as_str())
                    .map(str::to_string)
                else {
                    return error(
                        400,
                        "invalid",
                        &format!("The resource '{link}' was not found"),
                    );
                };
                if !current.iter().any(|c| same_link(c, link)) {
                    current.push(full);
                }
            } else {
                current.retain(|c| !same_link(c, link));
            }
        }
        let mut updated = pool.clone();
        updated[field] = json!(current);
        let link = pool["selfLink"].as_str().unwrap_or_default().to_string();
        let id = pool["id"].as_str().unwrap_or_default().to_string();
        self.operation(
            scope,
            verb,
            &link,
            &id,
            Some(Effect::Replace(
                scope.clone(),
                "targetPools".into(),
                name.into(),
                updated,
            )),
        )
    }

    fn operation(
        &mut self,
        scope: &Scope,
        kind: &str,
        target: &str,
        target_id: &str,
        effect: Option<Effect>,
    ) -> Answer {
        let id = self.id();
        let name = format!("operation-{id}-{}", fingerprint(&self.next_id));
        let mut body = json!({
            "kind": "compute#operation",
            "id": id,
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "targetId": target_id,
            "status": "PENDING",
            "progress": 0,
            "user": "ferry-test@example.iam.gserviceaccount.com",
            "insertTime": now(),
            "selfLink": self.url(scope, "operations", &name),
        });
        match scope {
            Scope::Region(_) => body["region"] = json!(self.scope_url(scope)),
            Scope::Zone(_) => body["zone"] = json!(self.scope_url(scope)),
            Scope::Global => {}
        }
        let op = Operation {
            body,
            effect,
            polls_left: self.slow,
        };
        self.operations.insert((scope.clone(), name.clone()), op);
        if self.slow == 0 {
            self.finish(scope, &name);
        }
        self.operations
            .get(&(scope.clone(), name))
            .map(|o| (200, o.body.clone()))
            .unwrap_or_else(|| error(500, "backendError", "operation lost"))
    }

    fn poll(&mut self, scope: &Scope, name: &str) -> Answer {
        let key = (scope.clone(), name.to_string());
        let Some(op) = self.operations.get_mut(&key) else {
            return error(
                404,
                "notFound",
                &format!(
                    "The resource 'projects/{}/{}/operations/{name}' was not found",
                    self.project,
                    scope.path()
                ),
            );
        };
        if op.body["status"] != "DONE" {
            if op.polls_left > 1 {
                op.polls_left -= 1;
                op.body["status"] = json!("RUNNING");
                op.body["progress"] = json!(50);
                if op.body.get("startTime").is_none() {
                    op.body["startTime"] = json!(now());
                }
            } else {
                self.finish(scope, name);
            }
        }
        self.operations
            .get(&key)
            .map(|o| (200, o.body.clone()))
            .unwrap_or_else(|| error(500, "backendError", "operation lost"))
    }

    /// Applies the Operation's effect and marks it DONE (with an error when the effect
    /// cannot apply any more).
    fn finish(&mut self, scope: &Scope, name: &str) {
        let key = (scope.clone(), name.to_string());
        let Some(mut op) = self.operations.remove(&key) else {
            return;
        };
        let outcome = match op.effect.take() {
            Some(Effect::Insert(s, c, body)) => {
                let n = body["name"].as_str().unwrap_or_default().to_string();
                self.reserved.remove(&Self::key(&s, &c, &n));
                self.resources.insert(Self::key(&s, &c, &n), body);
                Ok(())
            }
            Some(Effect::Delete(s, c, n)) => {
                self.resources.remove(&Self::key(&s, &c, &n));
                Ok(())
            }
            Some(Effect::Replace(s, c, n, body)) => {
                match self.resources.get_mut(&Self::key(&s, &c, &n)) {
                    Some(v) => {
                        *v = body;
                        Ok(())
                    }
                    None => Err(format!(
                        "The resource '{}' was not found",
                        self.resource_path(&s, &c, &n)
                    )),
                }
            }
            None => Ok(()),
        };
        self.refresh_users();
        op.body["status"] = json!("DONE");
        op.body["progress"] = json!(100);
        if op.body.get("startTime").is_none() {
            op.body["startTime"] = json!(now());
        }
        op.body["endTime"] = json!(now());
        if let Err(message) = outcome {
            op.body["error"] =
                json!({"errors": [{"code": "RESOURCE_NOT_FOUND", "message": message}]});
            op.body["httpErrorStatusCode"] = json!(404);
            op.body["httpErrorMessage"] = json!("NOT FOUND");
        }
        self.operations.insert(key, op);
    }

    /// Addresses show which forwarding rules use them (RESERVED ↔ IN_USE).
    fn refresh_users(&mut self) {
        let rules: Vec<(Value, Value, Value)> = self
            .resources
            .values()
            .filter(|v| v["kind"] == "compute#forwardingRule")
            .map(|v| {
                (
                    v["IPAddress"].clone(),
                    v["region"].clone(),
                    v["selfLink"].clone(),
                )
            })
            .collect();
        for ((_, c, _), address) in self.resources.iter_mut() {
            if c != "addresses" {
                continue;
            }
            let users: Vec<Value> = rules
                .iter()
                .filter(|(ip, region, _)| *ip == address["address"] && *region == address["region"])
                .map(|(_, _, link)| link.clone())
                .collect();
            if let Some(obj) = address.as_object_mut() {
                if users.is_empty() {
                    obj.remove("users");
                    obj.insert("status".into(), json!("RESERVED"));
                } else {
                    obj.insert("users".into(), Value::Array(users));
                    obj.insert("status".into(), json!("IN_USE"));
                }
            }
        }
    }
}

fn set_default(body: &mut Value, field: &str, value: &str) {
    if body.get(field).is_none() {
        body[field] = json!(value);
    }
}

/// Whether two resource URLs name the same resource (compared from `projects/` on).
fn same_link(a: &str, b: &str) -> bool {
    let rel = |l: &str| l.find("projects/").map(|i| l[i..].to_string());
    a == b || (rel(a).is_some() && rel(a) == rel(b))
}

fn links<'a>(body: &'a Value, field: &str) -> impl Iterator<Item = String> + 'a {
    body.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
}

fn singular(collection: &str) -> &str {
    match collection {
        "addresses" => "address",
        "forwardingRules" => "forwardingRule",
        "targetPools" => "targetPool",
        "httpHealthChecks" => "httpHealthCheck",
        "firewalls" => "firewall",
        other => other,
    }
}

/// A short opaque token (fingerprints, operation name suffixes).
fn fingerprint(seed: &u64) -> String {
    format!("{:08x}", seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32)
}

/// One clause of a list `filter`: `field = "literal"`, `field != "literal"`, or
/// `field eq "regex"` / `field ne "regex"` (RE2, matched against the whole value). Anything
/// else is refused, as GCE refuses what it cannot parse.
#[derive(Debug)]
struct Filter {
    field: String,
    negate: bool,
    pattern: Regex,
}

impl Filter {
    fn parse(filter: &str) -> Result<Filter, String> {
        let mut words = filter.trim().splitn(3, char::is_whitespace);
        let (Some(field), Some(op), Some(value)) = (words.next(), words.next(), words.next())
        else {
            return Err(format!("cannot parse {filter:?}"));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let (negate, pattern) = match op {
            "=" => (false, regex::escape(value)),
            "!=" => (true, regex::escape(value)),
            "eq" => (false, value.to_string()),
            "ne" => (true, value.to_string()),
            other => return Err(format!("unknown operator {other:?}")),
        };
        if !field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        {
            return Err(format!("bad field {field:?}"));
        }
        let pattern = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())?;
        Ok(Filter {
            field: field.to_string(),
            negate,
            pattern,
        })
    }

    fn matches(&self, item: &Value) -> bool {
        let value = self
            .field
            .split('.')
            .try_fold(item, |v, k| v.get(k))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        self.pattern.is_match(&value) != self.negate
    }
}
