use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

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
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                // The request itself is not needed; read what arrived so the peer sees a clean close.
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let mut body = String::new();
                let response = match encode(&mut body, &registry) {
                    Ok(()) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    Err(_) => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                };
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    tracing::info!(%local_addr, "serving metrics");
    Ok(MetricsServer { local_addr })
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::net::TcpStream;

    use super::*;

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
