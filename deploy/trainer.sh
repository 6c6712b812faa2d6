#!/bin/sh
# One-shot trainer: when the model repository holds no version of MODEL_NAME yet, train it and export it.
# RETRAIN=1 (the Kubernetes CronJob) trains and publishes the next version even when one exists.
# The same commands run natively in tests/e2e/test_stack.py.
set -eu
: "${MODEL_REPOSITORY:=/models}"
: "${MODEL_NAME:=din}"
: "${DATASET:=synthetic}"
: "${EPOCHS:=3}"
RUN_DIR="${RUN_DIR:-$(mktemp -d)}"
if [ "${RETRAIN:-0}" != 1 ] && ls "$MODEL_REPOSITORY/$MODEL_NAME" 2>/dev/null | grep -qE '^[0-9]+$'; then
    echo "trainer: $MODEL_REPOSITORY/$MODEL_NAME already has a version; nothing to do"
    exit 0
fi
set -- --dataset "$DATASET" --model "$MODEL_NAME" --epochs "$EPOCHS" --out "$RUN_DIR" --no-progress
if [ -n "${DATA_DIR:-}" ]; then
    set -- "$@" --data-dir "$DATA_DIR"
fi
python -m training.train "$@"
python -m training.export --run "$RUN_DIR" --repository "$MODEL_REPOSITORY" --name "$MODEL_NAME"
