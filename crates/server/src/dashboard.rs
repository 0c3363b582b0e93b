//! The operations console at `/`: brokers with their envs, types and health; topics with live
//! counters and throughput charts; for one topic in one env, its consumer groups with lag, its
//! dead letters (with reason, and redrive and purge buttons) and a browser of its stored
//! messages; the scheduled jobs with their next run, last result and failures. Plain HTML
//! rendered here, inline JavaScript, no external assets.
//!
//! The page needs an API key (a read-only one is enough to see): open `/?key=KEY` or type it
//! into the sign-in field. The page then keeps the key in the browser's localStorage, removes it
//! from the address bar, and uses it as a Bearer token for the same `/v1` routes the CLI uses.
//! With a read-only key the page offers no redrive or purge (the routes refuse them anyway).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use polybus::{Broker, Topic};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiQuery;
use crate::metrics::TopicStats;
use crate::state::AppState;

const STYLE: &str = include_str!("dashboard/style.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const SIGN_IN_SCRIPT: &str = include_str!("dashboard/sign-in.js");

/// The panel for one topic in one env, filled by the script when a topic's Operate is pressed.
const DETAIL: &str = include_str!("dashboard/detail.html");
/// The jobs table, filled by the script from `/v1/jobs`.
const JOBS: &str = include_str!("dashboard/jobs.html");

/// The dashboard route (no key needed for the page itself; it asks for one).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(dashboard))
}

/// How the page was opened.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DashboardQuery {
    /// An API key (read-only is enough); the page moves it to localStorage.
    key: Option<String>,
    /// Present after signing out: show the sign-in form without reusing a stored key.
    signout: Option<String>,
}

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "dashboard", security(()), params(DashboardQuery),
    responses(
        (status = 200, description = "The dashboard, or a sign-in form when no key is given", content_type = "text/html", body = String),
        (status = 401, description = "Sign-in form: the key is not valid", content_type = "text/html", body = String),
    ))]
async fn dashboard(State(state): State<AppState>, ApiQuery(query): ApiQuery<DashboardQuery>) -> Response {
    let Some(key) = query.key.filter(|k| !k.trim().is_empty()) else {
        return page(StatusCode::OK, sign_in(None, query.signout.is_some()));
    };
    let can_write = match state.keys().verify(key.trim()).await {
        Ok(Some(info)) => !info.read_only,
        Ok(None) => return page(StatusCode::UNAUTHORIZED, sign_in(Some("That key is not valid."), true)),
        Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, sign_in(Some(&e.to_string()), true)),
    };
    let registry = state.registry();
    let loaded = async {
        Ok::<_, polybus::Error>((registry.fetch_brokers().await?, registry.fetch_topics(None).await?))
    };
    match loaded.await {
        Ok((brokers, topics)) => {
            let stats = state.metrics().stats();
            page(StatusCode::OK, overview(key.trim(), can_write, &brokers, &topics, &stats.topics))
        }
        Err(e) => {
            page(StatusCode::SERVICE_UNAVAILABLE, sign_in(Some(&format!("The registry failed: {e}")), true))
        }
    }
}

fn page(status: StatusCode, html: String) -> Response {
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn shell(title: &str, body_attrs: &str, body: &str, script: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body{body_attrs}>\n{body}\n<script>{script}</script>\n</body></html>\n",
        esc(title)
    )
}

fn sign_in(problem: Option<&str>, no_reuse: bool) -> String {
    let problem = problem.map(|p| format!("<p class=\"problem\">{}</p>", esc(p))).unwrap_or_default();
    let body = format!(
        "<main class=\"sign-in\"><h1>polybus</h1>{problem}\
         <form method=\"get\" action=\"/\"><label>API key <input type=\"password\" name=\"key\" autocomplete=\"off\" required></label>\
         <button type=\"submit\">Open dashboard</button></form>\
         <p class=\"hint\">Create a key with <code>polybus key create --name NAME --read-only</code>.</p></main>"
    );
    let attrs = if no_reuse { " data-no-reuse=\"1\"" } else { "" };
    shell("polybus — sign in", attrs, &body, SIGN_IN_SCRIPT)
}

