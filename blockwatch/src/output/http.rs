//! The daemon's HTTP endpoints: `/metrics` (Prometheus text format),
//! `/healthz`, `/stacks` (folded stacks for flame graphs), and for people
//! `/` (see [`crate::output::page`]) and `/flamegraph.svg`.
//!
//! Plain hyper 1: a few GET routes do not need a framework, and every
//! dependency is code running as root next to BPF programs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::debug;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::output::metrics::Metrics;

/// Scrapers, browsers and curl: more at once is a misbehaving client.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr}: the address is in use (another blockwatch daemon?); stop it, or choose a free address with --listen or `listen` in the config"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {err} (choose another address with --listen)")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
}

/// Binds the listening socket (before the kernel programs are loaded, so
/// a taken port fails fast and alone).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr).await.map_err(|err| {
        if err.kind() == std::io::ErrorKind::AddrInUse {
            HttpError::InUse { addr }
        } else {
            HttpError::Bind { addr, err }
        }
    })
}

/// Serves the endpoints until the runtime stops.
pub fn spawn(listener: TcpListener, metrics: Arc<Mutex<Metrics>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: wait rather than spin.
                    debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!("too many connections; dropping {peer}");
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(route(&req, &metrics)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                // A slow or stuck client must not hold a slot forever.
                match tokio::time::timeout(Duration::from_secs(60), conn).await {
                    Ok(Err(e)) => debug!("connection from {peer}: {e}"),
                    Err(_) => debug!("connection from {peer} timed out"),
                    Ok(Ok(())) => {}
                }
                drop(permit);
            });
        }
    });
}

pub(crate) fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(req: &Request<Incoming>, metrics: &Mutex<Metrics>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is served\n".into(),
        );
    }
    // A panic elsewhere while holding the lock leaves data that is still
    // worth serving.
    let m = || metrics.lock().unwrap_or_else(|p| p.into_inner());
    match req.uri().path() {
        "/metrics" => match m().render() {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/stacks" => reply(StatusCode::OK, TEXT, m().folded.render()),
        "/flamegraph.svg" => crate::output::page::flamegraph_reply(metrics),
        "/" => crate::output::page::reply(&m().folded),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /, /metrics, /healthz, /stacks or /flamegraph.svg\n".into(),
        ),
    }
}
