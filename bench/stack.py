"""A deployment on loopback, built from the repository's own pieces: a Redis Cluster of 3 masters with a replica
each, scorer replicas (`python -m app`), and nginx running deploy/nginx/nginx.conf in front of them.

Used by the failover drill (bench.drill) and by the tests (tests/conftest.py re-exports these), so the drill
and the suite start the cluster and the load balancer the same way. Every process started here is the
caller's to stop (the classes are context managers; ``Scorer.stop``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import httpx
import redis

T = TypeVar("T")
# how long a process may take to become ready on a loaded two-core CI machine
START_TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parents[1]


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: a process the bench started ends either way."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ProcessExited(Exception):
    """The process waited on exited: waiting longer cannot help (the message says how it ended)."""


def wait_for(check: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns a truthy value (returned) or ``timeout`` seconds pass (AssertionError).
    Other exceptions from ``check`` count as "not yet" (a server still starting refuses connections), except
    ProcessExited, which ends the wait at once."""
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as e:
            error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {error!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the load balancer: deploy/nginx/nginx.conf run by a real nginx on loopback ---------------------------

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
# the compose service's one DNS name, re-resolved (`resolve`): here a server line per replica instead
_UPSTREAM_SERVER = re.compile(r"^(\s*)server scorer:8000 resolve( [^;]*);$", re.MULTILINE)


def nginx_binary() -> str:
    """Debian's nginx lives in /usr/sbin, which a user's PATH may lack."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: `make tools` locates or installs it")
    return found


def nginx_config(workdir: Path, upstreams: Sequence[str], port: int) -> Path:
    """A copy of the repository's nginx.conf that runs here: the replicas at ``upstreams`` (host:port) instead
    of compose's `scorer` name, listening on 127.0.0.1:``port``, its pid and temporary files in ``workdir``.
    Everything else (retries, keep-alive, timeouts, locations) is the file as deployed."""
    text = NGINX_CONF.read_text()
    (indent, params), *more = _UPSTREAM_SERVER.findall(text)
    assert not more, "one upstream server line expected"
    servers = "".join(f"{indent}server {u}{params};\n" for u in upstreams).rstrip("\n")
    text = _UPSTREAM_SERVER.sub(lambda _: servers, text)
    assert text.count("listen 80;") == 1
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # each module's default is under /var/lib/nginx
    temp = "".join(f"    {kind}_temp_path {workdir / kind};\n" for kind in kinds)
    text = text.replace("http {\n", "http {\n" + temp, 1)
    text = f"pid {workdir / 'nginx.pid'};\n" + text
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


# --- a Redis Cluster of the caller's own: 3 masters with a replica each, on loopback ----------------------


def cluster_port() -> int:
    """A free port whose cluster bus port (+10,000) is free too, so at most 55,535."""
    while True:
        port = free_port()
        if port <= 55_535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port


class RedisClusterServers:
    """Six redis-servers with `--cluster-enabled yes` formed by `redis-cli --cluster create --cluster-replicas 1`
    into 3 masters with a replica each. ``kill(port)`` ends a node with SIGKILL (no goodbye to its peers); with
    ``node_timeout_ms`` at 1 s its replica is promoted 1–3 s later. A context manager: leaving it stops every
    node, also when the test fails. Only what the deployment's redis.conf sets that matters here is set:
    slots of the other masters keep answering while one fails over (`cluster-require-full-coverage no`)."""

    def __init__(self, workdir: Path, node_timeout_ms: int = 1000) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are not installed: `make tools` locates or installs them")
        self.binary, self.workdir, self.node_timeout_ms = binary, workdir, node_timeout_ms
        self.ports: list[int] = []
        while len(self.ports) < 6:  # a port just released can come back: six different ones, and bus ports
            port = cluster_port()
            taken = {*self.ports, *(p + 10_000 for p in self.ports)}
            if port not in taken and port + 10_000 not in taken:
                self.ports.append(port)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed node for a client (REDIS_URL), one still alive; the client finds the others through it."""
        return f"redis://127.0.0.1:{(self.alive() or self.ports)[0]}"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5)

    def cluster_client(self, decode_responses: bool = True) -> redis.RedisCluster:
        """A client of the whole cluster, from any node still alive (bytes when ``decode_responses`` is off:
        a user's history is a packed binary value)."""
        nodes = [redis.cluster.ClusterNode("127.0.0.1", p) for p in self.alive()]
        return redis.RedisCluster(startup_nodes=nodes, socket_timeout=5, decode_responses=decode_responses)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def start(self) -> None:
        config = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout_ms)]
        config += ["--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no"]
        for port in self.ports:
            data = self.workdir / f"node-{port}"
            data.mkdir(parents=True, exist_ok=True)
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), *config]
            with (data / "redis.log").open("w") as log:
                self.procs[port] = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            for port, proc in self.procs.items():
                with self.client(port) as c:
                    wait_for(self._answering(port, proc, c), f"cluster node {port} to answer", START_TIMEOUT_S)
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert create.returncode == 0, create.stdout + create.stderr
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _answering(self, port: int, proc: subprocess.Popen[bytes], client: redis.Redis) -> Callable[[], bool]:
        def check() -> bool:
            if proc.poll() is not None:
                log = (self.workdir / f"node-{port}" / "redis.log").read_text()[-1000:]
                raise ProcessExited(f"redis-server on {port} exited: {log}")
            return bool(client.info("server")["process_id"] == proc.pid)

        return check

    def masters(self) -> list[int]:
        """The ports of the live nodes that serve slots as masters now."""
        ports = []
        for port in self.alive():
            with self.client(port) as c:
                if c.info("replication")["role"] == "master":
                    ports.append(port)
        return ports

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node sees the cluster as ok, with 3 masters serving all 16,384 slots and every live
        replica in sync with its master (so a write acknowledged from now on is on two nodes)."""

        def healthy() -> bool:
            for port in self.alive():
                with self.client(port) as c:
                    info = c.cluster("info")
                    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                        return False
                    repl = c.info("replication")
                    if repl["role"] == "slave" and repl["master_link_status"] != "up":
                        return False
            return len(self.masters()) == 3

        wait_for(healthy, "the cluster to be healthy", timeout, interval=0.1)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- a scorer replica: `python -m app` on a port of its own ---------------------------------------------


class Scorer:
    """`python -m app` on a free loopback port, its output in ``log``; ``start()`` returns once /readyz says
    200. ``kill()`` is SIGKILL (a crash: no draining), ``stop()`` SIGTERM then SIGKILL."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log_path = env, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start without waiting (replicas load their models in parallel); then ``wait_ready``."""
        cmd = [sys.executable, "-m", "app", "--port", str(self.port), "--log-level", "warning"]
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise ProcessExited(f"scorer exited with {proc.returncode}: {self.log_path.read_text()[-2000:]}")
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_for(ready, f"the scorer on port {self.port}", START_TIMEOUT_S, interval=0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)
        if self.log is not None:
            self.log.close()
            self.log = None


