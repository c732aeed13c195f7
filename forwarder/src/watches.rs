//! Keeping reflector stores of the API's objects current, and poking the planner when an
//! event matters. A store keeps its last contents while the watch is failing (the watcher
//! retries with backoff and replaces them only after a successful relist): what the forwarder
//! cannot see, it keeps believing.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

/// Keeps a reflector store of `api` current, poking `changed` on every event.
pub fn watch_into<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: &'static str,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watch_filtered(api, config, changed, what, |_, _| true)
}

/// Keeps a reflector store of `api` current, poking `changed` on the events `matters` (given
/// each event once the store has it) says count.
pub fn watch_filtered<K, F>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: &'static str,
    mut matters: F,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    F: FnMut(&watcher::Event<K>, &Store<K>) -> bool + Send + 'static,
{
    let (store, writer) = reflector::store();
    let reader = store.clone();
    tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config).default_backoff());
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if matters(&event, &reader) {
                        changed.notify_one();
                    }
                }
                Err(err) => warn!(error = %err, "watching {what}"),
            }
        }
    });
    store
}
