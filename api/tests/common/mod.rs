//! Helpers shared by the api's integration tests.

/// Sum of the samples of metric `name` (counters and gauges) whose labels include all of `labels`.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                total += m.get_counter().get_value() + m.get_gauge().get_value();
            }
        }
    }
    total
}
