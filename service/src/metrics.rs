use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// How long one scrape may take, from accept to close: a peer that connects and sends nothing
/// must not hold a task and a file descriptor for good.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait to be accepted.
const MAX_SCRAPES: usize = 32;
/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A bound Prometheus endpoint; the address is known before serving starts (port 0 works).
pub struct MetricsServer {
    pub local_addr: SocketAddr,
}

/// Serves the registry in the Prometheus text format on every GET, until the process ends.
/// A scrape endpoint needs no router: any path answers with the metrics.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<MetricsServer> {
    serve_metrics_within(addr, registry, SCRAPE_TIMEOUT).await
}

async fn serve_metrics_within(
    addr: SocketAddr,
    registry: Arc<Registry>,
    scrape_timeout: Duration,
) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let scrapes = Arc::new(Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = scrapes.clone().acquire_owned().await else {
                return;
            };
            let socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint cannot accept");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(scrape_timeout, answer_scrape(socket, &registry)).await;
                drop(slot);
            });
        }
    });
    tracing::info!(%local_addr, "serving metrics");
    Ok(MetricsServer { local_addr })
}

async fn answer_scrape(mut socket: TcpStream, registry: &Registry) {
    // The request itself is not needed; read what arrived so the peer sees a clean close.
    let mut request = [0u8; 1024];
    let _ = socket.read(&mut request).await;
    let mut body = String::new();
    let response = match encode(&mut body, registry) {
        Ok(()) => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        Err(_) => {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_owned()
        }
    };
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[tokio::test]
    async fn a_silent_peer_is_cut_off_and_others_are_still_served() {
        let server = serve_metrics_within(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Registry::default()),
            Duration::from_millis(200),
        )
        .await
        .expect("binds");
        let mut silent: Vec<TcpStream> = Vec::new();
        for _ in 0..MAX_SCRAPES {
            silent.push(
                TcpStream::connect(server.local_addr)
                    .await
                    .expect("connects"),
            );
        }
        // Every scrape slot is held by a silent peer; each is closed after the timeout.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), silent[0].read_to_end(&mut rest))
            .await
            .expect("the silent peer is closed");
        assert!(closed.is_ok());
        let mut scrape = TcpStream::connect(server.local_addr)
            .await
            .expect("connects");
        scrape.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), scrape.read_to_string(&mut response))
            .await
            .expect("served once the silent peers are gone")
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    }

    #[tokio::test]
    async fn a_scrape_returns_the_registered_metrics() {
        let mut registry = Registry::default();
        let jobs = Counter::<u64>::default();
        registry.register("fleet_test_jobs", "Jobs seen by the test", jobs.clone());
        jobs.inc_by(3);
        let server = serve_metrics("127.0.0.1:0".parse().unwrap(), Arc::new(registry))
            .await
            .expect("binds");
        let mut socket = TcpStream::connect(server.local_addr)
            .await
            .expect("connects");
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("fleet_test_jobs_total 3"), "{response}");
    }
}
