//! A local WebSocket server that plays a venue's documented messages from a script: the fixture venue of
//! the tests and of `tickctl demo --source`.
//!
//! A script is text, one step per line (blank lines and `#` comments are skipped):
//!
//! * `expect <json>`: wait for the client's next text frame and check that it is this JSON (compared as
//!   values, so key order and spacing do not matter) — the venue's subscribe message;
//! * `send <text>`: send a text frame, as is (malformed frames too);
//! * `ping <payload>`: send a ping frame and wait for the client's pong with the same payload;
//! * `disconnect`: drop the TCP connection without a close frame, mid-stream.
//!
//! Steps run in order across connections: after a `disconnect` the next connection continues with the
//! next step (typically the `expect` of the resubscription, then a replay of trades already sent). When
//! the script is over the connection stays open, answering `{"method":"ping"}` with a pong, until the
//! client leaves. A `#! key=value …` line states what the script should produce (counts written by
//! hand from the documented messages), read with [`Script::expected`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::{Error, Exchange};

/// `exchange`'s fixture script (`connector/tests/fixtures/*.script`) and the URL path its venue serves
/// on, for `tickctl demo --source`.
pub fn fixture(exchange: Exchange) -> (&'static str, &'static str) {
    match exchange {
        Exchange::Binance => (include_str!("../tests/fixtures/binance.script"), "stream"),
        Exchange::Coinbase => (include_str!("../tests/fixtures/coinbase.script"), ""),
        Exchange::Kraken => (include_str!("../tests/fixtures/kraken.script"), "v2"),
    }
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Wait for this JSON from the client.
    Expect(serde_json::Value),
    /// Send this text frame.
    Send(String),
    /// Send a ping with this payload and wait for its pong.
    Ping(String),
    /// Drop the connection.
    Disconnect,
}

/// A parsed script.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The steps, in order.
    pub steps: Vec<Step>,
    expected: HashMap<String, u64>,
}

impl Script {
    /// Parses a script's text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut script = Script::default();
        for (n, line) in text.lines().enumerate() {
            let bad = |what: &str| Error::Config(format!("script line {}: {what}", n + 1));
            if let Some(kv) = line.strip_prefix("#!") {
                for pair in kv.split_whitespace() {
                    let (k, v) = pair.split_once('=').ok_or_else(|| bad("not key=value"))?;
                    let v = v.parse().map_err(|_| bad("not a count"))?;
                    script.expected.insert(k.to_owned(), v);
                }
                continue;
            }
            let line = line.trim_end();
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
            script.steps.push(match verb {
                "expect" => Step::Expect(
                    serde_json::from_str(rest).map_err(|e| bad(&format!("expect: {e}")))?,
                ),
                "send" => Step::Send(rest.to_owned()),
                "ping" => Step::Ping(rest.to_owned()),
                "disconnect" => Step::Disconnect,
                other => return Err(bad(&format!("unknown step {other:?}"))),
            });
        }
        Ok(script)
    }

    /// A count from the script's `#!` lines (0 when absent).
    pub fn expected(&self, key: &str) -> u64 {
        self.expected.get(key).copied().unwrap_or(0)
    }
}

/// What the server saw, for the tests.
#[derive(Debug, Default)]
pub struct ReplayStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// `expect` steps the client satisfied.
    pub subscribes: AtomicU64,
    /// `expect` steps the client got wrong (the connection is dropped).
    pub mismatches: AtomicU64,
    /// Pongs received with the right payload.
    pub pongs: AtomicU64,
    /// Application pings answered.
    pub pings_answered: AtomicU64,
    /// 1 once every step has run.
    pub finished: AtomicU64,
}

