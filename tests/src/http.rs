//! The HTTP side of Fleet processes (`/metrics`, `/health`, `/ready`, `/info`), as a test sees
//! it: one request per connection, and processes that log where they serve.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Process;

/// An HTTP answer: status, content type and body.
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One `method path` request; Fleet's servers close the connection after their answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    socket
        .write_all(format!("{method} {path} HTTP/1.1\r\nhost: fleet\r\n\r\n").as_bytes())
        .await
        .expect("sends");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut response))
        .await
        .expect("answered in time")
        .expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    Answer {
        status,
        content_type,
        body: body.to_owned(),
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path).await
}

/// Polls `/ready` until it answers `status` (200 or 503); returns that answer.
pub async fn wait_ready_status(addr: SocketAddr, status: u16, timeout: Duration) -> Answer {
    let started = Instant::now();
    loop {
        let answer = get(addr, "/ready").await;
        if answer.status == status {
            return answer;
        }
        assert!(
            started.elapsed() < timeout,
            "/ready never answered {status}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Fleet process serving HTTP on port 0, its address read from its JSON log (the line with
/// `local_addr`), and every line it logs kept (its stdout keeps being read, so it never blocks
/// on a full pipe).
pub struct Serving {
    pub process: Process,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serving {
    /// Starts `command` (its stdout piped here) as `name`; waits up to `timeout` for the line
    /// saying where it serves HTTP (`RUST_LOG` must let `fleet_service::http=info` through).
    pub fn spawn(name: &str, mut command: Command, timeout: Duration) -> Serving {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, address) = mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr = serde_json::from_str::<Value>(&line).ok().and_then(|log| {
                    log["fields"]["local_addr"]
                        .as_str()
                        .and_then(|addr| addr.parse::<SocketAddr>().ok())
                });
                if let Some(addr) = addr {
                    let _ = found.send(addr);
                }
                lines.lock().expect("log lines").push(line);
            }
        });
        let process = Process::adopt(name, child);
        let addr = address
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("{name} did not log where it serves HTTP"));
        Serving { process, addr, log }
    }

    /// Every line logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lines").clone()
    }
}
