//! Test subject: a hyper 1 HTTP server on tokio's multi-thread runtime (two
//! workers) with a fast handler and one that computes on its worker.
//!
//! `tokio-server PORT`
//!
//! | route   | handler        | what it does                                  |
//! |---------|----------------|-----------------------------------------------|
//! | `/`     | `fast_handler` | a small JSON answer; never blocks its worker  |
//! | `/slow` | `slow_handler` | 150 ms of pure computation in the async fn's  |
//! |         |                | own body (no syscall: `Instant::now` reads the|
//! |         |                | clock through the vDSO): the worker polling   |
//! |         |                | it runs no other task for >= 150 ms           |
//!
//! Prints `ready` once it accepts connections; serves until killed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const SLOW: Duration = Duration::from_millis(150);

type Reply = Response<Full<Bytes>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: tokio-server PORT");
        return ExitCode::from(2);
    };
    let listener =
        match tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tokio-server: cannot listen on port {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
    println!("ready");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(route);
            // A client that goes away mid-request is not this server's error.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Each handler's future is boxed, as routers do (axum's handlers, tower's
/// `BoxFuture`): its poll is then a function of its own, named after the
/// handler, instead of being inlined into hyper's dispatcher.
fn route(req: Request<Incoming>) -> HandlerFuture {
    match req.uri().path() {
        "/slow" => Box::pin(slow_handler(req)),
        _ => Box::pin(fast_handler(req)),
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

async fn fast_handler(req: Request<Incoming>) -> Result<Reply, Infallible> {
    Ok(json(format!(
        r#"{{"path":"{}","ok":true}}"#,
        req.uri().path()
    )))
}

/// The bug: CPU work in an async handler, on the worker that polls it.
/// The loop stays in this fn's body (no helper), so that its poll is the
/// innermost function of every CPU sample.
async fn slow_handler(req: Request<Incoming>) -> Result<Reply, Infallible> {
    let end = Instant::now() + SLOW;
    let mut n = 0u64;
    while Instant::now() < end {
        for i in 0..1000u64 {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    Ok(json(format!(
        r#"{{"path":"{}","n":{}}}"#,
        req.uri().path(),
        n % 1000
    )))
}

fn json(body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
