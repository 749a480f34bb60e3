//! A small HTTP/1.1 client for the REST api tests: one request per connection (`connection: close`),
//! chunked bodies decoded, and a Server-Sent Events reader.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).ok()?;
    Some(s)
}

fn read_head(r: &mut impl BufRead) -> Option<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            return Some((status, headers));
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
}

/// Reads one chunk of a chunked body: `Ok(None)` at the last (empty) chunk.
fn try_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data)?;
    data.truncate(size);
    Ok((size > 0).then_some(data))
}

fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    try_chunk(r).ok().flatten()
}

/// One request; `None` when nothing answers.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<Reply> {
    let s = send(addr, method, path, headers, body)?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut bytes = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            bytes.extend(c);
        }
    } else {
        r.read_to_end(&mut bytes).ok()?;
    }
    Some(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// `GET path` (panics when nothing answers).
pub fn get(addr: &str, path: &str) -> Reply {
    get_with(addr, path, &[])
}

/// `GET path` with extra headers (panics when nothing answers).
pub fn get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(addr, "GET", path, headers, None).unwrap_or_else(|| panic!("no answer to GET {path}"))
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// Its `event:` name (`message` when it had none).
    pub event: String,
    /// Its `data:` lines, joined by newlines.
    pub data: String,
}

/// An open `text/event-stream` response.
pub struct EventStream {
    reader: BufReader<TcpStream>,
    /// The response status.
    pub status: u16,
    /// The response headers.
    pub headers: Vec<(String, String)>,
    pending: String,
    ended: bool,
    /// Whether the end was the server's (the last chunk), not a timeout or a broken connection.
    clean_end: bool,
}

impl EventStream {
    /// Opens `GET path` as an event stream.
    pub fn open(addr: &str, path: &str) -> Self {
        let s = send(addr, "GET", path, &[("accept", "text/event-stream")], None)
            .unwrap_or_else(|| panic!("no answer to GET {path}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(s);
        let (status, headers) = read_head(&mut reader).expect("a response head");
        EventStream {
            reader,
            status,
            headers,
            pending: String::new(),
            ended: false,
            clean_end: false,
        }
    }

    /// The next event (comments skipped); `None` when the stream ended (or nothing came for 30 s).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let (mut event, mut data) = ("message".to_owned(), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Some(SseEvent {
                    event,
                    data: data.join("\n"),
                });
            }
            if self.ended {
                return None;
            }
            match try_chunk(&mut self.reader) {
                Ok(Some(c)) => self.pending.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => (self.ended, self.clean_end) = (true, true),
                Err(_) => self.ended = true,
            }
        }
    }

    /// Whether the server ended the stream cleanly (reads until it ends, up to 30 s of silence).
    pub fn ends(&mut self) -> bool {
        while self.next_event().is_some() {}
        self.clean_end
    }
}
