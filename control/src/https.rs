//! The REST API's listener: plain TCP, or mutual TLS (`--tls-*`, docs/security.md).
//!
//! Handshakes run on tasks of their own, bounded by [`HANDSHAKE_TIMEOUT`], so one slow or
//! silent client never holds up the accept loop; a finished connection is handed to axum with
//! its [`Peer`]: the remote address and, under TLS, the identity its certificate names (the
//! handshake has verified it against the cluster CA). A client without such a certificate is
//! refused inside the handshake and never reaches a handler. [`crate::rest`]'s middleware
//! authorises each request on the [`Peer`].

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use cairn_tls::{Identity, Tls};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaken and not yet taken by the server.
const READY_MAX: usize = 64;
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A connection's byte stream: a TCP stream or a TLS stream over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the connection is mutual TLS (then its certificate is the cluster CA's).
    pub tls: bool,
    /// The identity the client's certificate names, if any.
    pub identity: Option<Identity>,
}

impl Connected<IncomingStream<'_, RestListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, RestListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// The listener axum serves: connections whose handshake finished, with their [`Peer`].
pub struct RestListener {
    ready: mpsc::Receiver<(Box<dyn Io>, Peer)>,
    local: SocketAddr,
    tls: bool,
    accept: tokio::task::JoinHandle<()>,
}

impl RestListener {
    /// Starts accepting on `listener`, under `tls` when given.
    pub fn new(listener: TcpListener, tls: Option<&Tls>) -> std::io::Result<RestListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_MAX);
        let acceptor =
            tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server_config_alpn(&[b"http/1.1"])));
        let tls = acceptor.is_some();
        let accept = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(RestListener {
            ready,
            local,
            tls,
            accept,
        })
    }
}

impl Drop for RestListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<(Box<dyn Io>, Peer)>,
) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a REST connection");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Some(acceptor) = acceptor.clone() else {
            let peer = Peer {
                addr,
                tls: false,
                identity: None,
            };
            if tx.send((Box::new(tcp), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let identity = Identity::of_peer(stream.get_ref().1.peer_certificates());
                    let peer = Peer {
                        addr,
                        tls: true,
                        identity,
                    };
                    drop(tx.send((Box::new(stream), peer)).await);
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "REST TLS handshake refused"),
                Err(_) => tracing::debug!(%addr, "REST TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for RestListener {
    type Io = Box<dyn Io>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            tls: self.tls,
            identity: None,
        })
    }
}
