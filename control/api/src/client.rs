//! A blocking HTTP/1.1 client for the control process's REST API, over `std::net::TcpStream`,
//! plain (`http://HOST:PORT`) or mutual TLS (`https://HOST:PORT`, rustls, presenting this
//! process's certificate; docs/security.md).
//!
//! One request per connection (`Connection: close`), a JSON body in and out, bounded in time
//! ([`Client::new`]'s timeout) and in size ([`RESPONSE_BYTES_MAX`]). That is all the node's
//! heartbeat thread and `cairnctl` need, so neither pulls an async HTTP stack into the
//! data-plane daemon for it. An `https` URL needs a TLS configuration ([`Client::with_tls`])
//! and an `http` one refuses it, so a configured TLS is never silently skipped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
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
    /// The TLS client configuration, for an `https` URL.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client of `url` (`http://HOST:PORT` or `https://HOST:PORT`, a trailing `/` allowed);
    /// each request (connect, handshake, send, receive) must finish within `timeout`. An
    /// `https` URL needs [`Client::with_tls`] before its first request.
    pub fn new(url: &str, timeout: Duration) -> Result<Client, ClientError> {
        let bad = |why| ClientError::BadUrl {
            url: url.to_string(),
            why,
        };
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            ("http", rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            ("https", rest)
        } else {
            return Err(bad(
                "only http://HOST:PORT and https://HOST:PORT are supported",
            ));
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(bad("expected http(s)://HOST:PORT with no path"));
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
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
            addr,
            timeout,
            tls: None,
        })
    }

    /// Sets the TLS configuration: required for an `https` URL, refused for an `http` one.
    pub fn with_tls(
        mut self,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let https = self.base.starts_with("https://");
        let bad = |why| ClientError::BadUrl {
            url: self.base.clone(),
            why,
        };
        match (https, tls.is_some()) {
            (true, false) => Err(bad("https needs --tls-ca, --tls-cert and --tls-key")),
            (false, true) => Err(bad("TLS is configured: use https://HOST:PORT")),
            _ => {
                self.tls = tls;
                Ok(self)
            }
        }
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
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let body = body.unwrap_or_default();
        let raw = match (&self.tls, self.base.starts_with("https://")) {
            (None, false) => self.exchange(stream, method, path, body),
            (Some(config), true) => {
                let name = cairn_tls::server_name(&self.host)
                    .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| io(std::io::Error::other(e)))?;
                self.exchange(rustls::StreamOwned::new(conn, stream), method, path, body)
            }
            _ => {
                return Err(ClientError::BadUrl {
                    url,
                    why: "an https URL needs a TLS configuration, an http one takes none",
                })
            }
        }
        .map_err(io)?;
        parse_response(&raw).map_err(|why| ClientError::BadResponse { method, url, why })
    }

    /// Writes the request to `stream` and reads the response until the server closes.
    fn exchange(
        &self,
        mut stream: impl Read + Write,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        stream.flush()?;
        let mut raw = Vec::new();
        match stream
            .take(RESPONSE_BYTES_MAX as u64 + 1)
            .read_to_end(&mut raw)
        {
            // A server that closes without TLS's close_notify: the response is whole or not,
            // which its parse decides (Content-Length, chunked).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            r => {
                r?;
            }
        }
        Ok(raw)
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
    fn only_http_and_https_urls_are_taken() {
        assert!(Client::new("http://127.0.0.1:10800", Duration::from_secs(1)).is_ok());
        assert!(Client::new("http://127.0.0.1:10800/", Duration::from_secs(1)).is_ok());
        assert!(Client::new("ftp://127.0.0.1:10800", Duration::from_secs(1)).is_err());
        let https = Client::new("https://127.0.0.1:10800", Duration::from_secs(1)).unwrap();
        assert!(https.with_tls(None).is_err(), "https without TLS");
        assert!(Client::new("http://127.0.0.1:10800/v1", Duration::from_secs(1)).is_err());
    }
}
