"""Train several models on the same split and write the paper-style comparison.

    python -m training.compare --dataset ml-100k --data-dir ../shared/data/ml-100k \
        --models base,din,dien,dsin --out runs/compare [--repeats 3]
    python -m training.compare --recipe ml-100k --data-dir ../shared/data/ml-100k --out runs/compare-ml100k

Writes DIR/results.json ({"din": {"auc", "gauc", "logloss", "relaimpr", ...}}), DIR/results.md and
DIR/valid_gauc.png (validation GAUC per epoch), plus one run directory per model (and repeat).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from models import MODELS
from training.config import CompareConfig, TrainConfig, add_train_arguments, config_from_args, given_flags
from training.metrics import rela_impr
from training.recipes import apply_recipe, recipe_from_args, resolve_compare
from training.train import load_data, train

log = logging.getLogger(__name__)
METRICS = ("auc", "gauc", "logloss")
RANKING_PREFIXES = ("ndcg@", "recall@", "precision@")  # training.metrics.ranking's keys, one per cut-off K
# what an attention model must be at least level with the base model in (issue 18), labelled and, for models
# with history feedback, served without labels; the names the table shows them by
EDGE_METRICS = {
    "auc": "AUC",
    "gauc": "GAUC",
    "auc_without_feedback": "AUC no labels",
    "gauc_without_feedback": "GAUC no labels",
}


def ranking_keys(metrics: list[dict[str, Any]]) -> list[str]:
    """The ranking metrics every run reported (their K come from --ranking-k), in the runs' order."""
    keys = [k for k in metrics[0] if k.startswith(RANKING_PREFIXES) and not k.endswith("_std")] if metrics else []
    return [k for k in keys if all(k in m for m in metrics)]


def summarise(runs: dict[str, list[dict[str, Any]]], baseline: str = "base") -> dict[str, dict[str, Any]]:
    """Mean (and std over repeats) of each metric per model; RelaImpr of the mean AUC vs ``baseline``."""
    out: dict[str, dict[str, Any]] = {}
    for name, metrics in runs.items():
        keys = [*METRICS, *ranking_keys(metrics)]
        row: dict[str, Any] = {k: float(np.mean([m[k] for m in metrics])) for k in keys}
        if len(metrics) > 1:
            row.update({f"{k}_std": float(np.std([m[k] for m in metrics])) for k in keys})
        row["runs"] = len(metrics)
        row["best_epoch"] = [m["best_epoch"] for m in metrics]
        row["train_samples_per_second"] = float(np.mean([m["train_samples_per_second"] for m in metrics]))
        if all("without_feedback" in m for m in metrics):  # history-feedback models served without labels
            row["auc_without_feedback"] = float(np.mean([m["without_feedback"]["auc"] for m in metrics]))
            row["gauc_without_feedback"] = float(np.mean([m["without_feedback"]["gauc"] for m in metrics]))
        out[name] = row
    if baseline in out:
        for name, row in out.items():
            row["relaimpr"] = rela_impr(row["auc"], out[baseline]["auc"])
            if name != baseline:
                row["below_base"] = below_baseline(row, out[baseline])
    return out


