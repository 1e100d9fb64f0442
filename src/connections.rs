//! The HTTP/1 connection loop: hyper's connection builder with a header-read
//! timeout (axum's `serve` has no timeouts, so a client that never finishes
//! its headers, or never sends any, held a connection forever), a count of
//! open connections for `/metrics`, and a shutdown that ends within a
//! bounded grace period.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long connections get after the aborted generations have ended,
/// before they are cut.
const AFTER_ABORT: Duration = Duration::from_secs(1);

/// How long the abort itself may take (it waits for the engine's step in
/// progress).
const ABORT_WAIT: Duration = Duration::from_secs(5);

pub struct ConnectionOptions {
    /// Time to receive a request's headers; also bounds an idle keep-alive
    /// connection, since hyper times the wait for the next request too.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

/// Connections open now (read by `/metrics`).
#[derive(Debug, Default)]
pub struct OpenConnections(AtomicUsize);

impl OpenConnections {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements the count however the connection task ends.
struct Counted(Arc<OpenConnections>);

impl Counted {
    fn new(open: &Arc<OpenConnections>) -> Self {
        open.0.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` until `shutdown` resolves. Then: no new connections; open
/// ones finish their request in flight and close; after the grace period
/// `abort_running` ends running generations (their streams still get a
/// final chunk), and a moment later whatever is left (a stalled upload) is
/// cut.
pub async fn serve<A, F>(
    listener: TcpListener,
    app: Router,
    options: ConnectionOptions,
    open: Arc<OpenConnections>,
    shutdown: impl Future<Output = ()>,
    abort_running: A,
) where
    A: FnOnce() -> F,
    F: Future<Output = ()>,
{
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let task = connection(stream, app.clone(), options.header_read_timeout, Counted::new(&open), closing_rx.clone());
                    connections.spawn(task);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = closing.send(true);
    if !drain(&mut connections, options.shutdown_grace).await {
        tracing::warn!(
            open = connections.len(),
            "grace period over; aborting running requests"
        );
        // Bounded too: a stuck engine must not keep the process alive.
        if tokio::time::timeout(ABORT_WAIT, abort_running())
            .await
            .is_err()
        {
            tracing::warn!("the engine did not answer the abort in time");
        }
        if !drain(&mut connections, AFTER_ABORT).await {
            tracing::warn!(open = connections.len(), "cutting remaining connections");
            connections.shutdown().await;
        }
    }
}

/// Waits up to `within` for every connection to end; true if they did.
async fn drain(connections: &mut JoinSet<()>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok()
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    header_read_timeout: Duration,
    _counted: Counted,
    mut closing: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut asked_to_close = *closing.borrow();
    if asked_to_close {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = closing.changed(), if !asked_to_close => {
                // A dropped sender also means shutting down.
                let _ = changed;
                asked_to_close = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
