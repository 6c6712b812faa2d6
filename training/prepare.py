"""Prepare a log's splits into the cache, without training: a big log is read once, and every run with
the same data flags then starts from the memory-mapped cache.

python -m training.prepare --dataset events --data-dir data/synthetic-1e8 --min-count 2

Takes training.train's data flags; prints what was prepared (sizes, users, out-of-vocabulary counts) as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging

from training.config import add_train_arguments
from training.recipes import config_from_command_line
from training.train import load_data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a recipe's data settings (max_len, min_count, protocol, ...) make the cache key the run will look up
    cfg = config_from_command_line(p, args, argv, model="din", out="")
    data = load_data(cfg)
    summary = {
        "samples": {k: len(getattr(data, k)) for k in ("train", "valid", "test")},
        "vocabulary": {"items": data.vocab.n_items, "categories": data.vocab.n_categories},
        **data.info,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
