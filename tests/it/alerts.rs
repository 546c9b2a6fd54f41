//! The shipped monitoring: `deploy/prometheus/alerts.yml` passes
//! `promtool check rules`, its unit tests (`alerts_test.yml`: each alert
//! fires on synthetic series when it should and stays quiet otherwise) pass
//! `promtool test rules`, and every query of the Grafana dashboard names
//! only metrics the server exports.
//!
//! promtool comes from Debian's `prometheus` package (installed by
//! `scripts/test.sh`); locally without it the promtool checks are skipped
//! with a note, under CI they fail.

use std::process::Command;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");

/// promtool, or `None` (with a note) when it is missing outside CI.
fn promtool() -> Option<&'static str> {
    match Command::new("promtool").arg("--version").output() {
        Ok(_) => Some("promtool"),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("promtool is not installed; CI must check the alert rules with it")
        }
        Err(_) => {
            eprintln!("promtool is not installed: skipping the alert rule checks");
            None
        }
    }
}

fn run(args: &[&str]) {
    let Some(promtool) = promtool() else {
        return;
    };
    let output = Command::new(promtool)
        .args(args)
        .current_dir(DIR)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_alert_rules_are_valid() {
    run(&["check", "rules", "alerts.yml"]);
}

#[test]
fn the_alert_rules_fire_when_they_should() {
    run(&["test", "rules", "alerts_test.yml"]);
}

/// Every `agent_lifecycle_...` name the dashboard and the rules query is
/// one the server exports (checked against a fresh registry, with the
/// per-call metrics registered as the server does).
#[test]
fn dashboards_and_rules_query_exported_metrics() {
    let service = agent_lifecycle::AgentLifecycleService::in_memory();
    let service = match service {
        Ok(service) => service,
        Err(err) => panic!("service: {err}"),
    };
    let registry = service.metrics().registry();
    let rpc =
        agent_lifecycle::api::grpc::observe::RpcMetrics::register(registry).expect("register");
    // Labelled families appear once they have a series.
    use agent_lifecycle::api::grpc::{CallObserver, CallRecord};
    rpc.observe(&CallRecord {
        method: "/agentlifecycle.v1.AgentLifecycleService/RegisterAgent",
        duration: std::time::Duration::from_millis(1),
        code: Some(tonic::Code::PermissionDenied),
    });
    let webhooks = service.metrics().webhooks();
    webhooks.delivery("w", "delivered");
    webhooks.failure("w");
    webhooks.progress("w", 0, None);
    let exported: Vec<String> = registry
        .gather()
        .iter()
        .map(|family| family.name().to_string())
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/agent-lifecycle.json"
    ))
    .expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let rules = std::fs::read_to_string(format!("{DIR}/alerts.yml")).expect("rules");
    for text in [dashboard, rules] {
        for (at, _) in text.match_indices("agent_lifecycle_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exported.iter().any(|e| e == base || e == &name),
                "{name} is not exported (exported: {exported:?})"
            );
        }
    }
}
