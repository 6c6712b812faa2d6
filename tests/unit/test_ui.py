"""/ui and its files: served with the right content types and a policy that allows this origin only; nothing
in them points anywhere else (no CDN, no other host)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.ui import ASSETS, PAGE, STATIC
from app.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # the page needs no model: the lifespan (which loads them) is not run
    return TestClient(create_app(Settings(model_repository=tmp_path_factory.mktemp("empty"))))


class References(HTMLParser):
    """Every URL the page's own markup loads (script src, link href, img src, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"src", "href", "action", "srcset"} and v is not None]


def test_the_page_and_each_file_it_loads_are_served_with_their_content_type(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<table id="heatmap">' in page.text
    refs = References()
    refs.feed(page.text)
    assert sorted(refs.urls) == ["ui/ui.css", "ui/ui.js"]  # relative: the page works behind a path prefix
    expected = {"ui/ui.js": "text/javascript; charset=utf-8", "ui/ui.css": "text/css; charset=utf-8"}
    for url in refs.urls:
        r = client.get(f"/{url}")  # what a browser resolves them to from /ui
        assert r.status_code == 200 and r.headers["content-type"] == expected[url]
        assert r.content == (STATIC / url.removeprefix("ui/")).read_bytes()
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.head("/ui").status_code == 200


def test_the_policy_lets_the_page_reach_this_service_only(client: TestClient) -> None:
    policy = dict(
        part.strip().split(" ", 1) for part in client.get("/ui").headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'"
    assert policy["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["/ui/ui.html.bak", "/ui/..%2Fmain.py", "/ui/%2e%2e%2fsettings.py", "/ui/x/ui.js"])
def test_nothing_but_the_listed_files_is_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_the_page_is_not_part_of_the_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_no_file_points_at_another_host() -> None:
    files = [STATIC / PAGE, *(STATIC / name for name in ASSETS)]
    assert {p.name for p in STATIC.iterdir()} == {p.name for p in files}  # every file there is served
    for path in files:
        text = path.read_text()
        # protocol-relative URLs ("//cdn…") too, but not JavaScript's // comments (which start a line or follow
        # code after a space) nor the closing "*/" of CSS comments
        found = re.findall(r"https?://|[\"'(=]\s*//|\bcdn\b|@import|\burl\(", text, flags=re.IGNORECASE)
        assert not found, f"{Path(path).name}: {found}"


def test_the_page_is_read_only(client: TestClient) -> None:
    for path in ("/ui", "/ui/ui.js"):
        r = client.post(path)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
