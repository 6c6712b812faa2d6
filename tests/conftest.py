from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.datasets import BehaviourLog, SyntheticConfig, generate_synthetic
from training.samples import PreparedData, prepare

# the shared copy next to the checkout, or wherever ML100K_DIR points (never inside the repository)
ML100K_DIR = Path(os.environ.get("ML100K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_log() -> BehaviourLog:
    return generate_synthetic(SyntheticConfig(n_users=300, n_items=200, n_categories=8, min_events=20,
                                              max_events=40, seed=1))  # fmt: skip


@pytest.fixture(scope="session")
def small_data(small_log: BehaviourLog) -> PreparedData:
    return prepare(small_log, "din-movielens", max_len=20, seed=0)


# --- shared by the service tests: a small exported repository and a real redis-server ----------------

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import redis  # noqa: E402

SERVICE_SYNTHETIC = {"n_users": 300, "n_items": 150, "n_categories": 8, "min_events": 15, "max_events": 30,
                     "seed": 4}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with `din` and `dien`, trained for one epoch on a small synthetic log, exported."""
    from training.export import export_run
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("service-models")
    for kind in ("din", "dien"):
        out = str(root / "runs" / kind)
        cfg = TrainConfig(dataset="synthetic", synthetic=SERVICE_SYNTHETIC, model=kind, out=out, epochs=1,
                          max_len=20, batch_size=128, progress=False, cache_dir=str(root / "cache"))  # fmt: skip
        train(cfg)
        export_run(root / "runs" / kind, root / "repo")
    return root


class RedisServer:
    """A redis-server of the test session's own, on a free port; stop() and start() simulate an outage."""

    def __init__(self, workdir: Path, durable: bool = False) -> None:
        """``durable``: append-only file fsynced on every write; a killed server loses no acknowledged write."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: the service tests need a real Redis")
        self.binary, self.workdir, self.port, self.durable = binary, workdir, free_port(), durable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def repo(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the session's repository (din v1, dien v1), free to publish into."""
    shutil.copytree(model_repository / "repo", tmp_path / "repo")
    return tmp_path / "repo"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:  # a previous test left it stopped
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


def service_env(repository: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    inherited = ("REDIS_URL", "MODEL_REPOSITORY", "DEFAULT_MODEL", "WORKERS", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update({"MODEL_REPOSITORY": str(repository), "DEFAULT_MODEL": "din", **extra})
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def start_service(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """`python -m app` on a free port; returns the process and its URL once /readyz answers 200."""
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError("server did not become ready")


def stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
