//! The alert rules and the dashboard (deploy/monitoring) against a real
//! scrape: every series they query must be exported by a freshly started
//! server, with the labels they match on. A renamed metric or label then
//! fails here, rather than as a dashboard that shows "no data" or an alert
//! that can never fire.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde::Deserialize;
use sqlx::PgPool;

use crate::helpers::*;
use crate::metrics::scrape;

/// The service's metrics.
const PREFIX: &str = "channel_assignment_";

/// The only other series the rules may read: Prometheus's own `up`, and
/// kube-state-metrics' view of the Deployment. Any other name is a typo or
/// a metric of the service without its prefix.
const EXTERNAL: &[&str] = &[
    "up",
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
];

/// Labels that Prometheus puts on every series of a target (from service
/// discovery), which the service's exposition does not carry.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "job",
    "instance",
    "service",
    "endpoint",
    "container",
];

fn monitoring_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(name)
}

fn read(name: &str) -> String {
    let path = monitoring_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
}

/// One series selector of a query: the metric's name and its label matchers.
#[derive(Debug)]
struct Selector {
    name: Option<String>,
    matchers: Vec<Matcher>,
}

/// Every vector and matrix selector of an expression, however deeply nested.
#[derive(Default)]
struct Selectors(Vec<Selector>);

impl Selectors {
    fn add(&mut self, selector: &VectorSelector) {
        let matchers: Vec<Matcher> = selector
            .matchers
            .matchers
            .iter()
            .chain(selector.matchers.or_matchers.iter().flatten())
            .cloned()
            .collect();
        let name = selector.name.clone().or_else(|| {
            matchers
                .iter()
                .find(|matcher| matcher.name == "__name__" && matcher.op == MatchOp::Equal)
                .map(|matcher| matcher.value.clone())
        });
        self.0.push(Selector { name, matchers });
    }
}

impl ExprVisitor for Selectors {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(selector) => self.add(selector),
            Expr::MatrixSelector(matrix) => self.add(&matrix.vs),
            _ => {}
        }
        Ok(true)
    }
}

fn selectors(origin: &str, query: &str) -> Vec<Selector> {
    let expr = parser::parse(query)
        .unwrap_or_else(|error| panic!("{origin}: not valid PromQL ({error}):\n{query}"));
    let mut found = Selectors::default();
    let Ok(_) = walk_expr(&mut found, &expr);
    assert!(!found.0.is_empty(), "{origin}: selects no series:\n{query}");
    found.0
}

/// Where a query comes from, and the selectors it holds.
struct Query {
    origin: String,
    selectors: Vec<Selector>,
}

fn alert_rule_queries() -> Vec<Query> {
    let file: RuleFile = serde_norway::from_str(&read("alerts.yaml")).expect("alerts.yaml parses");
    let rules: Vec<Rule> = file
        .groups
        .into_iter()
        .flat_map(|group| group.rules)
        .collect();
    assert!(!rules.is_empty(), "alerts.yaml holds no rule");
    rules
        .into_iter()
        .map(|rule| {
            let origin = format!(
                "alerts.yaml: {}",
                rule.alert.or(rule.record).expect("a rule is named")
            );
            Query {
                selectors: selectors(&origin, &rule.expr),
                origin,
            }
        })
        .collect()
}

/// A dashboard query as Prometheus would get it: Grafana's interval
/// variables become a duration, the dashboard's own variables a label value.
/// An unknown variable fails the test, as it would show nothing in Grafana.
fn expand(origin: &str, query: &str, variables: &BTreeSet<String>) -> String {
    let mut expanded = String::new();
    let mut rest = query;
    while let Some(at) = rest.find('$') {
        expanded.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, taken) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').expect("a closing brace");
                (&braced[..end], end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match name {
            "__rate_interval" | "__interval" | "__range" => expanded.push_str("5m"),
            _ if variables.contains(name) => expanded.push_str("value"),
            _ => panic!("{origin}: unknown variable ${name} in {query}"),
        }
        rest = &after[taken..];
    }
    expanded.push_str(rest);
    expanded
}

fn dashboard_queries() -> Vec<Query> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("dashboard.json")).expect("dashboard.json parses");
    let variables_list = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variables: BTreeSet<String> = variables_list
        .iter()
        .map(|variable| variable["name"].as_str().expect("a name").to_owned())
        .collect();
    let mut queries = Vec::new();

    // Query variables: label_values(selector, label).
    for variable in variables_list {
        if variable["type"] != "query" {
            continue;
        }
        let origin = format!("dashboard.json: variable {}", variable["name"]);
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .expect("a query");
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|args| args.strip_suffix(')'))
            .and_then(|args| args.rsplit_once(','))
            .unwrap_or_else(|| panic!("{origin}: expected label_values(selector, label)"));
        let mut selectors = selectors(&origin, &expand(&origin, selector, &variables));
        // The label the variable lists must be on the series too: as the
        // matcher `label!=""` (the label is set).
        for selector in &mut selectors {
            selector.matchers.push(Matcher {
                op: MatchOp::NotEqual,
                name: label.trim().to_owned(),
                value: String::new(),
            });
        }
        queries.push(Query { origin, selectors });
    }

    // Every panel's targets, rows' nested panels included.
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut targets = 0;
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        let Some(panel_targets) = panel["targets"].as_array() else {
            assert_eq!(panel["type"], "row", "a panel without targets: {panel}");
            continue;
        };
        for target in panel_targets {
            let origin = format!("dashboard.json: panel {}", panel["title"]);
            let query = target["expr"].as_str().expect("a PromQL expr");
            targets += 1;
            queries.push(Query {
                selectors: selectors(&origin, &expand(&origin, query, &variables)),
                origin,
            });
        }
    }
    assert!(targets > 0, "dashboard.json has no query");
    queries
}

