"""Write a synthetic behaviour log of any size as parquet parts in the canonical schema.

python -m training.synthesize --events 1e8 --out data/synthetic-1e8
python -m training.train --dataset events --data-dir data/synthetic-1e8 --model din --out runs/din-1e8

The log has the planted structure of ``--dataset synthetic`` (users with a few interests, clicks mostly on
categories among their recent behaviours) with Zipf item popularity; it is generated block by block of
users, so memory stays bounded (≈ 1 GB) whatever the size. Sizes follow --events unless given: 50 events
per user on average, one item per 20 events, 500 items per category.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from training.datasets import SyntheticConfig, synthetic_blocks

EVENTS_PER_USER = 50  # the mean of min_events=20 and max_events=80
EVENTS_PER_ITEM = 20
ITEMS_PER_CATEGORY = 500
BLOCK_EVENTS = 1_000_000  # events per part file (and per generated block)


def scaled_config(
    events: int,
    users: int | None = None,
    items: int | None = None,
    categories: int | None = None,
    zipf: float = 1.0,
    seed: int = 0,
    session_events: float = 0.0,
) -> SyntheticConfig:
    """A config of about ``events`` events; the other sizes scale with it unless given."""
    n_users = users or max(1, round(events / EVENTS_PER_USER))
    n_items = items or max(100, round(events / EVENTS_PER_ITEM))
    n_categories = categories or max(10, n_items // ITEMS_PER_CATEGORY)
    return SyntheticConfig(
        n_users=n_users,
        n_items=n_items,
        n_categories=n_categories,
        min_events=20,
        max_events=80,
        zipf=zipf,
        seed=seed,
        session_events=session_events,
    )


def write_parts(cfg: SyntheticConfig, out: Path, block_users: int) -> dict[str, object]:
    """Write the log as out/part-NNNNN.parquet (one block of users each) and out/synthetic.json; returns
    what was written. An existing folder is replaced."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    events = parts = 0
    for i, table in enumerate(synthetic_blocks(cfg, block_users)):
        pq.write_table(table, out / f"part-{i:05d}.parquet")
        events += table.num_rows
        parts += 1
    summary = {
        "events": events,
        "parts": parts,
        "seconds": time.perf_counter() - t0,
        "block_users": block_users,
        "config": asdict(cfg),
    }
    # the description sits beside the parts, in JSON (a loader reads only *.parquet and *.csv)
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=float, required=True, help="about this many events (1e8 works)")
    p.add_argument("--out", required=True, help="folder for the parquet parts (replaced if it exists)")
    p.add_argument("--users", type=int, default=None, help=f"default: events / {EVENTS_PER_USER}")
    p.add_argument("--items", type=int, default=None, help=f"default: events / {EVENTS_PER_ITEM}")
    p.add_argument("--categories", type=int, default=None, help=f"default: items / {ITEMS_PER_CATEGORY}")
    p.add_argument("--zipf", type=float, default=1.0, help="item popularity exponent inside a category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--session-events",
        type=float,
        default=0.0,
        help="plant sessions of this many behaviours on average, clicks following the session's interest (DSIN)",
    )
    args = p.parse_args(argv)
    cfg = scaled_config(
        int(args.events), args.users, args.items, args.categories, args.zipf, args.seed, args.session_events
    )
    block_users = max(1, BLOCK_EVENTS // EVENTS_PER_USER)
    s = write_parts(cfg, Path(args.out), block_users)
    print(
        f"{s['events']:,} events, {cfg.n_users:,} users, {cfg.n_items:,} items, {cfg.n_categories:,} categories "
        f"in {s['parts']} parts, {s['seconds']:.1f} s → {args.out}"
    )


if __name__ == "__main__":
    main()
