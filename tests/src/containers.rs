//! A JetStream cluster of `nats-server` containers (testcontainers): what a fleet meets when a
//! node is put through what only a container can be, such as `docker pause`, which freezes every
//! process of the node at once through its cgroup (to the other nodes and the clients it is cut
//! off, as in a network partition) and lets them go on where they were.
//!
//! The image is built here, from the installed `nats-server` (ops/images.sh stages the same
//! FROM scratch context as Fleet's `fleet-nats` image). Every container runs with host
//! networking, listening on free loopback ports, its JetStream file store in its own writable
//! layer (kept across a stop and a start, removed with the container). Containers are removed
//! when the cluster is dropped, a failed test's too; testcontainers' watchdog removes them on
//! SIGINT or SIGTERM.
//!
//! Docker is found or started by `ops/docker-up.sh` (it installs nothing here:
//! ops/install-deps.sh does). Where Docker cannot run, [`ContainerCluster::start_or_skip`]
//! skips the test, loudly, unless `FLEET_REQUIRE_DOCKER=1`.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    io::Write,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::Duration,
};

use async_nats::jetstream::{self, context::GetStreamErrorKind};
use serde_json::Value;
use testcontainers::{
    ContainerAsync, GenericBuildableImage, GenericImage, ImageExt,
    core::{BuildImageOptions, WaitFor},
    runners::{AsyncBuilder, AsyncRunner},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{eventually, free_port};

/// The image the nodes run: Fleet's nats-server image, under tags of the tests' own (the
/// compose file's `fleet-nats:local` is left alone), `cluster-test-<hash of the context>`.
const IMAGE: &str = "fleet-nats";

/// How often the tests' own clients ping their node, as Fleet's processes do (2 s by default),
/// so a paused node is left within three pings.
const CLIENT_PING_INTERVAL: Duration = Duration::from_secs(2);

/// How long a cluster may take to elect its JetStream meta leader after its nodes listen.
const META_LEADER_WAIT: Duration = Duration::from_secs(60);

/// How long a started container may take to log that it is ready.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// Where a node keeps its JetStream files, inside its container.
const STORE_DIR: &str = "/tmp/jetstream";

/// Where a node's configuration is copied, inside its container.
const CONFIG_PATH: &str = "/etc/nats/node.conf";

/// One node: its name (`n1`…), client and monitoring ports, and its container.
struct Node {
    name: String,
    port: u16,
    monitor_port: u16,
    container: ContainerAsync<GenericImage>,
}

/// `size` nats-server containers routed to each other, JetStream on every one.
pub struct ContainerCluster {
    nodes: Vec<Node>,
}

/// What one node holds of a stream, as that node reports it (its monitoring `/jsz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl ContainerCluster {
    /// [`ContainerCluster::start`] where Docker runs; where it cannot (no daemon and none can be
    /// started: not root, docker.io not installed), None after saying why, so the caller
    /// returns. With `FLEET_REQUIRE_DOCKER=1` (CI) that is a failure instead.
    pub async fn start_or_skip(size: usize, test: &str) -> Option<ContainerCluster> {
        match docker_up() {
            Ok(()) => Some(ContainerCluster::start(size).await),
            Err(why) if std::env::var("FLEET_REQUIRE_DOCKER").is_ok_and(|v| v == "1") => {
                panic!("FLEET_REQUIRE_DOCKER=1 but Docker cannot run here: {why}")
            }
            Err(why) => {
                // Straight to the process's stderr: libtest would hide eprintln! of a passing
                // test.
                let line = format!("\nSKIPPED {test}: Docker cannot run here: {why}\n");
                let _ = std::io::stderr().write_all(line.as_bytes());
                None
            }
        }
    }

    /// Builds the image, starts `size` nodes and returns once JetStream has a meta leader
    /// (streams can be made). Panics where Docker is not running (see
    /// [`ContainerCluster::start_or_skip`]).
    pub async fn start(size: usize) -> ContainerCluster {
        let image = build_image().await;
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (index, (&port, &route_port)) in client_ports.iter().zip(&route_ports).enumerate() {
            let name = format!("n{}", index + 1);
            let monitor_port = free_port();
            let config = format!(
                "server_name: {name}\n\
                 listen: \"127.0.0.1:{port}\"\n\
                 http: \"127.0.0.1:{monitor_port}\"\n\
                 jetstream {{ store_dir: \"{STORE_DIR}\" }}\n\
                 cluster {{\n  name: fleet-test\n  listen: \"127.0.0.1:{route_port}\"\n  \
                 routes: [{routes}]\n}}\n"
            );
            let container = image
                .clone()
                .with_network("host")
                .with_copy_to(CONFIG_PATH, config.into_bytes())
                .with_cmd(["-c", CONFIG_PATH])
                // The image's health check reads the monitoring port from here.
                .with_env_var("NATS_MONITOR", format!("127.0.0.1:{monitor_port}"))
                .with_label("org.fleet.test", "containers")
                .with_startup_timeout(STARTUP_LIMIT)
                .start()
                .await
                .unwrap_or_else(|e| panic!("cannot start nats-server container {name}: {e}"));
            nodes.push(Node {
                name,
                port,
                monitor_port,
                container,
            });
        }
        let cluster = ContainerCluster { nodes };
        cluster.wait_meta_leader().await;
        cluster
    }

    /// Every node's URL, comma-separated, as Fleet's `--nats-url` takes them.
    pub fn urls(&self) -> String {
        self.urls_of(&(0..self.nodes.len()).collect::<Vec<_>>())
    }

    /// The URLs of `nodes` only, comma-separated.
    pub fn urls_of(&self, nodes: &[usize]) -> String {
        nodes
            .iter()
            .map(|&node| format!("nats://127.0.0.1:{}", self.nodes[node].port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node's name (`n1`…), as JetStream names a stream's leader and replicas.
    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// The index of the node called `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// A client that knows every node and reconnects to any.
    pub async fn client(&self) -> async_nats::Client {
        self.client_of(&(0..self.nodes.len()).collect::<Vec<_>>())
            .await
    }

    /// A client of `nodes` only: one that must not lose its connection to a node the test
    /// pauses.
    pub async fn client_of(&self, nodes: &[usize]) -> async_nats::Client {
        let urls: Vec<async_nats::ServerAddr> = self
            .urls_of(nodes)
            .split(',')
            .map(|url| url.parse().expect("a node URL"))
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .ping_interval(CLIENT_PING_INTERVAL)
            .connect(urls)
            .await
            .expect("connect to the container cluster")
    }

    /// The node leading `stream` now (its Raft group's leader).
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        eventually(
            Duration::from_secs(30),
            "a leader of the stream",
            || async {
                let mut stream = js.get_stream(stream).await.ok()?;
                let info = stream.info().await.ok()?;
                let leader = info.cluster.as_ref()?.leader.as_deref()?;
                self.node_named(leader)
            },
        )
        .await
    }

    /// The node leading the JetStream meta group (stream and consumer placement, the API's
    /// answers), as the first node that answers says; None while there is none.
    pub async fn meta_leader(&self) -> Option<usize> {
        for node in &self.nodes {
            if let Some(jsz) = monitoring(node.monitor_port, "/jsz").await {
                return self.node_named(jsz["meta_cluster"]["leader"].as_str()?);
            }
        }
        None
    }

    /// Freezes every process of the node (`docker pause`).
    pub async fn pause(&self, node: usize) {
        self.nodes[node]
            .container
            .pause()
            .await
            .unwrap_or_else(|e| panic!("docker pause {}: {e}", self.nodes[node].name));
    }

    /// Lets a paused node go on (`docker unpause`).
    pub async fn unpause(&self, node: usize) {
        self.nodes[node]
            .container
            .unpause()
            .await
            .unwrap_or_else(|e| panic!("docker unpause {}: {e}", self.nodes[node].name));
    }

    /// Stops the node's container (SIGTERM: nats-server shuts down cleanly); its store stays.
    pub async fn stop(&self, node: usize) {
        self.nodes[node]
            .container
            .stop()
            .await
            .unwrap_or_else(|e| panic!("docker stop {}: {e}", self.nodes[node].name));
    }

    /// Starts a stopped node's container again, on its ports with its store, and returns once
    /// it takes connections.
    pub async fn start_node(&self, node: usize) {
        let node = &self.nodes[node];
        node.container
            .start()
            .await
            .unwrap_or_else(|e| panic!("docker start {}: {e}", node.name));
        eventually(
            STARTUP_LIMIT,
            &format!("{} taking connections", node.name),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", node.port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// What `node` itself holds of `stream` (its own store, read from its monitoring
    /// endpoint); None while it does not answer or holds no such stream.
    pub async fn node_stream_state(&self, node: usize, stream: &str) -> Option<StreamState> {
        let jsz = monitoring(
            self.nodes[node].monitor_port,
            "/jsz?accounts=true&streams=true",
        )
        .await?;
        let state = jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|detail| detail["name"] == stream)?
            .get("state")?
            .clone();
        Some(StreamState {
            messages: state["messages"].as_u64()?,
            first_seq: state["first_seq"].as_u64()?,
            last_seq: state["last_seq"].as_u64()?,
        })
    }

    /// JetStream places a stream of `size` replicas only once its meta group has a leader that
    /// knows every node as a current peer: before that a leader may be elected by a majority
    /// and refuse an R3 stream ("no suitable peers for placement"). Waits for that, then for the
    /// API to answer (a stream lookup answered "not found", where it times out or is answered
    /// "temporarily unavailable" before).
    async fn wait_meta_leader(&self) {
        eventually(
            META_LEADER_WAIT,
            "a meta leader with every node current",
            || async {
                for node in &self.nodes {
                    let jsz = monitoring(node.monitor_port, "/jsz").await?;
                    let meta = &jsz["meta_cluster"];
                    if meta["leader"] != node.name.as_str() {
                        continue;
                    }
                    let peers = meta["replicas"].as_array()?;
                    let current = peers.iter().filter(|p| p["current"] == true).count();
                    return (current + 1 == self.nodes.len()).then_some(());
                }
                None
            },
        )
        .await;
        let js = jetstream::new(self.client().await);
        eventually(META_LEADER_WAIT, "a JetStream meta leader", || async {
            match js.get_stream("FLEET_TEST_PROBE").await {
                Err(error) => matches!(
                    error.kind(),
                    GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                )
                .then_some(()),
                Ok(_) => Some(()),
            }
        })
        .await;
    }
}

/// Makes sure a Docker daemon answers, starting one with `ops/docker-up.sh` (which needs root
/// or sudo, and installs nothing when asked not to); Err says why none can.
fn docker_up() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/docker-up.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("FLEET_DOCKER_INSTALL", "0")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Builds the nodes' image through the Docker API from the context ops/images.sh stages (the
/// installed nats-server, the libraries it links, busybox for the health check), once per
/// context: its tag names the context's hash, and an image already built is used as it is (each
/// build would leave a copy of the context in BuildKit's cache, a full one with vfs).
async fn build_image() -> GenericImage {
    let context = tempfile::tempdir().expect("temporary build context");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/images.sh");
    let staged = Command::new("bash")
        .arg(&script)
        .arg("--context")
        .arg(context.path())
        .arg("nats")
        .status()
        .expect("run ops/images.sh");
    assert!(
        staged.success(),
        "ops/images.sh --context could not stage the nats image: run ops/install-deps.sh"
    );
    let mut hasher = DefaultHasher::new();
    hash_tree(context.path(), context.path(), &mut hasher);
    let tag = format!("cluster-test-{:016x}", hasher.finish());
    GenericBuildableImage::new(IMAGE, &tag)
        .with_dockerfile(context.path().join("Dockerfile"))
        .with_file(context.path().join("rootfs"), "rootfs")
        .build_image_with(BuildImageOptions::new().with_skip_if_exists(true))
        .await
        .unwrap_or_else(|e| panic!("cannot build {IMAGE}:{tag}: {e}"))
        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
}

/// Feeds every file under `dir` (its path below `root`, its mode and its bytes) to `hasher`, in
/// name order.
fn hash_tree(root: &Path, dir: &Path, hasher: &mut DefaultHasher) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read the build context")
        .map(|entry| entry.expect("a build context entry").path())
        .collect();
    entries.sort();
    for path in entries {
        path.strip_prefix(root)
            .expect("below the root")
            .hash(hasher);
        let metadata = std::fs::symlink_metadata(&path).expect("a build context entry");
        metadata.permissions().mode().hash(hasher);
        if metadata.is_dir() {
            hash_tree(root, &path, hasher);
        } else {
            std::fs::read(&path)
                .expect("read the build context")
                .hash(hasher);
        }
    }
}

/// One GET on a node's monitoring port, as HTTP/1.0 so that nats-server answers in one piece
/// and closes; None when it does not answer in time or not with JSON.
async fn monitoring(port: u16, path: &str) -> Option<Value> {
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        socket
            .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        socket.read_to_end(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()??;
    let response = String::from_utf8(response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}
