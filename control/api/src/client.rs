//! A blocking HTTP/1.1 client for the control process's REST API, over `std::net::TcpStream`.
//!
//! One request per connection (`Connection: close`), a JSON body in and out, bounded in time
//! ([`Client::new`]'s timeout) and in size ([`RESPONSE_BYTES_MAX`]). That is all the node's
//! heartbeat thread and `cairnctl` need, so neither pulls an async HTTP stack or TLS into the
//! data-plane daemon for it. Only `http://HOST:PORT` URLs are understood; the control API's TLS
//! (DESIGN.md, Security) will replace the transport here, in one place.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response read (bytes); a larger one is an error, so a confused server cannot make
/// the caller allocate without bound.
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control URL '{url}' is invalid: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("resolving control address '{host}': {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{method} {url}: {source}")]
    Io {
        method: &'static str,
        url: String,
        source: std::io::Error,
    },
    #[error("{method} {url}: malformed HTTP response: {why}")]
    BadResponse {
        method: &'static str,
        url: String,
        why: String,
    },
}

/// An HTTP response: the status code and the body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The `error` of a JSON [`crate::ErrorBody`], or the body as text.
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<crate::ErrorBody>(&self.body) {
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// A client of one control process.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    host: String,
    addr: SocketAddr,
    timeout: Duration,
}

impl Client {
    /// A client of `url` (`http://HOST:PORT`, a trailing `/` allowed); each request (connect,
    /// send, receive) must finish within `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Client, ClientError> {
        let bad = |why| ClientError::BadUrl {
            url: url.to_string(),
            why,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http://HOST:PORT is supported"))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(bad("expected http://HOST:PORT with no path"));
        }
        let addr = host
            .to_socket_addrs()
            .map_err(|source| ClientError::Resolve {
                host: host.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| bad("the host resolves to no address"))?;
        Ok(Client {
            base: format!("http://{host}"),
            host: host.to_string(),
            addr,
            timeout,
        })
    }

    /// The URL this client talks to.
    pub fn url(&self) -> &str {
        &self.base
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    pub fn post_json(&self, path: &str, body: &[u8]) -> Result<Response, ClientError> {
        self.request("POST", path, Some(body))
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let io = |source| ClientError::Io {
            method,
            url: url.clone(),
            source,
        };
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(RESPONSE_BYTES_MAX as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(io)?;
        parse_response(&raw).map_err(|why| ClientError::BadResponse { method, url, why })
    }
}

/// Splits a complete HTTP/1.1 response into status and body (Content-Length, chunked, or
/// until the connection closed).
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    if raw.len() > RESPONSE_BYTES_MAX {
        return Err(format!("larger than {RESPONSE_BYTES_MAX} bytes"));
    }
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("status line '{status_line}'"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("Content-Length '{value}'"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = match (chunked, length) {
        (true, _) => dechunk(rest)?,
        (false, Some(n)) if rest.len() >= n => rest[..n].to_vec(),
        (false, Some(n)) => return Err(format!("body has {} of {n} bytes", rest.len())),
        (false, None) => rest.to_vec(),
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not terminated")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size '{size_text}'"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunk shorter than its size".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_close() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (409, &b"abcd"[..]));
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        assert!(Client::new("http://127.0.0.1:10800", Duration::from_secs(1)).is_ok());
        assert!(Client::new("http://127.0.0.1:10800/", Duration::from_secs(1)).is_ok());
        assert!(Client::new("https://127.0.0.1:10800", Duration::from_secs(1)).is_err());
        assert!(Client::new("http://127.0.0.1:10800/v1", Duration::from_secs(1)).is_err());
    }
}
