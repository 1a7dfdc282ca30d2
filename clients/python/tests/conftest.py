"""A real local fleet for the integration tests: nats-server with the shipped broker
configuration (ops/nats/: TLS with client certificates, nkey users, per-role permissions),
one dispatcher and one worker on the real model, all on loopback with temporary state.

The binaries come from FLEET_BIN_DIR (default: ${CARGO_TARGET_DIR:-<repo>/target}/debug). When
they, nats-server or the model are missing the integration tests are skipped, unless
FLEET_REQUIRE_FLEET=1 (ops/test.sh sets it), where they fail instead.
"""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
MODEL = "all-minilm-l6-v2"


def _bin_dir():
    if os.environ.get("FLEET_BIN_DIR"):
        return pathlib.Path(os.environ["FLEET_BIN_DIR"])
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"


class Fleet:
    def __init__(self, work):
        self.work = work
        self.bin = _bin_dir()
        self.procs = {}
        self.url = None

    def run(self, *args, **kwargs):
        return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, cwd=self.work, **kwargs)

    def spawn(self, name, *args, env=None):
        log = open(self.work / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
            env=env, start_new_session=True,
        )
        return self.procs[name]

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.work.glob("*.log")))

    def connect_options(self, tenant="acme"):
        """What a tenant's client needs: URL, nkey seed, CA and client certificate."""
        pki = self.work / "pki"
        return {
            "url": self.url,
            "nkey_seed_file": str(self.work / f"{tenant}.nk"),
            "tls_ca": str(pki / "ca.pem"),
            "tls_cert": str(pki / "client-local.pem"),
            "tls_key": str(pki / "client-local-key.pem"),
        }

    def key(self, tenant="acme"):
        return str(self.work / f"{tenant}-key.toml")

    def env(self):
        pki = self.work / "pki"
        env = dict(os.environ)
        for name in [n for n in env if n.startswith("NATS_") or n.startswith("FLEET_")]:
            del env[name]
        env.update(
            NATS_TLS_CA=str(pki / "ca.pem"),
            NATS_TLS_CERT=str(pki / "client-local.pem"),
            NATS_TLS_KEY=str(pki / "client-local-key.pem"),
            NATS_URL=self.url or "",
        )
        return env

    def stop(self):
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _missing():
    fleet_bin = _bin_dir()
    needs = [fleet_bin / n for n in ("fleet", "dispatcher", "worker")] + [REPO / "models" / "all-MiniLM-L6-v2"]
    missing = [str(p) for p in needs if not p.exists()]
    if shutil.which("nats-server") is None:
        missing.append("nats-server")
    return missing


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("FLEET_REQUIRE_FLEET") == "1":
            pytest.fail(f"cannot start a fleet, missing: {missing}")
        pytest.skip(f"no local fleet (missing: {', '.join(missing)})")
    work = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(work)
    fleet_cmd = fleet.bin / "fleet"
    try:
        (work / "nats").mkdir()
        users = []
        for role in ("dispatcher", "worker"):
            users.append(fleet.run(fleet_cmd, "nats-user", "--role", role, "--name", f"{role}-1", "--seed-out", work / f"{role}-1.nk").stdout)
        # acme may use every model; limited only a model nobody serves (its jobs: forbidden).
        for tenant, models in (("acme", "*"), ("limited", "other-model")):
            users.append(
                fleet.run(fleet_cmd, "tenant", "--tenants", work / "tenants.toml", "add", "--tenant", tenant,
                          "--key-id", f"{tenant}-1", "--models", models, "--out", work / f"{tenant}-key.toml",
                          "--nats-seed-out", work / f"{tenant}.nk").stdout
            )
        (work / "nats" / "users.list").write_text("".join(users))
        fleet.run(REPO / "ops" / "make-dev-pki.sh", "--out", work / "pki", "local")
        fleet.run(REPO / "ops" / "nats" / "render.sh", work / "nats", "--pki", work / "pki", "--store", work / "jetstream")
        fleet.spawn("nats", "nats-server", "-c", work / "nats" / "fleet.conf", "-a", "127.0.0.1", "-p", "-1")
        deadline = time.time() + 20
        while fleet.url is None:
            found = re.search(r"Listening for client connections on (\S+)", (work / "nats.log").read_text())
            if found:
                fleet.url = f"tls://{found.group(1)}"
            elif time.time() > deadline or fleet.procs["nats"].poll() is not None:
                raise RuntimeError("nats-server did not start\n" + fleet.logs())
            else:
                time.sleep(0.1)
        env = fleet.env()
        fleet.spawn("dispatcher", fleet.bin / "dispatcher", "--nats-nkey-file", work / "dispatcher-1.nk",
                    "--tenants", work / "tenants.toml", "--metrics-addr", "127.0.0.1:0", env=env)
        fleet.spawn("worker", fleet.bin / "worker", "--nats-nkey-file", work / "worker-1.nk",
                    "--tenants", work / "tenants.toml", "--model-dir", REPO / "models" / "all-MiniLM-L6-v2",
                    "--metrics-addr", "127.0.0.1:0", env=env)
        _wait_ready(fleet)
        yield fleet
    finally:
        fleet.stop()


def _wait_ready(fleet):
    """Until an infer succeeds (the worker loads the model first)."""
    import fleet_client

    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        for name, proc in fleet.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n" + fleet.logs())
        try:
            fleet_client.infer(["ready?"], key=fleet.key(), timeout=10, **fleet.connect_options())
            return
        except fleet_client.FleetError as error:
            last = error
            time.sleep(1)
    raise RuntimeError(f"no infer succeeded within 240 s: {last!r}\n" + fleet.logs())
