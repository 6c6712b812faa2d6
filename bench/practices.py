"""The seed's training practices in one table (issue 18): each option alone on top of the ml-100k recipe,
DIN, one user split, test figures.

    nice -n 10 python -m bench.practices --data-dir ../shared/data/ml-100k --out runs/practices [--epochs 4]

Rows under din-movielens: the recipe, positive weighting, focal loss, an ensemble of 3 seeds. Rows under the
implicit protocol (each interaction against one sampled negative; the recipe's history feedback off, since an
implicit log has no outcomes): uniform and popularity (α = 0.75) training negatives, judged on the same
uniform test negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.recipes import apply_recipe, load_recipe
from training.train import train

IMPLICIT = {"protocol": "implicit", "feedback_dropout": 0.0}
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("din-movielens", "recipe", {}),
    ("din-movielens", "--pos-weight 2", {"pos_weight": 2.0}),
    ("din-movielens", "--focal-gamma 2", {"focal_gamma": 2.0}),
    ("din-movielens", "--ensemble 3", {"ensemble": 3}),
    ("implicit", "--negatives uniform", {**IMPLICIT, "negatives": "uniform"}),
    ("implicit", "--negatives popularity", {**IMPLICIT, "negatives": "popularity"}),
]


def run(
    data_dir: str, out: Path, epochs: int | None, threads: int | None = None, model: str = "din"
) -> list[dict[str, Any]]:
    recipe = load_recipe("ml-100k")
    start = TrainConfig(dataset="ml-100k", data_dir=data_dir, model=model, progress=False, seed=0, threads=threads)
    base = apply_recipe(start, recipe, given=set())
    rows = []
    for i, (protocol, name, change) in enumerate(VARIANTS):
        cfg = replace(base, out=str(out / f"{i}"), **change)
        if protocol == "implicit":
            cfg = replace(cfg, model_options={**cfg.model_options, "history_feedback": False})
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        m = train(cfg).metrics
        rows.append({"protocol": protocol, "practice": name, **{k: m[k] for k in m if not isinstance(m[k], dict)}})
        logging.info("%s %s: AUC %.4f GAUC %.4f", protocol, name, m["auc"], m["gauc"])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| protocol | practice | AUC | GAUC | logloss | NDCG@5 | Recall@5 | NDCG@10 | best epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['practice']} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | "
            f"{r['ndcg@5']:.4f} | {r['recall@5']:.4f} | {r['ndcg@10']:.4f} | {r['best_epoch']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the ml-100k folder")
    p.add_argument("--out", default="runs/practices")
    p.add_argument("--epochs", type=int, default=None, help="cap every run's epochs (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    rows = run(args.data_dir, out, args.epochs, args.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "practices.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "practices.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
