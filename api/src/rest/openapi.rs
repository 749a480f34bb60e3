//! The OpenAPI 3.1 document of the REST api, generated from the handlers' and bodies' own annotations
//! (utoipa), served at `/openapi.json`, and a docs page at `/docs` rendered from that document on the
//! server: plain HTML and inline CSS, no script and nothing fetched from anywhere else.
//!
//! `api/openapi.json` is the committed copy; a test fails when the code's document differs from it
//! (regenerate with `tickfleet-api --print-openapi > api/openapi.json`).

use std::fmt::Write as _;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde_json::Value;
use utoipa::OpenApi;

use super::model::{Assets, Candle, Candles, Gap, LatestPrice, MovingAverage, Tick, TicksPage};
use super::polls::{PollJob, PollRequest, Quote, SymbolStatus};
use super::problem::Problem;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tickfleet REST api",
        description = "The queries of tickfleet's gRPC api (tickfleet.v1.TickService) as JSON over HTTP, \
            answered by the same implementation: latest prices, ticks by pages, OHLCV candles, moving \
            averages, assets, and live ticks and candles as Server-Sent Events. Prices are exact decimal \
            strings; 64-bit integers are strings of digits. Errors are RFC 9457 problem documents."
    ),
    paths(
        super::latest_price,
        super::list_ticks,
        super::stream_ticks,
        super::get_candles,
        super::stream_candles,
        super::moving_average,
        super::list_assets,
        super::polls::create_poll,
        super::polls::get_poll,
        super::polls::delete_poll,
    ),
    components(schemas(LatestPrice, Tick, TicksPage, Candle, Candles, MovingAverage, Assets, Gap, Problem,
        PollRequest, PollJob, SymbolStatus, Quote)),
    tags(
        (name = "prices", description = "Latest prices and averages"),
        (name = "ticks", description = "Stored and live ticks"),
        (name = "candles", description = "OHLCV candles, stored and live"),
        (name = "assets", description = "The assets the store holds"),
        (name = "polls", description = "Provider polling jobs (run by tickfleet-connector poll)"),
    )
)]
struct Doc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    Doc::openapi()
}

/// The document as pretty JSON with a final newline: what `/openapi.json` serves and
/// `api/openapi.json` holds.
pub fn json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

static JSON: LazyLock<String> = LazyLock::new(json);
static DOCS: LazyLock<String> = LazyLock::new(|| {
    let doc: Value = serde_json::from_str(&JSON).unwrap_or(Value::Null);
    docs_html(&doc)
});

/// `GET /openapi.json`.
pub async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], JSON.as_str())
}

/// `GET /docs`: the document as a page.
pub async fn docs() -> Html<&'static str> {
    Html(DOCS.as_str())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `#/components/schemas/Name` → `Name`, linked; an inline schema by its type.
fn schema_name(schema: &Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    match (&schema["type"], &schema["items"]) {
        (Value::String(t), items) if t == "array" => format!("array of {}", schema_name(items)),
        (Value::String(t), _) => esc(t),
        (Value::Array(ts), _) => esc(&ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" | ")),
        _ if schema["oneOf"].is_array() || schema["anyOf"].is_array() => "one of several".into(),
        _ => "any".into(),
    }
}

fn text(v: &Value) -> String {
    esc(v.as_str().unwrap_or(""))
}

/// Renders the page: every operation (parameters, responses) and every schema (properties).
pub fn docs_html(doc: &Value) -> String {
    let mut h = String::new();
    let title = text(&doc["info"]["title"]);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}\
         code,pre{{font-family:ui-monospace,monospace}}h2{{border-bottom:1px solid #ccc;margin-top:2.5rem}}\
         .op{{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}}\
         .m{{font-weight:bold;color:#fff;background:#2a7;border-radius:4px;padding:0 .4rem;margin-right:.5rem}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #eee;text-align:left;padding:.2rem .5rem;vertical-align:top}}</style>\
         </head><body><h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>The machine-readable document: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI {}).</p>",
        text(&doc["info"]["version"]),
        text(&doc["info"]["description"]),
        text(&doc["openapi"]),
    );
    h.push_str("<h2>Operations</h2>");
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            let Some(ops) = item.as_object() else {
                continue;
            };
            for (method, op) in ops {
                let _ = write!(
                    h,
                    "<div class=\"op\" id=\"{}\"><h3><span class=\"m\">{}</span><code>{}</code></h3><p><b>{}</b></p><p>{}</p>",
                    text(&op["operationId"]),
                    esc(&method.to_uppercase()),
                    esc(path),
                    text(&op["summary"]),
                    text(&op["description"]),
                );
                if let Some(params) = op["parameters"].as_array() {
                    h.push_str("<table><tr><th>parameter</th><th>type</th><th>required</th><th>meaning</th></tr>");
                    for p in params {
                        let _ = write!(
                            h,
                            "<tr><td><code>{}</code> ({})</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            text(&p["name"]),
                            text(&p["in"]),
                            schema_name(&p["schema"]),
                            if p["required"] == true { "yes" } else { "no" },
                            text(&p["description"]),
                        );
                    }
                    h.push_str("</table>");
                }
                h.push_str("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>");
                if let Some(responses) = op["responses"].as_object() {
                    for (status, r) in responses {
                        let body = r["content"]
                            .as_object()
                            .map(|c| {
                                c.iter()
                                    .map(|(ty, m)| {
                                        format!(
                                            "{} <code>{}</code>",
                                            schema_name(&m["schema"]),
                                            esc(ty)
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join("<br>")
                            })
                            .unwrap_or_default();
                        let _ = write!(
                            h,
                            "<tr><td>{}</td><td>{}</td><td>{body}</td></tr>",
                            esc(status),
                            text(&r["description"]),
                        );
                    }
                }
                h.push_str("</table></div>");
            }
        }
    }
    h.push_str("<h2>Schemas</h2>");
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for (name, s) in schemas {
            let required: Vec<&str> = s["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let _ = write!(
                h,
                "<div class=\"op\" id=\"schema-{0}\"><h3>{0}</h3><p>{1}</p><table><tr><th>property</th><th>type</th><th>required</th><th>meaning</th></tr>",
                esc(name),
                text(&s["description"]),
            );
            if let Some(props) = s["properties"].as_object() {
                for (p, ps) in props {
                    let _ = write!(
                        h,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(p),
                        schema_name(ps),
                        if required.contains(&p.as_str()) {
                            "yes"
                        } else {
                            "no"
                        },
                        text(&ps["description"]),
                    );
                }
            }
            h.push_str("</table></div>");
        }
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drift test: the committed `api/openapi.json` is what the code generates.
    #[test]
    fn committed_openapi_json_is_what_the_code_generates() {
        let committed = include_str!("../../openapi.json");
        assert!(
            committed == json(),
            "api/openapi.json is stale: run `tickfleet-api --print-openapi > api/openapi.json`"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_route_and_the_docs_page_shows_them() {
        let doc: Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
        assert_eq!(
            paths,
            [
                "/v1/assets",
                "/v1/candles",
                "/v1/candles/stream",
                "/v1/moving-average",
                "/v1/polls/{id}",
                "/v1/prices/latest",
                "/v1/prices/poll",
                "/v1/ticks",
                "/v1/ticks/stream"
            ]
        );
        let html = docs_html(&doc);
        for p in &paths {
            assert!(html.contains(&format!("<code>{p}</code>")), "{p}");
        }
        for s in ["LatestPrice", "Problem", "TicksPage"] {
            assert!(html.contains(&format!("id=\"schema-{s}\"")), "{s}");
        }
        assert!(!html.contains("<script"), "no script, nothing fetched");
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