/// The series of an OpenMetrics text: sample name to the label sets seen.
fn exported_series(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.chars();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                let key = key.trim_start_matches(',').to_owned();
                if key.is_empty() || key.starts_with('}') {
                    break;
                }
                assert_eq!(chars.next(), Some('"'), "{line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
            }
        }
        series.entry(name.to_owned()).or_default().push(labels);
    }
    series
}

/// What a selector needs that the scrape lacks.
fn problems(
    selector: &Selector,
    exported: &BTreeMap<String, Vec<BTreeMap<String, String>>>,
) -> Vec<String> {
    let Some(name) = &selector.name else {
        return vec!["a selector without a metric name".to_owned()];
    };
    let Some(samples) = exported.get(name) else {
        return vec![format!("{name} is not in the scrape")];
    };
    let mut missing = Vec::new();
    for matcher in &selector.matchers {
        let label = matcher.name.as_str();
        if label == "__name__" || TARGET_LABELS.contains(&label) {
            continue;
        }
        if !samples.iter().any(|labels| labels.contains_key(label)) {
            missing.push(format!("{name} has no label {label}"));
        } else if matcher.op == MatchOp::Equal
            && !matcher.value.is_empty()
            && !samples
                .iter()
                .any(|labels| labels.get(label) == Some(&matcher.value))
        {
            missing.push(format!(
                "{name} has no series with {label}=\"{}\"",
                matcher.value
            ));
        }
    }
    missing
}

#[sqlx::test]
async fn alert_rules_and_dashboard_query_only_series_a_fresh_server_exports(pool: PgPool) {
    let mut queries = alert_rule_queries();
    queries.extend(dashboard_queries());
    // Every series read is the service's or a known outside one, and each
    // dashboard query reads at least one of the service's.
    for query in &queries {
        let names: Vec<&str> = query
            .selectors
            .iter()
            .filter_map(|selector| selector.name.as_deref())
            .collect();
        for name in &names {
            assert!(
                name.starts_with(PREFIX) || EXTERNAL.contains(name),
                "{}: reads {name}, neither the service's metric nor a known outside series",
                query.origin
            );
        }
        assert!(
            !query.origin.starts_with("dashboard.json")
                || names.iter().any(|name| name.starts_with(PREFIX)),
            "{}: reads none of the service's metrics: {names:?}",
            query.origin
        );
    }

    // Fresh: nothing has been called yet, so every series must exist from
    // the start (a counter at 0), not appear with its first increment.
    let app = spawn_app(&pool).await;
    let text = scrape(app.metrics_addr).await;
    let exported = exported_series(&text);

    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut checked = BTreeSet::new();
    for query in &queries {
        for selector in &query.selectors {
            let Some(name) = selector.name.as_deref() else {
                continue;
            };
            if !name.starts_with(PREFIX) {
                continue;
            }
            checked.insert(name.to_owned());
            for problem in problems(selector, &exported) {
                missing
                    .entry(problem)
                    .or_default()
                    .insert(query.origin.clone());
            }
        }
    }
    assert!(!checked.is_empty());
    let report: Vec<String> = missing
        .iter()
        .map(|(problem, origins)| format!("{problem} (used by {origins:?})"))
        .collect();
    assert!(
        report.is_empty(),
        "series the rules or the dashboard need are missing from a fresh scrape:\n  {}\n\
         checked: {checked:?}\nexported: {:?}",
        report.join("\n  "),
        exported.keys().collect::<Vec<_>>()
    );
}

/// prometheusrule.yaml is generated from alerts.yaml
/// (deploy/monitoring/sync-prometheusrule): the operator's copy must not
/// drift from the promtool-tested one.
#[test]
fn the_prometheus_rule_carries_the_tested_alert_rules() {
    let rules: serde_norway::Value =
        serde_norway::from_str(&read("alerts.yaml")).expect("alerts.yaml parses");
    let resource: serde_norway::Value =
        serde_norway::from_str(&read("prometheusrule.yaml")).expect("prometheusrule.yaml parses");
    assert_eq!(resource["kind"], "PrometheusRule");
    assert!(
        resource["spec"] == rules,
        "prometheusrule.yaml's spec differs from alerts.yaml: run deploy/monitoring/sync-prometheusrule"
    );
}
