//! An Elasticsearch-API server for the log-shipping tests: `osmem-server`, an in-memory server
//! speaking the Elasticsearch/OpenSearch REST API (`_bulk`, index templates, `_search`,
//! `_count`), on a free loopback port, killed when dropped. It can be stopped (killed: its
//! data is lost, being in memory) and started again on the same port, as an outage.
//!
//! Where it differs from Elasticsearch 8 for what Fleet does: it refuses the
//! `application/vnd.elasticsearch+json; compatible-with=N` media types (406), which the 8.x
//! client does not send; it answers `/` as OpenSearch 3.8 (with the `X-Elastic-Product`
//! header); it makes documents searchable at once, where Elasticsearch needs a refresh (the
//! helpers here refresh first, as a test against Elasticsearch must); it ignores credentials.
//!
//! The binary comes from the PyPI package osmem-server (`ops/install-osmem.sh` puts it under the
//! target directory); `FLEET_OSMEM` names another one.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};

use crate::{Process, Signal};

/// A running `osmem-server`.
pub struct Elasticsearch {
    process: Process,
    binary: PathBuf,
    port: u16,
    url: String,
}

impl Elasticsearch {
    /// Starts a server on a free loopback port and waits until it serves.
    pub fn start() -> Elasticsearch {
        let binary = osmem_binary();
        let (process, url) = spawn(&binary, 0);
        let port = url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("osmem-server serves on {url:?}, not http://host:port"));
        Elasticsearch {
            process,
            binary,
            port,
            url,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server (an outage; what it stored is gone) and waits until it has exited.
    pub fn stop(&mut self) {
        if self.process.is_running() {
            self.process.signal(Signal::SIGKILL);
            self.process.wait_exit(Duration::from_secs(10));
        }
    }

    /// Starts the server again on the same port, empty, and waits until it serves.
    pub fn restart(&mut self) {
        self.stop();
        let (process, url) = spawn(&self.binary, self.port);
        assert_eq!(url, self.url, "osmem-server restarted elsewhere");
        self.process = process;
    }

    /// One request with an optional JSON body: the status and the JSON answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (status, text) = http(self.port, method, path, body)
            .unwrap_or_else(|e| panic!("osmem-server did not answer {method} {path}: {e}"));
        let answer = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status}, not JSON ({e}): {text}"));
        (status, answer)
    }

    /// The documents (`_source`) in the indices matching `indices` that match `query` (a query
    /// DSL object), oldest first (by `@timestamp`), at most 1000.
    pub fn search(&self, indices: &str, query: Value) -> Vec<Value> {
        self.refresh(indices);
        let body = json!({
            "size": 1000,
            "query": query,
            "sort": [{"@timestamp": {"order": "asc"}}],
        });
        let (status, answer) = self.request("POST", &format!("/{indices}/_search"), Some(&body));
        assert_eq!(status, 200, "search {indices} {body}: {answer}");
        answer["hits"]["hits"]
            .as_array()
            .map(|hits| hits.iter().map(|hit| hit["_source"].clone()).collect())
            .unwrap_or_default()
    }

    /// How many documents in the indices matching `indices` match `query`.
    pub fn count(&self, indices: &str, query: Value) -> u64 {
        self.refresh(indices);
        let body = json!({ "query": query });
        let (status, answer) = self.request("POST", &format!("/{indices}/_count"), Some(&body));
        assert_eq!(status, 200, "count {indices} {body}: {answer}");
        answer["count"].as_u64().unwrap_or_default()
    }

    /// Makes what was indexed searchable (Elasticsearch does so about every second on its own).
    fn refresh(&self, indices: &str) {
        let (status, answer) = self.request("POST", &format!("/{indices}/_refresh"), None);
        assert_eq!(status, 200, "refresh {indices}: {answer}");
    }
}

/// Starts the server on `port` (0: a free one) and returns it with the URL it serves on, once it
/// has said so (its first line on stdout, JSON with `url`).
fn spawn(binary: &PathBuf, port: u16) -> (Process, String) {
    let mut child = Command::new(binary)
        .args(["-addr", &format!("127.0.0.1:{port}")])
        // Not tied to stdin (there is none); gone with the test process if it dies first.
        .args([
            "-no-stdin-watch",
            "-parent-pid",
            &std::process::id().to_string(),
        ])
        // No Japanese analysis: nothing here needs it, and it costs start-up time and memory.
        .arg("-no-ja")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; run ops/install-osmem.sh",
                binary.display()
            )
        });
    let stdout = child.stdout.take().expect("piped stdout");
    let (url_tx, url_rx) = mpsc::channel();
    // Keeps reading so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|ready| ready["url"].as_str().map(str::to_owned))
            {
                let _ = url_tx.send(url);
            }
        }
    });
    let process = Process::adopt("osmem-server", child);
    let url = url_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("osmem-server did not say where it serves within 20 s");
    (process, url)
}

/// One HTTP/1.0 request (the server closes the connection after its answer).
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// `FLEET_OSMEM`, else where `ops/install-osmem.sh` installs it: the osmem-server virtual
/// environment in the target directory the tests were built in.
pub fn osmem_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEET_OSMEM") {
        return PathBuf::from(path);
    }
    let target = crate::target_dir();
    let venv = target.join("osmem-venv/lib");
    // The package data lies under lib/python3.X/site-packages/, X being the venv's Python.
    let found = std::fs::read_dir(&venv).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|entry| {
                entry
                    .path()
                    .join("site-packages/osmem_server/bin/osmem-server")
            })
            .find(|path| path.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "osmem-server is missing under {}: run ops/install-osmem.sh (or set FLEET_OSMEM)",
            venv.display()
        )
    })
}
