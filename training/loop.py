"""The served loop, one round: consume the impression log, train on it, export, serve the new version to a
share of users, and report online CTR per version.

    python -m training.loop --redis-url redis://127.0.0.1:6379/0 --service http://127.0.0.1:8000 \\
        --repository runs/repository --model din --work runs/loop [--window 30m] [--percent 10]

1. consume: ``training.served`` once (the parts gather in WORK/served; open windows wait for the next round);
2. train: ``--dataset served`` on all the parts, warm-started from the run that produced the version serving
   now (its checkpoint, found through the version's metadata; a cold start when it is not on this machine);
3. export: the next version of the model into the repository;
4. split: pin the serving version first (POST /admin/models/NAME/load {"version": primary}), so repository
   polling (MODEL_POLL_INTERVAL_S), which makes a newer version the primary of an unpinned model, leaves it
   serving; then PUT /admin/models/NAME/split {"version": new, "percent": P}: P% of users get the new version
   until an admin promotes it (POST /admin/models/NAME/load {"version": new}) or drops the split;
5. report: clicks per impression per version, from the joined samples: over everything logged, and since the
   newest version began serving (the versions side by side over the same period); WORK/report.json too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from models import ModelConfig
from training.config import TrainConfig
from training.export import METADATA_FILE, export_run
from training.served import Consumer, ConsumerConfig, parse_duration_ms
from training.served_data import online_ctr, split_ctr
from training.service_client import ServiceClient
from training.train import CHECKPOINT_NAME, train

log = logging.getLogger(__name__)

# a ModelConfig's sizes come from the data; the rest of the serving version's configuration carries over
SIZE_FIELDS = {"n_items", "n_categories", "user_feature_cardinalities"}


@dataclass(frozen=True)
class LoopConfig:
    redis_url: str
    service: str
    repository: Path
    model: str = "din"  # the model name in the repository and the service
    work: Path = Path("runs/loop")
    window_ms: int = 30 * 60_000
    percent: float = 10.0
    api_key: str | None = None
    epochs: int = 2
    batch_size: int = 256
    min_samples: int = 100  # fewer served samples than this: no new version this round
    served_rows: str = "outcomes"  # train on candidates with an outcome (shown) or on "all" that were scored
    train: bool = True  # False: consume and report only


def serving_version(client: ServiceClient, name: str) -> tuple[str, dict[str, Any]]:
    """(the primary version, the model's status) from GET /models."""
    models = client.request("GET", "/models")["models"]
    status = next((m for m in models if m["name"] == name), None)
    if status is None or status["primary"] is None:
        raise RuntimeError(f"the service serves no version of {name!r}")
    return str(status["primary"]), status


def warm_start_run(repository: Path, name: str, version: str) -> Path | None:
    """The run directory the version was exported from, if its checkpoint is on this machine."""
    meta = json.loads((repository / name / version / METADATA_FILE).read_text())
    out = (meta.get("training") or {}).get("out")
    return Path(out) if out and (Path(out) / CHECKPOINT_NAME).is_file() else None


def train_config(cfg: LoopConfig, meta: dict[str, Any], run_dir: Path, init_from: Path | None) -> TrainConfig:
    """Train as the serving version was trained (model type, its configuration, history length)."""
    trained = meta.get("training") or {}
    options = {k: v for k, v in (meta.get("model_config") or {}).items() if k not in SIZE_FIELDS}
    options = {k: v for k, v in options.items() if k in {f.name for f in fields(ModelConfig)}}
    return TrainConfig(
        dataset="served",
        data_dir=str(cfg.work / "served"),
        model=meta["model_type"],
        out=str(run_dir),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        max_len=int(meta.get("max_history") or trained.get("max_len") or 50),
        model_options=options,
        init_from=str(init_from) if init_from else None,
        served_rows=cfg.served_rows,
        cache_dir=None,
        progress=False,
        threads=trained.get("threads"),
    )


def run_round(cfg: LoopConfig) -> dict[str, Any]:
    """One round of the loop; returns what it did and the CTR report."""
    served = cfg.work / "served"
    consumer = Consumer(ConsumerConfig(cfg.redis_url, served, window_ms=cfg.window_ms))
    stats = consumer.run_once()
    report: dict[str, Any] = {"consumed": {**stats.to_dict(), "pending_impressions": len(consumer.joiner.pending)}}
    log.info("consumed: %s", report["consumed"])
    with ServiceClient(cfg.service, cfg.api_key) as client:
        primary, before = serving_version(client, cfg.model)
        meta = json.loads((cfg.repository / cfg.model / primary / METADATA_FILE).read_text())
        samples = _served_samples(served)
        if not cfg.train:
            report["new_version"] = None
        elif samples < cfg.min_samples:
            log.warning("only %d served samples (< %d): no new version this round", samples, cfg.min_samples)
            report["new_version"] = None
        else:
            init_from = warm_start_run(cfg.repository, cfg.model, primary)
            run_dir = cfg.work / "runs" / f"from-v{primary}-{_next_run(cfg.work / 'runs')}"
            tcfg = train_config(cfg, meta, run_dir, init_from)
            log.info("training on %d served samples, %s", samples, f"warm from {init_from}" if init_from else "cold")
            result = train(tcfg)
            # pin what serves now before the new version appears: polling would otherwise promote it
            client.request("POST", f"/admin/models/{cfg.model}/load", {"version": int(primary)})
            folder, _ = export_run(run_dir, cfg.repository, name=cfg.model)
            new = int(folder.name)
            status = client.request("PUT", f"/admin/models/{cfg.model}/split", {"version": new, "percent": cfg.percent})
            replaced = (before.get("split") or {}).get("version")
            if replaced is not None and replaced not in (str(new), status["primary"]):
                # the previous round's candidate lost its split: unloaded, not kept in memory as a standby
                client.request("POST", f"/admin/models/{cfg.model}/unload", {"version": int(replaced)})
            report["new_version"] = {
                "version": new,
                "split": status["split"],
                "primary": status["primary"],
                "warm_start": str(init_from) if init_from else None,
                "offline": {k: result.metrics[k] for k in ("auc", "gauc", "logloss")},
            }
            log.info("v%d serves %.1f%% of users beside v%s", new, cfg.percent, primary)
    has_samples = _served_samples(served) > 0
    report["online_ctr"] = online_ctr(served) if has_samples else []
    since, rows = split_ctr(served, cfg.model) if has_samples else (None, [])
    report["split_ctr"] = {"since_ms": since, "versions": rows}
    cfg.work.mkdir(parents=True, exist_ok=True)
    (cfg.work / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _served_samples(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in folder.glob("part-*.parquet"))


def _next_run(runs: Path) -> int:
    return len(list(runs.iterdir())) + 1 if runs.is_dir() else 1


def format_report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<8} {'version':>7} {'impressions':>11} {'clicks':>7} {'clicks/impression':>17}"]
    for r in rows:
        lines.append(
            f"{r['model']:<8} {r['version']:>7} {r['impressions']:>11} {r['clicks']:>7} "
            f"{r['clicks_per_impression']:>17.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", required=True, help="the Redis holding the service's impression log")
    p.add_argument("--service", required=True, help="the scoring service, http://HOST:PORT")
    p.add_argument("--repository", required=True, help="the service's model repository")
    p.add_argument("--model", default="din", help="model name in the repository")
    p.add_argument("--work", default="runs/loop", help="served parts, training runs and report.json go here")
    p.add_argument("--window", default="30m", help="attribution window (training.served --window)")
    p.add_argument("--percent", type=float, default=10.0, help="share of users the new version serves")
    p.add_argument("--api-key", default=os.environ.get("API_KEY"), help="the service's admin key (default: $API_KEY)")
    p.add_argument("--epochs", type=int, default=LoopConfig.epochs)
    p.add_argument("--min-samples", type=int, default=LoopConfig.min_samples)
    p.add_argument(
        "--served-rows",
        choices=["outcomes", "all"],
        default=LoopConfig.served_rows,
        help="train on the candidates that got an outcome (were shown), or on every candidate scored",
    )
    p.add_argument("--report-only", action="store_true", help="consume and report; train nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LoopConfig(
        redis_url=args.redis_url,
        service=args.service,
        repository=Path(args.repository),
        model=args.model,
        work=Path(args.work),
        window_ms=parse_duration_ms(args.window),
        percent=args.percent,
        api_key=args.api_key,
        epochs=args.epochs,
        min_samples=args.min_samples,
        served_rows=args.served_rows,
        train=not args.report_only,
    )
    report = run_round(cfg)
    print(json.dumps({k: v for k, v in report.items() if k not in ("online_ctr", "split_ctr")}, indent=2))
    print("online CTR, every impression logged:")
    print(format_report(report["online_ctr"]))
    print("since the newest version began serving (side by side over the same period):")
    print(format_report(report["split_ctr"]["versions"]))


if __name__ == "__main__":
    main()
