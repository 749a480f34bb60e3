//! Kubernetes Events about a `TickPipeline`, what `kubectl describe tp` and `kubectl events` show.
//!
//! Two kinds, deduplicated differently:
//! - **changes** (Normal): `TopicCreated`, `TopicGrown`, `Scaled` (from → to, and why), `Paused`,
//!   `Resumed`. The controller publishes one only when the change happens (it compares with what
//!   the status already says), so each is a new Event with its own message.
//! - **warnings** (Warning): `InvalidSpec`, `KafkaUnreachable`, `SecretNotOffered`,
//!   `SecretNotFound`, `SecretUnreadable`. They repeat while the problem
//!   lasts (every retry), so they go through one shared kube [`Recorder`], which turns a repeat
//!   into a count on the first Event (`series.count`, shown as `(xN over M)`), and at most one
//!   publish per pipeline and reason every [`WARNING_INTERVAL`]: a pipeline whose Kafka is down
//!   costs one Event API call a minute, not one per retry.
//!
//! Publishing never fails a reconcile: an Event that cannot be written is logged (once per
//! [`WARNING_INTERVAL`] and reason) and dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tokio::time::Instant;
use tracing::warn;

use crate::TickPipeline;

/// Shortest time between two publishes of the same warning for the same pipeline.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The `reportingController` of the operator's Events.
pub const REPORTING_CONTROLLER: &str = "tickfleet.io/operator";

/// Publishes the operator's Events.
pub struct Events {
    client: Client,
    reporter: Reporter,
    warnings: Recorder,
    /// `(pipeline uid, reason)` → when that warning was last published.
    last_warning: Mutex<HashMap<(String, String), Instant>>,
}

impl Events {
    /// Events reported as `instance` (the pod name) of [`REPORTING_CONTROLLER`].
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_string(),
            instance,
        };
        Self {
            warnings: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            last_warning: Mutex::new(HashMap::new()),
        }
    }

    /// A Normal Event for a change the operator made or saw (published as a new Event).
    pub async fn change(&self, tp: &TickPipeline, reason: &str, action: &str, note: String) {
        // a recorder of its own: kube's cache would fold a second `Scaled` into the first one's
        // series and keep the first one's message
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        publish(&recorder, tp, EventType::Normal, reason, action, note).await;
    }

    /// A Warning Event for a problem that may repeat at every retry (rate-limited, counted).
    pub async fn warning(&self, tp: &TickPipeline, reason: &str, action: &str, note: String) {
        let key = (tp.uid().unwrap_or_default(), reason.to_string());
        {
            let mut last = self.last_warning.lock().expect("events lock");
            let now = Instant::now();
            if last
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < WARNING_INTERVAL)
            {
                return;
            }
            last.insert(key, now);
        }
        publish(&self.warnings, tp, EventType::Warning, reason, action, note).await;
    }
}

/// Kubernetes caps an Event's note at 1 kB.
const MAX_NOTE: usize = 1024;

fn truncate(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

async fn publish(
    recorder: &Recorder,
    tp: &TickPipeline,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note)),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &tp.object_ref(&())).await {
        warn!(pipeline = %tp.name_any(), reason, error = %e, "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let note = "é".repeat(600);
        let cut = truncate(note);
        assert!(cut.len() <= MAX_NOTE);
        assert!(cut.ends_with("..."));
        assert_eq!(truncate("short".into()), "short");
    }
}