def below_baseline(row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The EDGE_METRICS in which a model's mean is below the base model's (both must have the metric): an
    attention model that does not beat sum pooling there has lost its reason to exist on this data."""
    return [k for k in EDGE_METRICS if k in row and k in base and row[k] < base[k]]


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    ranked = ranking_keys(list(results.values()))
    lines = [
        "| model | AUC | GAUC | logloss | RelaImpr | "
        + "".join(
            f"{k.replace('ndcg', 'NDCG').replace('recall', 'Recall').replace('precision', 'Prec')} | " for k in ranked
        )
        + "train samples/s | AUC, no labels served | GAUC, no labels served | below base in |",
        "| --- | --- | --- | --- | --- | " + "--- | " * len(ranked) + "--- | --- | --- | --- |",
    ]
    warnings = []
    for name, r in results.items():

        def cell(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:.4f}" + (f" ± {r[k + '_std']:.4f}" if f"{k}_std" in r else "")

        rel = f"{100 * r['relaimpr']:+.2f}%" if "relaimpr" in r else "—"
        below = ", ".join(EDGE_METRICS[k] for k in r.get("below_base", []))
        if below:
            warnings.append(f"**{name} is below the base model in {below}.**")
        lines.append(
            f"| {name} | {cell('auc')} | {cell('gauc')} | {cell('logloss')} | {rel} | "
            + "".join(f"{cell(k)} | " for k in ranked)
            + f"{r['train_samples_per_second']:,.0f} | "
            + "".join(f"{r[k]:.4f} | " if k in r else "— | " for k in ("auc_without_feedback", "gauc_without_feedback"))
            + (f"**{below}** |" if below else "— |")
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{w}\n" for w in warnings)


def plot_valid_gauc(histories: dict[str, list[list[dict[str, float]]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in histories.items():
        for i, hist in enumerate(runs):
            ax.plot(
                [h["epoch"] for h in hist],
                [h["valid_gauc"] for h in hist],
                marker="o",
                label=name if i == 0 else None,
                color=f"C{list(histories).index(name)}",
                alpha=0.8,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation GAUC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    base_cfg: TrainConfig, models: list[str], out: Path, repeats: int = 1, splits: int = 1
) -> dict[str, dict[str, Any]]:
    """Every model on the same split(s): ``splits`` user splits (seeds seed, seed+1, ...), each model
    trained ``repeats`` times per split with different initialisation seeds."""
    runs: dict[str, list[dict[str, Any]]] = {}
    histories: dict[str, list[list[dict[str, float]]]] = {}
    protocol = ""
    for split in range(splits):
        split_cfg = replace(base_cfg, seed=base_cfg.seed + split)
        data = load_data(split_cfg)  # one split for every model
        protocol = str(data.info["protocol"])
        for name in models:
            for r in range(repeats):
                run_dir = out / name
                if splits > 1:
                    run_dir = run_dir / f"split-{split}"
                if repeats > 1:
                    run_dir = run_dir / f"repeat-{r}"
                cfg = replace(split_cfg, model=name, out=str(run_dir), seed=split_cfg.seed + 1000 * r)
                result = train(cfg, data=data)
                runs.setdefault(name, []).append({**result.metrics, "split": split, "repeat": r})
                histories.setdefault(name, []).append(result.history)
                log.info("%s split %d repeat %d: %s", name, split, r, {k: round(result.metrics[k], 4) for k in METRICS})
    results = summarise(runs)
    for name in results:
        results[name]["per_run"] = [
            {"split": m["split"], "repeat": m["repeat"], **{k: m[k] for k in [*METRICS, *ranking_keys(runs[name])]}}
            for m in runs[name]
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = (
        f"Dataset `{base_cfg.dataset}`, protocol `{protocol}`, max_len {base_cfg.max_len}, {splits} user split(s) "
        f"from seed {base_cfg.seed}, {repeats} training seed(s) each; test-set figures, mean ± std over runs."
    )
    if base_cfg.recipe:
        header = f"Recipe `{base_cfg.recipe['name']}` (sha256 {base_cfg.recipe['sha256'][:12]}) and flags. {header}"
    (out / "results.md").write_text(f"{header}\n\n{markdown_table(results)}")
    plot_valid_gauc(histories, out / "valid_gauc.png")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    d = CompareConfig()
    p.add_argument("--models", default=",".join(d.models), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=d.repeats, help="training seeds per model, on the same split")
    p.add_argument(
        "--splits", type=int, default=d.splits, help="user splits (seeds --seed, --seed+1, ...) to average over"
    )
    p.add_argument("--out", help="output folder (here or in the recipe)")
    args = p.parse_args(argv)
    flags = CompareConfig(tuple(m for m in args.models.split(",") if m), args.repeats, args.splits)
    cfg = config_from_args(args, flags.models[0] if flags.models else "din", args.out or "")
    recipe = recipe_from_args(p, args)
    if recipe is not None:
        given = given_flags(p, argv)
        cfg, flags = apply_recipe(cfg, recipe, given), resolve_compare(flags, recipe, given)
    if not cfg.out:
        p.error("--out is required (or `out` in the recipe)")
    unknown = sorted(set(flags.models) - set(MODELS))
    if unknown or not flags.models:
        p.error(f"unknown models {unknown}" if unknown else "no models to compare")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = compare(cfg, list(flags.models), Path(cfg.out), flags.repeats, flags.splits)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
