//! Prometheus metrics, owned by the node (no process-global recorder), so
//! several nodes can run in one test process.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub delivered: Counter,
    pub routed: Counter,
    pub rerouted: Counter,
    pub mailboxed: Counter,
    pub dead: Counter,
    pub reaped: Counter,
    pub route_latency: Histogram,
    pub redis_errors: Counter,
    pub lease_renewals: Counter,
    pub lease_losses: Counter,
    pub dropped_topic: Counter,
    pub mailbox_dropped: Counter,
    pub reconciled: Counter,
    pub deduplicated: Counter,
    pub resumed: Counter,
    pub resume_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Gauge::default(),
            delivered: Counter::default(),
            routed: Counter::default(),
            rerouted: Counter::default(),
            mailboxed: Counter::default(),
            dead: Counter::default(),
            reaped: Counter::default(),
            route_latency: Histogram::new([
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0,
            ]),
            redis_errors: Counter::default(),
            lease_renewals: Counter::default(),
            lease_losses: Counter::default(),
            dropped_topic: Counter::default(),
            mailbox_dropped: Counter::default(),
            reconciled: Counter::default(),
            deduplicated: Counter::default(),
            resumed: Counter::default(),
            resume_failed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "wsc_connections",
            "Open WebSocket connections on this node",
            m.connections.clone(),
        );
        registry.register(
            "wsc_messages_delivered",
            "Messages written to client sockets",
            m.delivered.clone(),
        );
        registry.register(
            "wsc_messages_routed",
            "Send-stream entries routed by this node",
            m.routed.clone(),
        );
        registry.register(
            "wsc_messages_rerouted",
            "Messages routed again (user moved, node reaped, slow consumer)",
            m.rerouted.clone(),
        );
        registry.register(
            "wsc_messages_mailboxed",
            "Messages kept in an offline user's mailbox",
            m.mailboxed.clone(),
        );
        registry.register(
            "wsc_messages_mailbox_dropped",
            "Mailboxed messages dropped, oldest first, over --mailbox-max or --mailbox-max-bytes",
            m.mailbox_dropped.clone(),
        );
        registry.register(
            "wsc_stale_registrations_removed",
            "Connection entries naming this node without a socket here, removed by reconciliation",
            m.reconciled.clone(),
        );
        registry.register(
            "wsc_messages_deduplicated",
            "Messages not delivered again: their idempotency key was seen before (contract §4)",
            m.deduplicated.clone(),
        );
        registry.register(
            "wsc_resumes_recovered",
            "Resume requests answered recovered:true (contract §9)",
            m.resumed.clone(),
        );
        registry.register(
            "wsc_resumes_not_recovered",
            "Resume requests answered recovered:false (contract §9)",
            m.resume_failed.clone(),
        );
        registry.register(
            "wsc_messages_dead",
            "Send-stream entries moved to the dead-letter stream",
            m.dead.clone(),
        );
        registry.register(
            "wsc_nodes_reaped",
            "Dead nodes reaped by this node",
            m.reaped.clone(),
        );
        registry.register(
            "wsc_route_latency_seconds",
            "Time from the send stream to the socket write",
            m.route_latency.clone(),
        );
        registry.register(
            "wsc_redis_errors",
            "Redis commands that failed",
            m.redis_errors.clone(),
        );
        registry.register(
            "wsc_lease_renewals",
            "Successful lease renewals",
            m.lease_renewals.clone(),
        );
        registry.register(
            "wsc_lease_losses",
            "Times this node found its lease gone and took a new id",
            m.lease_losses.clone(),
        );
        registry.register(
            "wsc_topic_messages_dropped",
            "Topic messages dropped for a subscriber whose outbox was full",
            m.dropped_topic.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The counters the operator page shows, read from the registry's
    /// metrics themselves (names as exposed).
    pub fn overview(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("wsc_connections", self.connections.get().max(0) as u64),
            ("wsc_messages_delivered_total", self.delivered.get()),
            ("wsc_messages_routed_total", self.routed.get()),
            ("wsc_messages_rerouted_total", self.rerouted.get()),
            ("wsc_messages_mailboxed_total", self.mailboxed.get()),
            ("wsc_messages_dead_total", self.dead.get()),
            ("wsc_nodes_reaped_total", self.reaped.get()),
        ]
    }

    /// Prometheus text exposition, format 0.0.4 (contract §8: "Prometheus
    /// text"), which every scraper and parser reads.
    pub fn render(&self) -> String {
        let mut open = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut open, &self.registry);
        prometheus_text(&open)
    }
}

/// The Prometheus text format of an OpenMetrics exposition (what the
/// registry writes): a counter's family is named after its samples
/// (`x_total`, where OpenMetrics says `x`), and no `# UNIT` or `# EOF`.
fn prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(p);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        let m = super::Metrics::new();
        m.delivered.inc();
        assert!(m.overview().contains(&("wsc_messages_delivered_total", 1)));
        let text = m.render();
        for name in [
            "wsc_connections",
            "wsc_messages_delivered_total 1",
            "wsc_messages_routed_total",
            "wsc_messages_rerouted_total",
            "wsc_messages_mailboxed_total",
            "wsc_messages_dead_total",
            "wsc_nodes_reaped_total",
            "wsc_route_latency_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // Prometheus text (0.0.4): a counter's family carries its samples'
        // name; no OpenMetrics end marker.
        assert!(text.contains("# TYPE wsc_messages_delivered_total counter\n"));
        assert!(text.contains("# HELP wsc_messages_delivered_total "));
        assert!(text.contains("# TYPE wsc_connections gauge\n"));
        assert!(text.contains("# TYPE wsc_route_latency_seconds histogram\n"));
        assert!(!text.contains("# EOF"), "{text}");
    }
}