/// A running replay server.
pub struct ReplayServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<ReplayStats>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplayServer {
    /// Binds `addr` (port 0 for any) and plays `script` to whoever connects, one connection at a time.
    pub async fn start(addr: SocketAddr, script: Script) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ReplayStats::default());
        let task = tokio::spawn(serve(listener, script, stats.clone()));
        Ok(ReplayServer { addr, stats, task })
    }

    /// `ws://ADDR/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Whether every step has run.
    pub fn finished(&self) -> bool {
        self.stats.finished.load(Ordering::Relaxed) == 1
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, script: Script, stats: Arc<ReplayStats>) {
    let mut next = 0;
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, step = next, "replay: client connected");
        let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
            continue;
        };
        next = play(ws, &script.steps, next, &stats).await;
    }
}

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Plays steps from `from` on one connection; returns where the next connection starts.
async fn play(
    mut ws: WebSocketStream<TcpStream>,
    steps: &[Step],
    from: usize,
    stats: &ReplayStats,
) -> usize {
    let mut i = from;
    while let Some(step) = steps.get(i) {
        i += 1;
        match step {
            Step::Send(text) => {
                if ws.send(Message::text(text.clone())).await.is_err() {
                    return i - 1;
                }
            }
            Step::Disconnect => return i,
            Step::Ping(payload) => {
                if ws
                    .send(Message::Ping(payload.clone().into_bytes().into()))
                    .await
                    .is_err()
                {
                    return i - 1;
                }
                match next_frame(&mut ws, stats, Some(|m| matches!(m, Message::Pong(_)))).await {
                    Some(Message::Pong(p)) if p.as_ref() == payload.as_bytes() => {
                        stats.pongs.fetch_add(1, Ordering::Relaxed);
                    }
                    other => warn!(?other, "replay: no pong for the ping"),
                }
            }
            Step::Expect(want) => {
                let got = next_frame(&mut ws, stats, Some(|m| matches!(m, Message::Text(_)))).await;
                let got: Option<serde_json::Value> = match &got {
                    Some(Message::Text(t)) => serde_json::from_str(t.as_str()).ok(),
                    _ => None,
                };
                if got.as_ref() == Some(want) {
                    stats.subscribes.fetch_add(1, Ordering::Relaxed);
                } else {
                    warn!(?got, %want, "replay: unexpected subscribe message");
                    stats.mismatches.fetch_add(1, Ordering::Relaxed);
                    return i - 1;
                }
            }
        }
    }
    stats.finished.store(1, Ordering::Relaxed);
    // script over: stay up (answering pings) until the client leaves
    while next_frame(&mut ws, stats, None).await.is_some() {}
    i
}

/// The client's next frame that `wanted` accepts, answering application pings on the way; `None` when the
/// connection ends or, when waiting for a wanted frame, after [`STEP_TIMEOUT`]; `None` for `wanted`
/// reads until the client leaves.
async fn next_frame(
    ws: &mut WebSocketStream<TcpStream>,
    stats: &ReplayStats,
    wanted: Option<fn(&Message) -> bool>,
) -> Option<Message> {
    loop {
        let frame = if wanted.is_some() {
            tokio::time::timeout(STEP_TIMEOUT, ws.next())
                .await
                .ok()
                .flatten()
        } else {
            ws.next().await
        };
        let msg = frame?.ok()?;
        if wanted.is_some_and(|w| w(&msg)) {
            return Some(msg);
        }
        if let Message::Text(t) = &msg {
            let v: Option<serde_json::Value> = serde_json::from_str(t.as_str()).ok();
            if v.as_ref()
                .and_then(|v| v.get("method"))
                .and_then(|m| m.as_str())
                == Some("ping")
            {
                stats.pings_answered.fetch_add(1, Ordering::Relaxed);
                let pong = serde_json::json!({"method": "pong", "time_in": "2023-09-25T09:04:31.742599Z", "time_out": "2023-09-25T09:04:31.742648Z"});
                ws.send(Message::text(pong.to_string())).await.ok()?;
            }
        }
        if matches!(msg, Message::Close(_)) {
            return None;
        }
    }
}
