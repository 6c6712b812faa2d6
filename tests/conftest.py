from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil
import pytest
import redis
import torch

from training.datasets import BehaviourLog, SyntheticConfig, generate_synthetic
from training.samples import PreparedData, prepare

# the shared copy next to the checkout, or wherever ML100K_DIR points (never inside the repository)
ML100K_DIR = Path(os.environ.get("ML100K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))

# how long a process may take to become ready on a loaded two-core CI machine
START_TIMEOUT_S = 120.0

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_log() -> BehaviourLog:
    config = SyntheticConfig(n_users=300, n_items=200, n_categories=8, min_events=20, max_events=40, seed=1)
    return generate_synthetic(config)


@pytest.fixture(scope="session")
def small_data(small_log: BehaviourLog) -> PreparedData:
    return prepare(small_log, "din-movielens", max_len=20, seed=0)


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


# --- shared by the service tests: a small exported repository and a real redis-server ----------------

SERVICE_SYNTHETIC = {"n_users": 300, "n_items": 150, "n_categories": 8, "min_events": 15, "max_events": 30, "seed": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with `din` and `dien`, trained for one epoch on a small synthetic log, exported."""
    from training.config import TrainConfig
    from training.export import export_run
    from training.train import train

    root = tmp_path_factory.mktemp("service-models")
    for kind in ("din", "dien"):
        out = str(root / "runs" / kind)
        cfg = TrainConfig(
            dataset="synthetic",
            synthetic=SERVICE_SYNTHETIC,
            model=kind,
            out=out,
            epochs=1,
            max_len=20,
            batch_size=128,
            progress=False,
            cache_dir=str(root / "cache"),
        )
        train(cfg)
        export_run(root / "runs" / kind, root / "repo")
    return root


class RedisServer:
    """A redis-server of the test's own, on a free port; stop() and start() simulate an outage. A context
    manager: leaving it stops the server, also when the test fails."""

    def __init__(self, workdir: Path, durable: bool = False) -> None:
        """``durable``: append-only file fsynced on every write; a killed server loses no acknowledged write."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make tools` locates or installs it")
        self.binary, self.workdir, self.port, self.durable = binary, workdir, free_port(), durable
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the server's port; the first start moves to another free port if this one was taken
        meanwhile (free_port() only finds one that was free a moment ago), a restart keeps its port."""
        for attempt in range(3):
            try:
                return self._start()
            except ProcessExited:
                if self.started or attempt == 2:
                    raise
                self.port = free_port()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = ["--save", "", "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always"]
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), *persistence]
        self.proc = subprocess.Popen([self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with redis.Redis(port=self.port, socket_timeout=5) as client:
                wait_for(self._answering(client), "redis-server to answer", START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.started = True

    def _answering(self, client: redis.Redis) -> Callable[[], bool]:
        def check() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ProcessExited(f"redis-server exited with status {self.proc.returncode} (port {self.port} taken?)")
            # this server, not another one that holds the port (ours then fails to bind and exits)
            return bool(client.info("server")["process_id"] == self.proc.pid)

        return check

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def repo(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the session's repository (din v1, dien v1), free to publish into."""
    shutil.copytree(model_repository / "repo", tmp_path / "repo")
    return tmp_path / "repo"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        _SESSION_SERVERS.append(server)
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:  # a previous test left it stopped
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    return redis_server.url


def service_env(repository: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    inherited = ("REDIS_URL", "MODEL_REPOSITORY", "DEFAULT_MODEL", "WORKERS", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update({"MODEL_REPOSITORY": str(repository), "DEFAULT_MODEL": "din", **extra})
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def start_service(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """`python -m app` on a free port; returns the process and its URL once /readyz answers 200. The caller
    stops it (stop_process) in a finally or a fixture's teardown; prefer the ``service`` context manager."""
    for attempt in range(3):
        try:
            return _start_service(env, cwd)
        except ProcessExited as e:
            # free_port() only finds a port that was free a moment ago: another suite may have taken it
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise AssertionError(str(e)) from None
    raise AssertionError("unreachable")


def _start_service(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"]
    # output to a file, not a pipe nobody reads while it runs: a chatty server would block on a full pipe
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 — outlives this call; stop_process closes it
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    _OUTPUT[proc.pid] = output
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise ProcessExited(f"server exited with status {proc.returncode}: {process_output(proc)}")
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

    try:
        wait_for(ready, f"the service on port {port} to be ready", START_TIMEOUT_S, interval=0.1)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


_OUTPUT: dict[int, IO[str]] = {}


def process_output(proc: subprocess.Popen[str]) -> str:
    """What a process from start_service has written so far (stdout and stderr)."""
    output = _OUTPUT.get(proc.pid)
    if output is None:
        return ""
    output.flush()
    output.seek(0)
    text = output.read()
    output.seek(0, os.SEEK_END)
    return text


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; its output file or pipe closed."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    output = _OUTPUT.pop(proc.pid, None)
    if output is not None:
        output.close()


@contextmanager
def service(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """`python -m app` running for the ``with`` block (its URL), stopped on the way out, failure or not."""
    proc, url = start_service(env, cwd)
    try:
        yield url
    finally:
        stop_process(proc)


def run_command(cmd: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run for commands that start processes of their own (benchmark workers, make → python): in a
    session of its own, so a timeout or an interrupt kills the whole group, not only the first process."""
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(cmd, start_new_session=True, **pipes, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid)
            proc.communicate()
            raise
        _kill_group(proc.pid)  # whatever it left running in the background
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# --- no test leaves a process behind --------------------------------------------------------------------

# session-scoped servers: an outage test may restart one (a new pid), which is not a leak
_SESSION_SERVERS: list[RedisServer] = []


def _running_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"{p.pid}: (gone)")
    return "; ".join(lines)


def _still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    session = {s.proc.pid for s in _SESSION_SERVERS if s.proc is not None}
    left = []
    for p in procs:
        try:  # is_running() also checks the creation time, so a reused pid is not mistaken for ours
            if p.pid not in session and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Remember the processes the test body started and that were still running when it ended: its
    fixtures' teardown is checked to stop them (a process a fixture starts is stopped by that fixture)."""
    before = {p.pid for p in _running_children()}
    try:
        return (yield)
    finally:
        item.stash[_STARTED] = _started_since(before)


def _started_since(before: set[int]) -> list[psutil.Process]:
    """Children started since ``before`` by this process or by those new children; not the ones a running
    server started meanwhile (a supervisor replacing a worker belongs to the fixture that owns it)."""
    new: dict[int, psutil.Process] = {p.pid: p for p in _running_children() if p.pid not in before}
    parents: dict[int, int] = {}
    for pid, p in new.items():
        with suppress(psutil.NoSuchProcess):
            parents[pid] = p.ppid()
    me = os.getpid()

    def ours(pid: int) -> bool:
        while pid in parents:
            pid = parents[pid]
        return pid == me

    return [p for pid, p in new.items() if ours(pid)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    result = yield
    left = _still_running(item.stash.get(_STARTED, []))
    if left:
        raise AssertionError(f"the test left processes running (killed now): {_kill(left)}")
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every fixture has been torn down by now: any child still running was started and never stopped."""
    left = _still_running(_running_children())
    if left:
        what = _kill(left)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"processes left running by the tests (killed now): {what}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _kill(procs: list[psutil.Process]) -> str:
    """Kill and reap ``procs``; returns what they were. Their Popen objects are marked reaped too: an
    unreaped Popen warns "still running" when collected, which fails whichever later test is running then."""
    for p in list(procs):  # and what they started since, which killing them would orphan
        with suppress(psutil.NoSuchProcess):
            procs += [c for c in p.children(recursive=True) if c.pid not in {q.pid for q in procs}]
    what = _describe(procs)
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    pids = {p.pid for p in procs}
    for obj in gc.get_objects():  # type(), not isinstance(): some objects warn when asked their __class__
        if issubclass(type(obj), subprocess.Popen) and obj.pid in pids and obj.returncode is None:
            obj.wait(10)
    psutil.wait_procs(procs, timeout=10)
    return what


_STARTED = pytest.StashKey[list[psutil.Process]]()


def failed_start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m app` run to its end with settings that must stop the start (its status and output)."""
    cmd = [sys.executable, "-m", "app", "--port", str(free_port())]
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)


# --- the load balancer: deploy/nginx/nginx.conf run by a real nginx on loopback ---------------------------

NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf"
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


# --- a Redis Cluster of the test's own: 3 masters with a replica each, on loopback ----------------------


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
        self.ports = [cluster_port() for _ in range(6)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The seed node the service is given (REDIS_URL); the client finds the others through it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5)

    def cluster_client(self) -> redis.RedisCluster:
        """A client of the whole cluster, from any node still alive."""
        nodes = [redis.cluster.ClusterNode("127.0.0.1", p) for p in self.alive()]
        return redis.RedisCluster(startup_nodes=nodes, socket_timeout=5, decode_responses=True)

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
