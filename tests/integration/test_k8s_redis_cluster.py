"""The Redis Cluster of deploy/k8s/overlays/redis-cluster, on loopback: six real redis-servers started with
the ConfigMap's redis.conf (only the port, the data folder and the announced name differ, as the pods' own
arguments do there) form 3 masters with a replica each through `redis-cli --cluster create`, as the Job runs
it. The configuration is the part a schema cannot check: a server refuses an option it does not know."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from tests.conftest import ProcessExited, cluster_port, stop_process, wait_for
from tests.unit.test_k8s import objects, one


def test_the_cluster_config_forms_three_masters_with_a_replica_each(tmp_path: Path) -> None:
    docs = objects("redis-cluster")
    config = tmp_path / "redis.conf"
    config.write_text(one(docs, "ConfigMap", "redis-cluster")["data"]["redis.conf"])
    replicas = one(docs, "StatefulSet", "redis-cluster")["spec"]["replicas"]
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: `make tools` locates or installs it"
    ports = [cluster_port() for _ in range(replicas)]
    procs: list[subprocess.Popen[bytes]] = []
    clients = [redis.Redis(port=port, socket_timeout=5) for port in ports]
    try:
        for i, port in enumerate(ports):
            data = tmp_path / f"node{i}"
            data.mkdir()
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
            args += ["--cluster-announce-hostname", "localhost"]
            with (data / "redis.log").open("w") as log:
                procs.append(subprocess.Popen([binary, str(config), *args], stdout=log, stderr=subprocess.STDOUT))
        for i, (proc, client) in enumerate(zip(procs, clients, strict=True)):

            def answers(proc: subprocess.Popen[bytes] = proc, client: redis.Redis = client, i: int = i) -> bool:
                if proc.poll() is not None:
                    log = (tmp_path / f"node{i}" / "redis.log").read_text()[-1000:]
                    raise ProcessExited(f"redis-server refused the configuration: {log}")
                return bool(client.ping())

            wait_for(answers, "a cluster node to answer", 30)
            assert client.info("cluster")["cluster_enabled"] == 1
        nodes = [f"localhost:{port}" for port in ports]
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert create.returncode == 0, create.stdout + create.stderr
        wait_for(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients), "the cluster", 30)
        roles = [c.info("replication")["role"] for c in clients]
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3

        def shards() -> list[list[dict[bytes, object]]]:
            """Each shard's nodes, once every node's view agrees on 3 shards of 2 (gossip takes a moment)."""
            views = [[shard[b"nodes"] for shard in c.execute_command("CLUSTER", "SHARDS")] for c in clients]
            return views[0] if all(len(v) == 3 and all(len(n) == 2 for n in v) for v in views) else []

        # clients are sent to a node by its announced name, not its address (a pod's IP changes on restart)
        endpoints = {node[b"endpoint"] for shard in wait_for(shards, "3 shards of 2", 30) for node in shard}
        assert endpoints == {b"localhost"}
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            stop_process(proc)
