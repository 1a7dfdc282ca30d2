//! A JetStream cluster of `nats-server` processes on loopback: the broker a fleet runs on when
//! one lost node must not stop it. Each node has its own store and can be stopped (SIGTERM or
//! SIGKILL) and started again on the same ports and store, as [`crate::NatsServer`] can.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::jetstream::{self, context::DeleteStreamErrorKind, stream::StorageType};

use crate::{NatsServer, Process, Signal, eventually, free_port};

/// How often the tests' own clients ping their node, as Fleet's processes do (2 s by default).
const CLIENT_PING_INTERVAL: Duration = Duration::from_secs(2);

/// How long a cluster may take, after its nodes listen, to place a stream on every node.
const WHOLE_WAIT: Duration = Duration::from_secs(60);

/// The stream [`NatsCluster::start`] makes, and deletes, to see that the cluster is whole.
const PROBE_STREAM: &str = "FLEET_TEST_PROBE";

/// One node: its name (`n1`…), client port, configuration file and process (None while
/// stopped).
struct Node {
    name: String,
    port: u16,
    config: PathBuf,
    process: Option<Process>,
}

/// `size` nodes routed to each other, JetStream on every one.
pub struct NatsCluster {
    nodes: Vec<Node>,
    /// Every node's client URL, comma-separated: what clients are given, so they reconnect to
    /// whichever node is up.
    urls: String,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes and returns once JetStream can place a stream on every one of them.
    pub async fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temporary folder for the cluster");
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
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store).expect("node store");
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\n\
                     jetstream {{ store_dir: \"{store}\" }}\n\
                     cluster {{\n  name: fleet-test\n  listen: \"127.0.0.1:{route_port}\"\n  \
                     routes: [{routes}]\n}}\n",
                    store = store.display()
                ),
            )
            .expect("node configuration");
            nodes.push(Node {
                name,
                port,
                config,
                process: None,
            });
        }
        let urls = client_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            nodes,
            urls,
            _dir: dir,
        };
        for node in 0..size {
            cluster.start_node(node);
        }
        cluster.wait_whole().await;
        cluster
    }

    /// Every node's URL, comma-separated, as Fleet's `--nats-url` takes them.
    pub fn urls(&self) -> &str {
        &self.urls
    }

    /// A client that knows every node and reconnects to any.
    pub async fn client(&self) -> async_nats::Client {
        self.client_with(async_nats::ConnectOptions::new()).await
    }

    /// A client of `tenant`, taking its answers on the tenant's inboxes, as
    /// [`NatsServer::tenant_client`].
    pub async fn tenant_client(&self, tenant: &str) -> async_nats::Client {
        let options = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(fleet_schemas::subject::inbox_prefix(tenant));
        self.client_with(options).await
    }

    async fn client_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        let urls: Vec<async_nats::ServerAddr> = self
            .urls
            .split(',')
            .map(|url| url.parse().expect("a node URL"))
            .collect();
        // A frozen node keeps its connections open: pings find it out (as Fleet's processes do).
        options
            .retry_on_initial_connect()
            .ping_interval(CLIENT_PING_INTERVAL)
            .connect(urls)
            .await
            .expect("connect to the test cluster")
    }

    /// The index of the node called `name` (a stream's leader as JetStream reports it).
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
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

    /// Stops node `node` with `signal` and waits until it has exited; its store is kept.
    pub fn stop(&mut self, node: usize, signal: Signal) {
        if let Some(mut process) = self.nodes[node].process.take() {
            process.signal(signal);
            process.wait_exit(Duration::from_secs(30));
        }
    }

    /// Sends `signal` to a running node: SIGSTOP freezes it (to the others it is cut off, as in
    /// a network partition), SIGCONT lets it go on.
    pub fn signal(&self, node: usize, signal: Signal) {
        if let Some(process) = &self.nodes[node].process {
            process.signal(signal);
        }
    }

    /// Starts a stopped node again on its ports with its store.
    pub fn restart(&mut self, node: usize) {
        self.stop(node, Signal::SIGTERM);
        self.start_node(node);
    }

    fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let (process, port) =
            NatsServer::spawn(Path::new(""), i32::from(node.port), Some(&node.config));
        assert_eq!(
            port, node.port,
            "node {} listens on another port",
            node.name
        );
        node.process = Some(process);
    }

    /// A meta leader is elected by the first two nodes to meet, and learns of the third a
    /// moment later: a stream of three replicas created in between is refused "no suitable
    /// peers for placement" (which a dispatcher starting then takes for an answer, and exits).
    /// So the cluster is whole once a probe stream with a replica on every node can be made.
    async fn wait_whole(&self) {
        let js = jetstream::new(self.client().await);
        let probe = jetstream::stream::Config {
            name: PROBE_STREAM.to_owned(),
            subjects: vec!["fleet-test-probe".to_owned()],
            num_replicas: self.nodes.len(),
            storage: StorageType::Memory,
            ..Default::default()
        };
        eventually(WHOLE_WAIT, "a stream placed on every node", || async {
            js.create_stream(probe.clone()).await.ok().map(|_| ())
        })
        .await;
        // A delete whose answer was lost shows as the stream not found.
        eventually(WHOLE_WAIT, "the probe stream deleted", || async {
            match js.delete_stream(PROBE_STREAM).await {
                Ok(_) => Some(()),
                Err(error) => matches!(
                    error.kind(),
                    DeleteStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                )
                .then_some(()),
            }
        })
        .await;
    }
}
