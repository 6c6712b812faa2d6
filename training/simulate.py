"""Play the synthetic world's users against a running service, so the served loop can run on one machine.

    python -m training.simulate --service http://127.0.0.1:8000 --visits 500 [--world '{"n_users": 300}']

The world is ``training.datasets``' synthetic log with planted interests (the same ``SyntheticConfig`` the
served model was trained on, ``--world`` overriding its fields). Its users visit: each visit asks /score to
rank ``--candidates`` random items, the user looks at the ``--shown`` best ranked and clicks each with the
planted click probability (``datasets.planted_click_probability``: is the item's category among the
categories of the ``recent`` newest behaviours of the history the service used, plus the segment's lift).
Every shown item is posted to /events as that impression's outcome (1 click, 0 shown and not clicked), which
also appends it to the user's history, as in the world's log. A better ranking puts more clicks in the shown
slots, so clicks per impression measure the model online.

The first run seeds each playing user's history with the newest ``--seed-history`` behaviours of its log
(``--seed-history 0`` on later runs). Prints per version: impressions, clicks, clicks per impression, and the
expected clicks per impression under the planted model for this ranking, a random one and the best one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import SyntheticConfig, generate_synthetic, planted_click_probability
from training.service_client import ServiceClient

log = logging.getLogger(__name__)


@dataclass
class VersionTally:
    impressions: int = 0
    clicks: int = 0
    expected: float = 0.0  # Σ planted probability of the shown items
    expected_random: float = 0.0  # … had ``shown`` candidates been shown at random
    expected_best: float = 0.0  # … had the ``shown`` most clickable been shown

    def to_dict(self) -> dict[str, Any]:
        n = max(self.impressions, 1)
        return {
            "impressions": self.impressions,
            "clicks": self.clicks,
            "clicks_per_impression": self.clicks / n,
            "expected_clicks_per_impression": self.expected / n,
            "random_ranking": self.expected_random / n,
            "best_ranking": self.expected_best / n,
        }


@dataclass
class SimulationResult:
    versions: dict[str, VersionTally] = field(default_factory=lambda: defaultdict(VersionTally))
    seeded_events: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": {v: t.to_dict() for v, t in sorted(self.versions.items(), key=lambda kv: int(kv[0]))},
            "seeded_events": self.seeded_events,
            "seconds": round(self.seconds, 2),
        }


class World:
    """The synthetic world: item categories, user segments and each user's log (oldest first)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        blog = generate_synthetic(cfg)
        ev = blog.events
        self.events = ev
        self.items = np.asarray(sorted(ev["item_id"].unique()))
        cat = ev.drop_duplicates("item_id").set_index("item_id")["category_id"]
        self.category = {str(k): str(v) for k, v in cat.items()}
        assert blog.users is not None
        self.segment = {str(u): str(s) for u, s in blog.users["segment"].items()}
        self.users = np.asarray(sorted(self.segment))

    def click_probability(self, user: str, recent_categories: set[str], categories: list[str]) -> np.ndarray:
        """(K,) planted click probability of each candidate category for this user now."""
        match = np.array([c in recent_categories for c in categories], dtype=bool)
        segment = np.full(len(categories), int(self.segment[user].lstrip("s")))
        return planted_click_probability(self.cfg, match, segment)

    def recent_events(self, user: str, n: int) -> list[dict[str, Any]]:
        mine = self.events[self.events["user_id"] == user].tail(n)
        out: list[dict[str, Any]] = []
        for r in mine.to_dict("records"):
            event = {"user_id": user, "item_id": r["item_id"], "category_id": r["category_id"]}
            out.append(event | {"timestamp": int(r["timestamp"]), "label": int(r["label"])})
        return out


def simulate(
    client: ServiceClient,
    world: World,
    visits: int,
    users: int = 100,
    candidates: int = 20,
    shown: int = 3,
    seed_history: int = 20,
    seed: int = 0,
    answers: list[dict[str, Any]] | None = None,
) -> SimulationResult:
    """Seed, then play ``visits`` visits; ``answers`` (when given) collects every /score answer."""
    rng = np.random.default_rng(seed)
    result = SimulationResult()
    started = time.perf_counter()
    players = rng.choice(world.users, size=min(users, len(world.users)), replace=False)
    if seed_history > 0:
        batch: list[dict[str, Any]] = []
        for user in players:
            batch += world.recent_events(str(user), seed_history)
        for i in range(0, len(batch), 1000):
            result.seeded_events += client.request("POST", "/events", {"events": batch[i : i + 1000]})["stored"]
    for _ in range(visits):
        user = str(rng.choice(players))
        items = [str(i) for i in rng.choice(world.items, size=min(candidates, len(world.items)), replace=False)]
        cats = [world.category[i] for i in items]
        request = {
            "user_id": user,
            "candidates": [{"item_id": i, "category_id": c} for i, c in zip(items, cats, strict=True)],
            "user_features": {"segment": world.segment[user]},
            "return_attention": False,
        }
        answer = client.request("POST", "/score", request)
        if answers is not None:
            answers.append(answer)
        recent = {h["category_id"] for h in answer["history"][: world.cfg.recent]}
        p = world.click_probability(user, recent, cats)  # (K,)
        prob = np.array([s["probability"] for s in answer["scores"]])
        top = np.argsort(-prob, kind="stable")[:shown]
        clicks = rng.random(top.size) < p[top]
        outcomes = [
            {
                "user_id": user,
                "item_id": items[j],
                "category_id": cats[j],
                "label": int(c),
                "impression_id": answer["impression_id"],
            }
            for j, c in zip(top, clicks, strict=True)
        ]
        client.request("POST", "/events", {"events": outcomes})
        tally = result.versions[answer["version"]]
        tally.impressions += 1
        tally.clicks += int(clicks.sum())
        tally.expected += float(p[top].sum())
        tally.expected_random += float(p.mean() * top.size)
        tally.expected_best += float(np.sort(p)[::-1][: top.size].sum())
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", required=True, help="the scoring service, http://HOST:PORT")
    p.add_argument("--api-key", default=os.environ.get("API_KEY"), help="bearer key for /events (default: $API_KEY)")
    p.add_argument("--world", default="{}", help="JSON object of SyntheticConfig fields (the trained model's world)")
    p.add_argument("--visits", type=int, default=500)
    p.add_argument("--users", type=int, default=100, help="how many of the world's users play")
    p.add_argument("--candidates", type=int, default=20, help="items ranked per visit")
    p.add_argument("--shown", type=int, default=3, help="the best ranked items the user looks at")
    p.add_argument("--seed-history", type=int, default=20, help="seed each player's history first (0: do not)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers-out", default=None, help="write every /score answer here (JSON lines)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world = World(SyntheticConfig(**json.loads(args.world)))
    answers: list[dict[str, Any]] | None = [] if args.answers_out else None
    with ServiceClient(args.service, args.api_key) as client:
        result = simulate(
            client, world, args.visits, args.users, args.candidates, args.shown, args.seed_history, args.seed, answers
        )
    if args.answers_out and answers is not None:
        Path(args.answers_out).write_text("".join(json.dumps(a) + "\n" for a in answers))
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
