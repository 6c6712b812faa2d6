"""/ui in a real headless browser (Debian's Chromium) against a running service: the page, driven from its URL,
calls /score and draws the heatmap; the DOM holds what a direct /score call answers, and the screenshot shows it.

DSIN's sessions are drawn from a /score answer of DSIN's shape (top-level ``sessions``, per score
``session_weights``), served by a stand-in for /score beside the real page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from app.routes import ui
from tests.conftest import RedisServer, free_port, run_command, service, service_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY = "ui-test-key"
USER = "ui-user"
CANDIDATES = ["i3", "i5", "i8", "i13", "i21", "not-in-the-vocabulary"]
WINDOW = (1280, 900)


# --- the browser -----------------------------------------------------------------------------------------


def chromium(url: str, workdir: Path, screenshot: Path | None = None) -> str:
    """The page's DOM once its scripts and fetches are done (virtual time lets the page run until nothing is
    pending, up to the budget), and optionally a screenshot of the same page."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: `make tools` (scripts/ensure_tools.sh) installs it"
    args = [
        binary,
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={workdir / 'chromium-profile'}",  # the test's own profile, not the user's
        "--virtual-time-budget=15000",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--dump-dom",
    ]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    result = run_command([*args, url], timeout=120, cwd=workdir)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-3000:]
    return result.stdout


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str, **attrs: str) -> list[Node]:
        """Descendants with this tag whose attributes hold these values (``cls``: one of the classes)."""
        found = []
        for child in self.children:
            want = {("class" if k == "cls" else k.replace("_", "-")): v for k, v in attrs.items()}
            classes = child.attrs.get("class", "").split()
            ok = child.tag == tag and all(
                v in classes if k == "class" else child.attrs.get(k) == v for k, v in want.items()
            )
            found += [child] if ok else []
            found += child.find(tag, **attrs)
        return found

    def one(self, tag: str, **attrs: str) -> Node:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}>"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class Dom(HTMLParser):
    """The dumped DOM as a tree: enough of a parser for Chromium's serialisation of one page."""

    VOID: ClassVar[set[str]] = {"meta", "link", "input", "br", "img", "hr", "source", "col", "area", "base", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def page_url(base: str, fragment: str = "", **query: str) -> str:
    return f"{base}/ui?{urlencode(query)}" + (f"#{fragment}" if fragment else "")


def non_blank(png: Path) -> None:
    """A real rendering: the page's size, many colours (the heatmap's scale, text), no colour on almost all of it."""
    assert png.is_file(), "no screenshot written"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 22)
    assert colours is not None and len(colours) > 100, f"{len(colours or [])} colours"
    assert max(n for n, _ in colours) < 0.97 * WINDOW[0] * WINDOW[1], "one colour covers the page"


