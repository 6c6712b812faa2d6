from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
import redis
import torch

from bench.stack import NGINX_CONF as NGINX_CONF
from bench.stack import ProcessExited as ProcessExited
from bench.stack import RedisClusterServers as RedisClusterServers
from bench.stack import cluster_port as cluster_port
from bench.stack import free_port as free_port
from bench.stack import nginx_binary as nginx_binary
from bench.stack import nginx_config as nginx_config
from bench.stack import wait_for as wait_for
from training.datasets import BehaviourLog, SyntheticConfig, generate_synthetic
from training.samples import PreparedData, prepare

# the shared copy next to the checkout, or wherever ML100K_DIR points (never inside the repository)
ML100K_DIR = Path(os.environ.get("ML100K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))

# how long a process may take to become ready on a loaded two-core CI machine
START_TIMEOUT_S = 120.0


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


# --- shared by the service tests: a small exported repository and a real redis-server ----------------

SERVICE_SYNTHETIC = {"n_users": 300, "n_items": 150, "n_categories": 8, "min_events": 15, "max_events": 30, "seed": 4}


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
