//! The lag-based worker autoscaling decision.
//!
//! `recommended = min(clamp(ceil(lag / targetLagPerWorker), minReplicas, maxReplicas), partitions)`.
//! Scaling up takes effect at once (lag is growing, more consumers help now). Scaling down only
//! goes as low as the highest recommendation within the stabilisation window, like the HPA's
//! `scaleDown.stabilizationWindowSeconds`, so a lag that dips for one poll does not remove
//! workers that are needed again on the next one.
//!
//! The window's history lives in status, kept as a list whose replica counts strictly decrease
//! from oldest to newest: a recommendation that is not higher than a later one can never be the
//! window's maximum again, so it is dropped. The list therefore holds at most `maxReplicas`
//! entries however long the window.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{AutoscalingSpec, AutoscalingStatus, Recommendation};

/// Inputs of one decision.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// Total consumer lag in messages.
    pub lag: i64,
    /// The pipeline's autoscaling settings.
    pub spec: &'a AutoscalingSpec,
    /// Partitions of the topic: never more workers than this.
    pub partitions: i32,
    /// Workers decided last time.
    pub current: i32,
    /// When the lag was measured.
    pub now: Timestamp,
    /// Recommendations of earlier decisions (from status).
    pub history: &'a [Recommendation],
}

/// The result of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What goes into status (and its `desired` into the worker Deployment).
    pub status: AutoscalingStatus,
    /// `(asked, partitions)` when `clamp(ceil(lag / target), min, max)` exceeded the partitions.
    pub capped: Option<(i32, i32)>,
}