def scorer_env(repository: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    """This process's environment without the service's own settings, then ``repository``, Redis and
    ``extra`` (DEFAULT_MODEL=din unless ``extra`` says otherwise)."""
    inherited = (
        "REDIS_URL",
        "REDIS_CLUSTER",
        "MODEL_REPOSITORY",
        "DEFAULT_MODEL",
        "WORKERS",
        "PROMETHEUS_MULTIPROC_DIR",
    )
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update({"MODEL_REPOSITORY": str(repository), "DEFAULT_MODEL": "din", **extra})
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


class LoadBalancer:
    """nginx with deploy/nginx/nginx.conf in front of ``upstreams`` (host:port), in the foreground so that
    stopping it stops its workers; ``log_format`` replaces the access log's format when given."""

    def __init__(self, workdir: Path, upstreams: Sequence[str], log_format: str | None = None) -> None:
        self.workdir, self.port = workdir, free_port()
        self.config = nginx_config(workdir, upstreams, self.port)
        workdir.chmod(0o755)  # its workers may run as another user (`nobody` under root) and write temp files here
        if log_format is not None:
            text = re.sub(
                r"log_format upstream [^;]*;", f"log_format upstream '{log_format}';", self.config.read_text()
            )
            self.config.write_text(text)
        self.log_path = workdir / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            cmd = [nginx_binary(), "-c", str(self.config), "-g", "daemon off;"]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: httpx.get(f"{self.url}/lb-healthz", timeout=2).status_code == 200, "nginx", 30)

    def stop(self) -> None:
        terminate(self.proc)

    def __enter__(self) -> LoadBalancer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