# --- the page against the service -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_service(model_repository: Path, redis_server: RedisServer) -> Iterator[str]:
    """The service with din and dien, keys required on /score too (the page must carry one), events posted."""
    if redis_server.proc is None:  # a previous test left it stopped
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    env = service_env(model_repository / "repo", redis_server.url, API_KEY=KEY, SCORE_REQUIRES_KEY="true")
    with service(env, ROOT) as url:
        events = [{"user_id": USER, "item_id": f"i{(7 * i) % 150}", "timestamp": 1000 + 60 * i} for i in range(24)]
        r = httpx.post(f"{url}/events", json={"events": events}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.json() == {"stored": 24}
        yield url


def direct_score(url: str, model: str) -> dict[str, Any]:
    body = {"user_id": USER, "candidates": [{"item_id": c} for c in CANDIDATES], "model": model}
    r = httpx.post(f"{url}/score", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", ["din", "dien"])
def test_the_page_draws_what_score_answers(model: str, keyed_service: str, tmp_path: Path) -> None:
    expected = direct_score(keyed_service, model)
    history, scores = expected["history"], expected["scores"]
    assert len(history) == 20  # the models' max_len: the most recent 20 of the 24 posted

    shot = tmp_path / "ui.png"
    url = page_url(
        keyed_service, f"key={quote(KEY)}", user=USER, candidates=",".join(CANDIDATES), model=model, auto="1"
    )
    dom = Dom(chromium(url, tmp_path, screenshot=shot)).root
    body = dom.one("body")
    assert body.attrs["data-state"] == "done", dom.one("p", id="status").all_text()

    table = dom.one("table", id="heatmap")
    columns = table.find("th", cls="hist")
    assert [c.attrs["data-item"] for c in columns] == [h["item_id"] for h in history]  # most recent first
    assert [c.one("span", cls="cat").all_text() for c in columns] == [h["category_id"] for h in history]
    rows = table.find("tr", cls="candidate")
    assert [r.attrs["data-item"] for r in rows] == CANDIDATES  # N candidate rows …
    for row, score in zip(rows, scores, strict=True):
        prob = row.one("td", cls="prob")
        assert prob.one("span", cls="value").all_text() == f"{score['probability']:.4f}"  # as printed
        assert float(prob.attrs["data-probability"]) == score["probability"]
        cells = row.find("td", cls="att")
        assert len(cells) == len(history)  # … × M history columns
        assert [float(c.attrs["data-attention"]) for c in cells] == pytest.approx(score["attention"], abs=1e-7)
    # coloured by weight: the lowest and the highest weight get the scale's two ends
    cells = table.find("td", cls="att")
    low = min(cells, key=lambda c: float(c.attrs["data-attention"]))
    high = max(cells, key=lambda c: float(c.attrs["data-attention"]))
    assert low.attrs["style"].startswith("background: rgb(68, 1, 84)")  # viridis' first stop
    assert high.attrs["style"].startswith("background: rgb(253, 231, 37)")  # and its last
    summary = dom.one("p", id="summary").all_text()
    assert f"{model} version 1" in summary and "history from store (20 items" in summary
    assert "hidden" in dom.one("div", id="sessions-section").attrs  # no sessions in a DIN/DIEN answer
    non_blank(shot)


def test_the_page_says_the_key_is_missing(keyed_service: str, tmp_path: Path) -> None:
    url = page_url(keyed_service, user=USER, candidates="i3,i5", auto="1")
    dom = Dom(chromium(url, tmp_path)).root
    assert dom.one("body").attrs["data-state"] == "error"
    status = dom.one("p", id="status").all_text()
    assert "HTTP 401" in status and "API key" in status
    assert not dom.one("table", id="heatmap").children  # nothing drawn


# --- picking candidates: the page driven through the DevTools protocol ------------------------------------


class DevTools:
    """One page of a headless Chromium, driven through the DevTools protocol (commands over a WebSocket)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.last_id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries the command's id
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.last_id:
                assert "error" not in message, message["error"]
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")


@contextmanager
def devtools(workdir: Path) -> Iterator[DevTools]:
    """Chromium with its DevTools port open (the port it picked is written into the profile), for the block."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: `make tools` (scripts/ensure_tools.sh) installs it"
    profile = workdir / "devtools-profile"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    args += [f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-port=0", "about:blank"]
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([binary, *args], start_new_session=True, **pipes)  # its own group: killed whole
    try:
        active = profile / "DevToolsActivePort"
        wait_for(lambda: len(active.read_text().splitlines()) == 2, "Chromium's DevTools port", 60)
        port = active.read_text().splitlines()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield DevTools(ws)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_clicked_history_item_joins_the_candidates(keyed_service: str, tmp_path: Path) -> None:
    rows = 'Array.from(document.querySelectorAll("#heatmap tr.candidate"), r => r.dataset.item)'
    with devtools(tmp_path) as page:
        url = page_url(keyed_service, f"key={quote(KEY)}", user=USER, candidates="i3", model="din", auto="1")
        page.call("Page.navigate", url=url)
        wait_for(lambda: page.evaluate("document.body.dataset.state") == "done", "the page to draw", 60)
        assert page.evaluate(rows) == ["i3"]
        picked = page.evaluate('document.querySelectorAll("th.hist")[2].dataset.item')
        for _ in range(2):  # a second click does not add it twice
            page.evaluate('document.querySelectorAll("th.hist")[2].click()')
            assert page.evaluate('document.getElementById("candidates").value') == f"i3, {picked}"
        page.evaluate('document.getElementById("score").click()')  # the form's own submit: scored again
        wait_for(lambda: page.evaluate(rows) == ["i3", picked], "the picked candidate's row", 60)
        assert page.evaluate("document.body.dataset.state") == "done"


# --- DSIN's sessions ---------------------------------------------------------------------------------------

DSIN_HISTORY = [{"item_id": f"h{j}", "category_id": f"c{j % 3}", "label": None} for j in range(7)]
DSIN_SESSIONS = [[0, 1, 2], [3, 4], [5, 6]]  # history indices, most recent session first
DSIN_SCORES = [
    {
        "item_id": "a",
        "probability": 0.8125,
        "attention": [0.3, 0.2, 0.1, 0.15, 0.05, 0.12, 0.08],
        "session_weights": [0.6, 0.2, 0.2],
    },
    {
        "item_id": "b",
        "probability": 0.25,
        "attention": [0.02, 0.03, 0.05, 0.4, 0.3, 0.1, 0.1],
        "session_weights": [0.1, 0.7, 0.2],
    },
]


@contextmanager
def dsin_stand_in(requests: list[dict[str, Any]]) -> Iterator[str]:
    """The real /ui router, with a /score that answers as DSIN serving does (and records what it was sent)."""
    app = FastAPI()
    app.include_router(ui.router)

    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {"default": "din", "models": [{"name": "din"}, {"name": "dsin"}]}

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await request.json()
        requests.append(body)
        answer = {"model": "dsin", "version": "3", "user_id": body["user_id"], "history_source": "store"}
        return {**answer, "history": DSIN_HISTORY, "sessions": DSIN_SESSIONS, "scores": DSIN_SCORES}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the stand-in server", timeout=30)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_page_draws_dsin_sessions(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []
    shot = tmp_path / "dsin.png"
    with dsin_stand_in(sent) as url:
        html = chromium(page_url(url, user="u1", candidates="a,b", model="dsin", auto="1"), tmp_path, shot)
    assert sent == [
        {"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}], "return_attention": True, "model": "dsin"}
    ]
    dom = Dom(html).root
    assert dom.one("body").attrs["data-state"] == "done", dom.one("p", id="status").all_text()
    heatmap = dom.one("table", id="heatmap")
    # a header row naming each session over its columns, and a boundary where a session starts
    spans = heatmap.one("tr", cls="session-row").find("th", cls="session")
    assert [(s.all_text(), s.attrs["colspan"]) for s in spans] == [
        ("session 1", "3"),
        ("session 2", "2"),
        ("session 3", "2"),
    ]
    columns = heatmap.find("th", cls="hist")
    assert ["session-start" in c.attrs["class"].split() for c in columns] == [j in (3, 5) for j in range(7)]
    for row in heatmap.find("tr", cls="candidate"):
        cells = row.find("td", cls="att")
        assert [("session-start" in c.attrs["class"].split()) for c in cells] == [j in (3, 5) for j in range(7)]
    # the per-session weights, one row per candidate
    section = dom.one("div", id="sessions-section")
    assert "hidden" not in section.attrs
    rows = section.one("table", id="sessions").find("tr", cls="candidate")
    weights = [[float(c.attrs["data-weight"]) for c in r.find("td", cls="weight")] for r in rows]
    assert weights == [s["session_weights"] for s in DSIN_SCORES]
    non_blank(shot)