/// `ceil(lag / target)`, 0 for no lag, saturating at `i32::MAX`.
pub fn workers_for_lag(lag: i64, target: i64) -> i32 {
    let lag = lag.max(0);
    let target = target.max(1);
    let n = lag / target + i64::from(lag % target != 0);
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Decides how many workers to run.
pub fn decide(input: &Input<'_>) -> Decision {
    let spec = input.spec;
    let raw = workers_for_lag(input.lag, spec.target_lag_per_worker);
    let clamped = raw.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let partitions = input.partitions.max(0);
    let recommended = clamped.min(partitions);
    let capped = (clamped > partitions).then_some((clamped, partitions));

    let window = SignedDuration::from_secs(spec.scale_down_stabilization_seconds.max(0));
    let horizon = input.now.checked_sub(window).unwrap_or(Timestamp::MIN);
    let mut history: Vec<Recommendation> = input
        .history
        .iter()
        .filter(|r| r.time.0 > horizon && r.time.0 <= input.now)
        .cloned()
        .collect();
    history.retain(|r| r.replicas > recommended);
    history.push(Recommendation {
        time: Time(input.now),
        replicas: recommended,
    });
    // Window maximum; history is strictly decreasing so it is the first entry, but take the max
    // in case status was edited by hand.
    let window_max = history
        .iter()
        .map(|r| r.replicas)
        .max()
        .unwrap_or(recommended);

    let (desired, reason) = if recommended > input.current {
        (recommended, "ScaleUp")
    } else if recommended == input.current {
        (recommended, "Stable")
    } else {
        let stabilized = window_max
            .min(input.current)
            .min(partitions)
            .max(recommended);
        if stabilized < input.current {
            (stabilized, "ScaleDown")
        } else {
            (stabilized, "ScaleDownStabilized")
        }
    };
    Decision {
        status: AutoscalingStatus {
            lag: input.lag,
            target_lag_per_worker: spec.target_lag_per_worker,
            recommended,
            desired,
            reason: reason.to_string(),
            time: Time(input.now),
            recommendations: history,
        },
        capped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscalingSpec {
        AutoscalingSpec {
            enabled: true,
            min_replicas: 1,
            max_replicas: 10,
            target_lag_per_worker: 1000,
            scale_down_stabilization_seconds: 300,
            poll_interval_seconds: 30,
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Runs one decision, feeding back history and current like the controller does.
    fn step(
        spec: &AutoscalingSpec,
        prev: Option<&AutoscalingStatus>,
        lag: i64,
        partitions: i32,
        t: i64,
    ) -> Decision {
        let history = prev.map(|p| p.recommendations.clone()).unwrap_or_default();
        decide(&Input {
            lag,
            spec,
            partitions,
            current: prev.map_or(spec.min_replicas, |p| p.desired),
            now: at(t),
            history: &history,
        })
    }

    #[test]
    fn ceil_of_lag_over_target() {
        assert_eq!(workers_for_lag(0, 1000), 0);
        assert_eq!(workers_for_lag(1, 1000), 1);
        assert_eq!(workers_for_lag(1000, 1000), 1);
        assert_eq!(workers_for_lag(1001, 1000), 2);
        assert_eq!(workers_for_lag(-5, 1000), 0);
        assert_eq!(workers_for_lag(i64::MAX, 1), i32::MAX);
    }

    #[test]
    fn clamps_to_min_max_and_partitions() {
        let s = spec();
        assert_eq!(step(&s, None, 0, 12, 0).status.desired, 1, "min");
        assert_eq!(step(&s, None, 4500, 12, 0).status.desired, 5);
        assert_eq!(step(&s, None, 50_000, 12, 0).status.desired, 10, "max");
        let d = step(&s, None, 50_000, 6, 0);
        assert_eq!(d.status.desired, 6, "partitions");
        assert_eq!(d.capped, Some((10, 6)));
        assert_eq!(step(&s, None, 4500, 6, 0).capped, None);
    }

    #[test]
    fn scales_up_at_once_and_records_inputs() {
        let s = spec();
        let first = step(&s, None, 2500, 12, 0);
        assert_eq!(first.status.desired, 3);
        assert_eq!(first.status.reason, "ScaleUp");
        assert_eq!(first.status.lag, 2500);
        assert_eq!(first.status.target_lag_per_worker, 1000);
        assert_eq!(first.status.recommended, 3);
        let second = step(&s, Some(&first.status), 7200, 12, 30);
        assert_eq!(
            (second.status.desired, second.status.reason.as_str()),
            (8, "ScaleUp")
        );
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let s = spec();
        let high = step(&s, None, 8000, 12, 0);
        assert_eq!(high.status.desired, 8);
        // lag drops right away: recommendation 2, but 8 was recommended within 300 s
        let low = step(&s, Some(&high.status), 1500, 12, 30);
        assert_eq!(low.status.recommended, 2);
        assert_eq!(
            (low.status.desired, low.status.reason.as_str()),
            (8, "ScaleDownStabilized")
        );
        // a middle recommendation inside the window
        let mid = step(&s, Some(&low.status), 4000, 12, 200);
        assert_eq!(mid.status.desired, 8);
        // 8 leaves the window at t=300 (exclusive): the window max is now 4
        let later = step(&s, Some(&mid.status), 1500, 12, 301);
        assert_eq!(
            (later.status.desired, later.status.reason.as_str()),
            (4, "ScaleDown")
        );
        // 4 (t=200) leaves at t=500
        let end = step(&s, Some(&later.status), 1500, 12, 501);
        assert_eq!(
            (end.status.desired, end.status.reason.as_str()),
            (2, "ScaleDown")
        );
        let steady = step(&s, Some(&end.status), 1500, 12, 531);
        assert_eq!(
            (steady.status.desired, steady.status.reason.as_str()),
            (2, "Stable")
        );
    }

    #[test]
    fn zero_window_scales_down_at_once() {
        let mut s = spec();
        s.scale_down_stabilization_seconds = 0;
        let high = step(&s, None, 8000, 12, 0);
        let low = step(&s, Some(&high.status), 1500, 12, 30);
        assert_eq!(
            (low.status.desired, low.status.reason.as_str()),
            (2, "ScaleDown")
        );
    }

    #[test]
    fn history_stays_decreasing_and_bounded() {
        let s = spec();
        let mut prev: Option<AutoscalingStatus> = None;
        // a saw-tooth of lags every 5 s for 20 minutes
        for i in 0..240 {
            let lag = [9000, 3000, 6000, 1000][i % 4];
            let d = step(&s, prev.as_ref(), lag, 12, i as i64 * 5);
            let reps: Vec<i32> = d
                .status
                .recommendations
                .iter()
                .map(|r| r.replicas)
                .collect();
            assert!(
                reps.windows(2).all(|w| w[0] > w[1]),
                "strictly decreasing: {reps:?}"
            );
            assert!(reps.len() <= s.max_replicas as usize);
            prev = Some(d.status);
        }
        // 9 is recommended every 20 s, so it never leaves the 300 s window
        assert_eq!(prev.unwrap().desired, 9);
    }

    #[test]
    fn partitions_shrinking_below_current_scale_down_immediately_to_cap() {
        let s = spec();
        let high = step(&s, None, 8000, 12, 0);
        let d = step(&s, Some(&high.status), 8000, 4, 10);
        assert_eq!(d.status.desired, 4);
        assert_eq!(d.capped, Some((8, 4)));
    }
}
