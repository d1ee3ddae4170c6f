//! A TCP proxy on loopback that a test controls: it adds latency each way (a WAN link) and
//! can cut the link the way a network does, silently. While cut, the bytes sent either way
//! are dropped and new connections are held without an answer, so neither end learns of the
//! cut until its own timeouts fire. Healing resets the connections the cut left hanging (as
//! the peers would after the network came back and their writes failed) and lets new ones
//! through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

struct Shared {
    up: AtomicBool,
    /// Each way's added latency.
    delay: Duration,
    /// Every connection's tasks, to reset them on heal.
    conns: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`, each way
    /// `delay` late. Runs on the calling tokio runtime.
    pub async fn start(upstream: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            delay,
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s2 = s.clone();
                let task = tokio::spawn(async move { connect(client, upstream, s2).await });
                s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(task);
            }
        });
        Proxy {
            port,
            shared,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the link: from now on nothing gets through, and nobody is told.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
    }

    /// Heals the link: the connections the cut left hanging are reset, new ones go through.
    pub fn heal(&self) {
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in conns {
            c.abort();
        }
        self.shared.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.heal();
    }
}

async fn connect(client: TcpStream, upstream: u16, shared: Arc<Shared>) {
    // A connection made while cut is held, unanswered, until healing resets it.
    while !shared.up.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, shared.clone()));
    let down = tokio::spawn(pump(sr, cw, shared));
    // Aborting this task (heal) drops the handles, which does not stop the pumps: stop them
    // when this task goes, whichever way it goes.
    let _guard = AbortOnDrop(vec![up.abort_handle(), down.abort_handle()]);
    let _ = tokio::join!(up, down);
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Copies one way, each chunk `delay` after it was read, in order; while cut, drops what it
/// reads.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let delay = shared.delay;
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let _guard = AbortOnDrop(vec![writer.abort_handle()]);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.up.load(Ordering::SeqCst) {
            let at = tokio::time::Instant::now() + delay;
            if tx.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