fn overview(
    key: &str,
    can_write: bool,
    brokers: &[Broker],
    topics: &[Topic],
    stats: &[TopicStats],
) -> String {
    let counts: BTreeMap<(&str, &str), &TopicStats> =
        stats.iter().map(|t| ((t.env.as_str(), t.event.as_str()), t)).collect();
    let mut body = String::from(
        "<header><h1>polybus</h1><span id=\"status\" class=\"muted\"></span>\
         <button id=\"sign-out\" type=\"button\">Sign out</button></header>\n<main>\n",
    );
    body.push_str("<section><h2>Brokers</h2>");
    if brokers.is_empty() {
        body.push_str("<p class=\"muted\">No brokers yet: <code>polybus broker create -f broker.yaml</code> or <code>POST /v1/brokers</code>.</p>");
    } else {
        body.push_str("<table id=\"brokers\"><thead><tr><th>Broker</th><th>Name</th><th>Env</th><th>Type</th><th>Health</th></tr></thead><tbody>");
        for broker in brokers {
            for (i, env) in broker.envs.iter().enumerate() {
                let (tag, name) = if i == 0 {
                    (esc(&broker.tag), esc(&broker.name))
                } else {
                    (String::new(), String::new())
                };
                let _ = write!(
                    body,
                    "<tr><td class=\"broker-tag\">{tag}</td><td>{name}</td><td class=\"env\">{}</td>\
                     <td class=\"env-type\">{}</td><td class=\"health\" data-broker=\"{}\" data-env=\"{}\">checking…</td></tr>",
                    esc(&env.slug),
                    esc(env.broker_type.as_str()),
                    esc(&broker.tag),
                    esc(&env.slug),
                );
            }
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section>\n<section><h2>Topics</h2>");
    if topics.is_empty() {
        body.push_str("<p class=\"muted\">No topics yet: <code>polybus topic create -f topic.yaml</code> or <code>POST /v1/topics</code>.</p>");
    } else {
        body.push_str(
            "<table id=\"topics\"><thead><tr><th>Event</th><th>Env</th><th>Published</th><th>Delivered</th>\
             <th>Acked</th><th>Nacked</th><th>Dead-lettered</th><th>Throughput (msg/s)</th><th>Last 5 minutes</th><th></th></tr></thead><tbody>",
        );
        for topic in topics {
            let broker_tag = topic.event().map(|e| e.broker).unwrap_or_default();
            let envs: Vec<&str> = brokers
                .iter()
                .find(|b| b.tag == broker_tag)
                .map(|b| b.envs.iter().map(|e| e.slug.as_str()).collect())
                .unwrap_or_default();
            for env in envs {
                let t = counts.get(&(env, topic.tag.as_str()));
                let n = |f: fn(&TopicStats) -> u64| t.map_or(0, |t| f(t));
                let _ = write!(
                    body,
                    "<tr class=\"topic\" data-event=\"{event}\" data-env=\"{env}\"><td class=\"event\">{event}</td><td>{env}</td>\
                     <td class=\"published\">{}</td><td class=\"delivered\">{}</td><td class=\"acked\">{}</td>\
                     <td class=\"nacked\">{}</td><td class=\"dead-lettered\">{}</td><td class=\"rate\">–</td>\
                     <td><canvas class=\"chart\" width=\"300\" height=\"48\"></canvas></td>\
                     <td><button type=\"button\" class=\"open\">Operate</button></td></tr>",
                    n(|t| t.published),
                    n(|t| t.delivered),
                    n(|t| t.acked),
                    n(|t| t.nacked),
                    n(|t| t.dead_lettered),
                    event = esc(&topic.tag),
                    env = esc(env),
                );
            }
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section>\n");
    body.push_str(JOBS);
    body.push_str(DETAIL);
    body.push_str("</main>");
    let attrs = format!(" data-key=\"{}\" data-write=\"{}\"", esc(key), if can_write { "1" } else { "0" });
    shell("polybus console", &attrs, &body, SCRIPT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn overview_shows_brokers_envs_topics_and_counts() {
        let broker = Broker::from_value(serde_json::json!({
            "name": "<Bus>", "tag": "bus", "envs": [{"slug": "dev", "type": "embedded"}]
        }))
        .expect("broker");
        let topic = Topic::from_value(serde_json::json!({"tag": "bus:orders"})).expect("topic");
        let stats = TopicStats {
            broker: "bus".into(),
            env: "dev".into(),
            event: "bus:orders".into(),
            published: 7,
            publish_errors: 0,
            delivered: 2,
            acked: 1,
            nacked: 0,
            dead_lettered: 0,
            publish_latency_ms: 1.0,
        };
        let html = overview("pbk_x", false, &[broker], &[topic], &[stats]);
        assert!(html.contains("&lt;Bus&gt;"));
        assert!(html.contains("<td class=\"env-type\">embedded</td>"));
        assert!(html.contains("<td class=\"published\">7</td>"));
        assert!(html.contains("data-event=\"bus:orders\""));
        assert!(html.contains("data-write=\"0\""), "a read-only key is told to the page");
        assert!(html.contains("id=\"dead-letters\""));
    }
}
