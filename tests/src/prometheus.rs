//! A real Prometheus server for the tests of Fleet's metrics as an operator's Prometheus sees
//! them: on a free loopback port, with a temporary TSDB and a scrape configuration written here
//! (given targets, scraped every second), killed when dropped; and PromQL over its HTTP API.
//!
//! The binaries come from Debian's `prometheus` package (2.42, `ops/install-deps.sh`):
//! `prometheus` and `promtool` on `PATH`, or `FLEET_PROMETHEUS` and `FLEET_PROMTOOL`.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Process, free_port};

/// The scrape interval (and rule evaluation interval) of the test server.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// One scrape job: its name (the `job` label) and the addresses it scrapes on `/metrics`.
pub struct ScrapeJob<'a> {
    pub name: &'a str,
    pub targets: &'a [SocketAddr],
}

/// A running `prometheus`.
pub struct Prometheus {
    process: Process,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second, and returns once it is ready to serve
    /// queries (not yet once it has scraped: see [`Prometheus::wait_targets_up`]).
    pub fn start(jobs: &[ScrapeJob]) -> Prometheus {
        Prometheus::start_with_rules(jobs, &[])
    }

    /// [`Prometheus::start`] with rule files (alerting or recording rules) evaluated every
    /// second.
    pub fn start_with_rules(jobs: &[ScrapeJob], rule_files: &[&Path]) -> Prometheus {
        let binary = tool("FLEET_PROMETHEUS", "prometheus");
        let mut last_log = String::new();
        // The port is free when picked but may be taken before Prometheus binds it: try again.
        for _ in 0..5 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let dir = tempfile::tempdir().expect("temporary folder for Prometheus");
            let config = dir.path().join("prometheus.yml");
            std::fs::write(&config, scrape_config(jobs, rule_files))
                .expect("write Prometheus's configuration");
            let log = std::fs::File::create(dir.path().join("prometheus.log"))
                .expect("Prometheus log file");
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("Prometheus log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {}: {e}; run ops/install-deps.sh (Debian's prometheus)",
                        binary.display()
                    )
                });
            let mut prometheus = Prometheus {
                process: Process::adopt("prometheus", child),
                addr,
                dir,
            };
            if prometheus.wait_ready(Duration::from_secs(30)) {
                return prometheus;
            }
            last_log = prometheus.log();
        }
        panic!("Prometheus did not become ready; its last log:\n{last_log}");
    }

    /// Where its HTTP API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` (with its query string) on the HTTP API: the `data` of a `success` answer;
    /// panics on anything else.
    pub fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path)
            .unwrap_or_else(|e| panic!("Prometheus did not answer GET {path}: {e}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"));
        assert!(
            status == 200 && answer["status"] == "success",
            "GET {path}: {status} {body}"
        );
        answer["data"].clone()
    }

    /// Evaluates `promql` now (`/api/v1/query`); the `data` of the answer (`resultType`,
    /// `result`). Panics when Prometheus refuses the expression.
    pub fn query(&self, promql: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", url_encode(promql)))
    }

    /// The samples of an instant-vector `promql`: each series' labels and value.
    pub fn query_vector(&self, promql: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
        let data = self.query(promql);
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .expect("a result list")
            .iter()
            .map(|sample| {
                let labels = sample["metric"].as_object().cloned().unwrap_or_default();
                (labels, sample_value(&sample["value"]))
            })
            .collect()
    }

    /// The value of `promql` when it gives exactly one series (a `sum(...)`, say); None when it
    /// gives none (the metric not scraped yet).
    pub fn query_value(&self, promql: &str) -> Option<f64> {
        let samples = self.query_vector(promql);
        assert!(
            samples.len() <= 1,
            "{promql} gives several series: {samples:?}"
        );
        samples.first().map(|(_, value)| *value)
    }

    /// Polls `promql` until its single value is `expected`; panics with the last value seen
    /// after `timeout`.
    pub async fn wait_value(&self, promql: &str, expected: f64, timeout: Duration) {
        let started = Instant::now();
        loop {
            let value = self.query_value(promql);
            if value == Some(expected) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{promql} is {value:?}, not {expected}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until Prometheus has scraped `count` targets successfully (`up == 1`), and every
    /// target it knows is up.
    pub async fn wait_targets_up(&self, count: usize, timeout: Duration) {
        let started = Instant::now();
        loop {
            let targets = self.api("/api/v1/targets?state=active");
            let active = targets["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            if up == count && active.len() == count {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{up} of {count} targets up after {timeout:?}: {active:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if !self.process.is_running() {
                return false;
            }
            if matches!(http_get(self.addr, "/-/ready"), Ok((200, _))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// `promtool` (Debian's, beside `prometheus`), or `FLEET_PROMTOOL`.
pub fn promtool() -> PathBuf {
    tool("FLEET_PROMTOOL", "promtool")
}

/// The scrape configuration for `jobs` (and `rule_files`), everything every second.
pub fn scrape_config(jobs: &[ScrapeJob], rule_files: &[&Path]) -> String {
    let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
    let mut text = format!(
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
         evaluation_interval: {interval}\n"
    );
    if !rule_files.is_empty() {
        text.push_str("rule_files:\n");
        for file in rule_files {
            let _ = writeln!(text, "  - {:?}", file.display().to_string());
        }
    }
    text.push_str("scrape_configs:\n");
    for job in jobs {
        let targets: Vec<String> = job.targets.iter().map(|t| format!("\"{t}\"")).collect();
        let _ = write!(
            text,
            "  - job_name: {:?}\n    static_configs:\n      - targets: [{}]\n",
            job.name,
            targets.join(", ")
        );
    }
    text
}

/// A sample's `[time, "value"]` as a number.
fn sample_value(value: &Value) -> f64 {
    value[1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a sample value: {value}"))
}

fn tool(variable: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run ops/install-deps.sh (Debian's prometheus package), \
                 or set {variable}"
            )
        })
}

/// A GET with HTTP/1.0, so the answer is never chunked and the connection closes after it.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("an answer without a head"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
