"""Export a trained run into a versioned model repository, after checking ONNX Runtime against PyTorch.

    python -m training.export --run RUN_DIR --repository DIR [--name NAME] [--version N] [--quantize int8]

Writes DIR/NAME/VERSION/{model.onnx, metadata.json, vocab.json, selfcheck.npz}. A version appears
atomically: it is written into a hidden temporary folder, then renamed, so a reader never sees half
of one. DIN also gets ``model_cuda.onnx``, the serving form without host-side branching, which the CUDA
provider runs. Parity is checked against the paper form (``NaiveServing``); benchmark graphs are not
shipped: ``bench.inprocess`` builds its naive graph from the run's checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from contract import (
    FEEDBACK_INPUT,
    FEEDBACK_PAD,
    FEEDBACK_POSITIVE,
    FEEDBACK_UNKNOWN,
    FEEDBACK_VALUES,
    FIRST_INDEX,
    OOV,
    OUTPUT_NAMES,
    SESSION_INPUTS,
    SESSION_OUTPUT,
    VOCABULARY_INDICES,
    input_names,
    output_names,
)
from models import CTRModel, ModelConfig
from models.ensemble import Ensemble, EnsembleServing
from models.serving import NaiveServing, serving_module
from sessions import SessionSpec, session_layout
from training.train import CHECKPOINT_NAME, load_model

log = logging.getLogger(__name__)

METADATA_FORMAT = 1
OPSET = 17
PARITY_TOLERANCE = 1e-5
MODEL_FILE, METADATA_FILE, VOCAB_FILE = "model.onnx", "metadata.json", "vocab.json"
MODEL_CUDA_FILE = "model_cuda.onnx"  # DIN's serving form without host-side branching, for the CUDA provider
SELFCHECK_FILE = "selfcheck.npz"
SELFCHECK_TOLERANCE = 1e-4  # the loading service's runtime (another ORT build, CUDA) may round differently

DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "hist_items": {0: "users", 1: "history"},
    "hist_cats": {0: "users", 1: "history"},
    "hist_mask": {0: "users", 1: "history"},
    "hist_feedback": {0: "users", 1: "history"},
    "user_feats": {0: "users"},
    "cand_items": {0: "candidates"},
    "cand_cats": {0: "candidates"},
    "cand_user": {0: "candidates"},
    "probability": {0: "candidates"},
    "attention": {0: "candidates", 1: "history"},
    "sess_index": {0: "users"},
    "sess_mask": {0: "users"},
    "session_weights": {0: "candidates"},
}


class ExportError(RuntimeError):
    """The export was refused (parity failed, version taken, ...); nothing was published."""


@dataclass(frozen=True)
class GraphSpec:
    """What a caller must feed: vocabulary sizes, the number of user features, and whether the graph takes
    each history behaviour's feedback."""

    n_items: int
    n_categories: int
    feature_cardinalities: tuple[int, ...]
    history_feedback: bool = False
    sessions: SessionSpec | None = None  # DSIN: the graph takes each history's session division

    @property
    def input_names(self) -> tuple[str, ...]:
        return input_names(self.history_feedback, self.sessions is not None)

    @property
    def output_names(self) -> tuple[str, ...]:
        return output_names(self.sessions is not None)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> GraphSpec:
        """The spec of a published version (versions exported before history feedback have none)."""
        v = meta["vocabulary"]
        feedback = (meta.get("history_feedback") or {}).get("input") is not None
        s = meta.get("sessions")
        sessions = SessionSpec.from_metadata(s) if s else None
        return cls(v["n_items"], v["n_categories"], tuple(v["user_feature_cardinalities"]), feedback, sessions)


def io_signature(spec: GraphSpec) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and shapes (symbolic axes by name) as metadata.json states them."""
    shapes: dict[str, list[str | int]] = {
        "hist_items": ["users", "history"],
        "hist_cats": ["users", "history"],
        "hist_mask": ["users", "history"],
        "hist_feedback": ["users", "history"],
        "user_feats": ["users", len(spec.feature_cardinalities)],
        "cand_items": ["candidates"],
        "cand_cats": ["candidates"],
        "cand_user": ["candidates"],
        "probability": ["candidates"],
        "attention": ["candidates", "history"],
    }
    if spec.sessions is not None:
        k, t = spec.sessions.sessions, spec.sessions.length
        shapes.update({"sess_index": ["users", k, t], "sess_mask": ["users", k, t], SESSION_OUTPUT: ["candidates", k]})
    dtypes = {"hist_mask": "bool", "sess_mask": "bool", "probability": "float32", "attention": "float32"}
    dtypes[SESSION_OUTPUT] = "float32"
    return {
        "inputs": [{"name": n, "dtype": dtypes.get(n, "int64"), "shape": shapes[n]} for n in spec.input_names],
        "outputs": [{"name": n, "dtype": dtypes[n], "shape": shapes[n]} for n in spec.output_names],
    }


TIME_STYLES = ("mixed", "singletons", "full", "burst")


def random_times(rng: np.random.Generator, width: int, spec: SessionSpec, style: str) -> np.ndarray:
    """(width,) timestamps, oldest first: "singletons" puts every behaviour in a session of its own, "full" makes
    sessions of exactly T behaviours (K × T of them fill the layout), "burst" makes one session of them all (a
    chunked spec cuts it into sessions of T), "mixed" breaks about one gap in four."""
    position = np.arange(width)
    if style == "singletons":
        gaps = np.full(width, spec.gap + 1)
    elif style == "burst":
        gaps = np.ones(width, dtype=np.int64)
    elif style == "full":
        gaps = np.where(position % spec.length == 0, spec.gap + 1, 1)
    else:
        gaps = np.where(
            rng.random(width) < 0.25,
            rng.integers(spec.gap + 1, 10 * spec.gap, width),
            rng.integers(0, spec.gap + 1, width),
        )
    return 1_700_000_000 + np.cumsum(gaps)


def random_inputs(
    rng: np.random.Generator,
    spec: GraphSpec,
    lengths: list[int],
    candidates: list[int],
    width: int | None = None,
    styles: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Serving inputs for users with the given history lengths and candidate counts (padded to ``width``); for
    DSIN, each history's session division of timestamps of the given ``styles`` (random_times; random styles
    by default)."""
    u = len(lengths)
    width = max(1, max(lengths), width or 0)
    mask = np.arange(width) < np.asarray(lengths)[:, None]  # (U, L)
    n = int(sum(candidates))
    feats = [rng.integers(OOV, c, size=u) for c in spec.feature_cardinalities]  # OOV included
    feed = {
        "hist_items": np.where(mask, rng.integers(1, spec.n_items, size=(u, width)), 0).astype(np.int64),
        "hist_cats": np.where(mask, rng.integers(1, spec.n_categories, size=(u, width)), 0).astype(np.int64),
        "hist_mask": mask,
        "user_feats": np.stack(feats, axis=1).astype(np.int64) if feats else np.zeros((u, 0), dtype=np.int64),
        "cand_items": rng.integers(1, spec.n_items, size=n).astype(np.int64),
        "cand_cats": rng.integers(1, spec.n_categories, size=n).astype(np.int64),
        "cand_user": rng.permutation(np.repeat(np.arange(u), candidates)).astype(np.int64),
    }
    if spec.history_feedback:  # unknown (no label given) included
        given = rng.integers(FEEDBACK_UNKNOWN, FEEDBACK_POSITIVE + 1, size=(u, width))
        feed[FEEDBACK_INPUT] = np.where(mask, given, FEEDBACK_PAD).astype(np.int64)
    if spec.sessions is not None:
        styles = styles or [str(rng.choice(TIME_STYLES)) for _ in range(u)]
        times = np.stack([random_times(rng, width, spec.sessions, style) for style in styles])  # (U, L)
        feed["sess_index"], feed["sess_mask"] = session_layout(times, mask, spec.sessions)
    return feed


def session_parity_cases(spec: SessionSpec) -> list[tuple[list[int], list[int], list[str]]]:
    """DSIN's edges: no session, sessions of one behaviour, the full K × T layout, one long session, several
    users per call."""
    full = spec.sessions * spec.length
    return [
        ([0], [3], ["mixed"]),
        ([spec.sessions + 2], [5], ["singletons"]),
        ([full], [200], ["full"]),
        ([full + 7], [9], ["full"]),
        ([full + 3], [6], ["burst"]),
        ([0, full, 3, 23, 1], [4, 50, 7, 11, 2], ["mixed", "full", "singletons", "mixed", "singletons"]),
    ]


def parity_cases(rng: np.random.Generator, max_len: int, n: int = 12) -> list[tuple[list[int], list[int]]]:
    """(history lengths, candidate counts) per case: the edges first, then random batches of users."""
    cases = [([0], [1]), ([max_len], [500]), ([0, max_len, 1], [3, 200, 7]), ([max_len // 2], [1])]
    while len(cases) < n:
        users = int(rng.integers(1, 6))
        lengths = [int(x) for x in rng.integers(0, max_len + 1, size=users)]
        counts = [int(x) for x in rng.integers(1, 500 // users + 1, size=users)]
        cases.append((lengths, counts))
    return cases


def serving_form(model: CTRModel | Ensemble, device: str = "cpu") -> nn.Module:
    """The graph to export: the model's serving form, or for an ensemble its members' averaged."""
    if isinstance(model, Ensemble):
        return EnsembleServing([serving_module(m, device) for m in model.members]).eval()  # type: ignore[arg-type]
    return serving_module(model, device)


def torch_reference(model: CTRModel | Ensemble, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The paper form, history repeated per candidate (each member's, averaged, for an ensemble): what the
    ONNX graph must reproduce (probability, attention, and for DSIN the session weights)."""
    if isinstance(model, Ensemble):
        reference: nn.Module = EnsembleServing([NaiveServing(m) for m in model.members])  # type: ignore[arg-type]
    else:
        reference = NaiveServing(model)
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return tuple(x.numpy() for x in out)


def check_parity(
    model: CTRModel | Ensemble, session: ort.InferenceSession, spec: GraphSpec, max_len: int, seed: int = 0
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    worst_p = worst_a = worst_s = 0.0
    cases: list[tuple[list[int], list[int], list[str] | None]] = [
        (lengths, counts, None) for lengths, counts in parity_cases(rng, max_len)
    ]
    if spec.sessions is not None:
        cases += [(lengths, counts, styles) for lengths, counts, styles in session_parity_cases(spec.sessions)]
    for lengths, counts, styles in cases:
        feed = random_inputs(rng, spec, lengths, counts, styles=styles)
        outputs = session.run(list(spec.output_names), feed)
        prob, att = outputs[0], outputs[1]
        reference = torch_reference(model, feed)
        if not all(np.isfinite(x).all() for x in outputs):
            raise ExportError(f"ONNX Runtime returned non-finite values for history lengths {lengths}")
        worst_p = max(worst_p, float(np.abs(prob - reference[0]).max()))
        worst_a = max(worst_a, float(np.abs(att - reference[1]).max()))
        if spec.sessions is not None:  # the session weights are attention too
            worst_s = max(worst_s, float(np.abs(outputs[2] - reference[2]).max()))
        padded = ~feed["hist_mask"][feed["cand_user"]]
        if (att[padded] != 0).any():
            raise ExportError("attention is not exactly zero on padded history positions")
    return {
        "max_abs_diff_probability": worst_p,
        "max_abs_diff_attention": max(worst_a, worst_s),
        **({"max_abs_diff_session_weights": worst_s} if spec.sessions is not None else {}),
        "cases": len(cases),
        "tolerance": PARITY_TOLERANCE,
        "candidates": int(sum(sum(c) for _, c, _ in cases)),
    }


def export_graph(module: nn.Module, path: Path, spec: GraphSpec, width: int = 8) -> None:
    """Users, candidates and the history length are dynamic axes."""
    example = random_inputs(np.random.default_rng(0), spec, [width, max(1, width // 2)], [3, 2], width)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    with warnings.catch_warnings():
        # the TorchScript-based exporter keeps DIEN's recurrence as an ONNX Loop (dynamic history
        # length); it announces its own deprecation, which is not actionable here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
            dynamo=False,
        )


def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_session(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int = 50) -> list[float]:
    """Seconds per call, after a few warm-up calls."""
    for _ in range(3):
        session.run(None, feed)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        out.append(time.perf_counter() - t0)
    return out


def _test_auc(session: ort.InferenceSession, ckpt: dict[str, Any]) -> float:
    """Test AUC of a graph on the run's own test split (each sample as its own user)."""
    from training.config import TrainConfig
    from training.metrics import auc
    from training.train import load_data

    cfg = TrainConfig.from_dict(ckpt["train_config"])
    test = load_data(cfg).test
    max_len = cfg.max_len
    probs = []
    for start in range(0, len(test), 4096):
        rows = np.arange(start, min(start + 4096, len(test)))
        items, cats, mask = test.history(rows, max_len)
        feed = {
            "hist_items": items,
            "hist_cats": cats,
            "hist_mask": mask,
            # the split keeps compact dtypes; the graph's index inputs are int64
            "user_feats": test.user_feats[rows].astype(np.int64),
            "cand_items": test.cand_item[rows].astype(np.int64),
            "cand_cats": test.cand_cat[rows].astype(np.int64),
            "cand_user": np.arange(rows.size, dtype=np.int64),
        }
        graph_inputs = {i.name for i in session.get_inputs()}
        if FEEDBACK_INPUT in graph_inputs:
            feed[FEEDBACK_INPUT] = test.history_feedback(rows, max_len)
        if SESSION_INPUTS[0] in graph_inputs:  # DSIN: the division training made
            spec = ModelConfig.from_dict(ckpt["model_config"]).session_spec
            feed["sess_index"], feed["sess_mask"] = test.sessions(rows, max_len, spec)
        probs.append(session.run(["probability"], feed)[0])
    return auc(test.label, np.concatenate(probs))


def quantize_int8(fp32: Path, out: Path, ckpt: dict[str, Any], spec: GraphSpec, max_len: int) -> dict[str, Any]:
    """ONNX Runtime dynamic int8 quantisation, with its effect on test AUC and on speed measured."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    s32, s8 = cpu_session(fp32), cpu_session(out)
    feed = random_inputs(np.random.default_rng(1), spec, [max_len], [200])
    t32, t8 = np.median(time_session(s32, feed)), np.median(time_session(s8, feed))
    auc32, auc8 = _test_auc(s32, ckpt), _test_auc(s8, ckpt)
    p32, a32 = s32.run(None, feed)
    p8, a8 = s8.run(None, feed)
    return {
        "type": "int8-dynamic",
        "test_auc_fp32": auc32,
        "test_auc_int8": auc8,
        "test_auc_change": auc8 - auc32,
        "speedup": float(t32 / t8),
        "latency_ms_fp32": float(1e3 * t32),
        "latency_ms_int8": float(1e3 * t8),
        "benchmark": {"candidates": 200, "history": max_len, "users": 1},
        "max_abs_diff_probability_vs_fp32": float(np.abs(p8 - p32).max()),
        "max_abs_diff_attention_vs_fp32": float(np.abs(a8 - a32).max()),
    }


def write_selfcheck(model: Path, out: Path, spec: GraphSpec, max_len: int) -> dict[str, Any]:
    """Fixed inputs and the published graph's own answers to them, for the loading service to re-run.

    A version that parses but computes something else on the serving machine (a damaged weight file, an
    ONNX Runtime build that disagrees) is refused there instead of being swapped in."""
    feed = random_inputs(np.random.default_rng(7), spec, [0, max_len, max(1, max_len // 2)], [1, 50, 7])
    prob, att = cpu_session(model).run(list(OUTPUT_NAMES), feed)
    arrays: dict[str, Any] = {f"input_{k}": v for k, v in feed.items()}
    np.savez(out, probability=prob, attention=att, **arrays)
    return {"file": out.name, "candidates": int(prob.size), "tolerance": SELFCHECK_TOLERANCE}


def next_version(model_dir: Path) -> int:
    versions = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.exists() else []
    )
    return max(versions, default=0) + 1


def publish(staging: Path, model_dir: Path, metadata: dict[str, Any], version: int | None) -> int:
    """Rename a complete staging folder to model_dir/VERSION (with no version, the next free one).

    metadata.json is written with the version number before the rename, which is the only step a
    reader can observe; a racing exporter that takes the number first makes this one try the next."""
    for _ in range(100):
        v = version if version is not None else next_version(model_dir)
        metadata["version"] = v
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        target = model_dir / str(v)
        if target.exists() and version is not None:
            raise ExportError(f"{target} already exists: versions are immutable, pick another --version")
        try:
            os.rename(staging, target)  # atomic on one filesystem; refuses an existing non-empty target
            return v
        except OSError as e:
            if version is not None:
                raise ExportError(f"could not publish {target}: {e}") from e
    raise ExportError(f"could not find a free version under {model_dir}")


def export_run(
    run_dir: Path,
    repository: Path,
    name: str | None = None,
    version: int | None = None,
    quantize: str | None = None,
    parity_seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Export, check parity, and publish one version; returns its folder and metadata."""
    if not (Path(run_dir) / CHECKPOINT_NAME).is_file():
        raise ExportError(f"{run_dir}: no {CHECKPOINT_NAME}; train first (python -m training.train --out {run_dir})")
    model, ckpt = load_model(run_dir)  # a model, or an ensemble (training.train --ensemble N) exported as one
    name = name or ckpt["model"]
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ExportError(f"model name {name!r}: use letters, digits, '-' and '_'")
    vocab = ckpt["vocab"]
    spec = GraphSpec(
        n_items=len(vocab["items"]) + FIRST_INDEX,
        n_categories=len(vocab["categories"]) + FIRST_INDEX,
        feature_cardinalities=tuple(len(v) + FIRST_INDEX for v in vocab["user_features"].values()),
        history_feedback=bool(ckpt["model_config"].get("history_feedback", False)),
        sessions=model.cfg.session_spec if ckpt["model"] == "dsin" else None,
    )
    max_len = int(ckpt["max_len"])
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{uuid.uuid4().hex[:8]}-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; a published version is read by the service
    try:
        export_graph(serving_form(model), staging / MODEL_FILE, spec)
        files = {"model": MODEL_FILE, "vocabulary": VOCAB_FILE}
        if ckpt["model"] == "din" and quantize is None:  # int8 products would run on the CPU under CUDA
            export_graph(serving_form(model, device="cuda"), staging / MODEL_CUDA_FILE, spec)
            files["model_cuda"] = MODEL_CUDA_FILE
        parity = check_parity(model, cpu_session(staging / MODEL_FILE), spec, max_len, parity_seed)
        log.info("parity: %s", parity)
        if max(parity["max_abs_diff_probability"], parity["max_abs_diff_attention"]) > PARITY_TOLERANCE:
            raise ExportError(f"ONNX Runtime and PyTorch disagree beyond {PARITY_TOLERANCE}: {parity}")
        if "model_cuda" in files:  # the same cases through the CUDA form (run on the CPU provider here)
            parity_cuda = check_parity(model, cpu_session(staging / MODEL_CUDA_FILE), spec, max_len, parity_seed)
            log.info("parity of %s: %s", MODEL_CUDA_FILE, parity_cuda)
            worst = max(parity_cuda["max_abs_diff_probability"], parity_cuda["max_abs_diff_attention"])
            if worst > PARITY_TOLERANCE:
                raise ExportError(f"{MODEL_CUDA_FILE}: ONNX Runtime and PyTorch disagree beyond {PARITY_TOLERANCE}")
            parity["cuda_graph_max_abs_diff"] = worst
        quant = None
        if quantize == "int8":
            fp32 = staging / "model.fp32.onnx"
            (staging / MODEL_FILE).rename(fp32)
            quant = quantize_int8(fp32, staging / MODEL_FILE, ckpt, spec, max_len)
            fp32.unlink()
            log.info("int8: %s", quant)
        elif quantize is not None:
            raise ExportError(f"unknown quantisation {quantize!r}; only int8 is supported")
        selfcheck = write_selfcheck(staging / MODEL_FILE, staging / SELFCHECK_FILE, spec, max_len)
        files["selfcheck"] = SELFCHECK_FILE
        cfg = ckpt["model_config"]
        metadata: dict[str, Any] = {
            "format": METADATA_FORMAT,
            "name": name,
            "version": None,  # filled once the version number is known
            "model_type": ckpt["model"],
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "metrics": ckpt["metrics"],
            "max_history": max_len,
            "history_order": "oldest first, right-padded; hist_mask marks real positions",
            "attention": (
                "sum_pooling"
                if ckpt["model"] == "base"
                else "softmax"
                if ckpt["model"] in ("dien", "dsin") or cfg["attention_softmax"]
                else "sigmoid"
            ),
            **io_signature(spec),
            # the contract with the service (contract.py), which reads it from here
            "history_feedback": {"input": FEEDBACK_INPUT if spec.history_feedback else None, "values": FEEDBACK_VALUES},
            "vocabulary": {
                "file": VOCAB_FILE,
                **VOCABULARY_INDICES,
                "n_items": spec.n_items,
                "n_categories": spec.n_categories,
                "user_features": list(vocab["user_features"]),
                "user_feature_cardinalities": list(spec.feature_cardinalities),
            },
            "parity": parity,
            # DSIN: the service divides each history as training did (sessions.session_layout with these)
            "sessions": (
                None
                if spec.sessions is None
                else {
                    "inputs": list(SESSION_INPUTS),
                    "output": SESSION_OUTPUT,
                    **spec.sessions.to_metadata(),
                    "attention": "session weight (softmax over sessions) × the behaviour's self-attention share",
                }
            ),
            "selfcheck": selfcheck,
            "quantization": quant,
            "files": files,
            "runtime": {"opset": OPSET, "torch": torch.__version__, "onnxruntime": ort.__version__},
            "model_config": cfg,
            "training": ckpt["train_config"],
            # an averaged ensemble: its members' count (one graph, the same interface as one model)
            "ensemble": {"members": len(model.members)} if isinstance(model, Ensemble) else None,
        }
        # sidecar: index = position + first_index in each list; item → category by raw ids
        (staging / VOCAB_FILE).write_text(json.dumps(vocab))
        published = publish(staging, model_dir, metadata, version)
        return model_dir / str(published), metadata
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run directory (holding checkpoint.pt)")
    p.add_argument("--repository", required=True, help="model repository root")
    p.add_argument("--name", default=None, help="model name (default: the model type, e.g. din)")
    p.add_argument("--version", type=int, default=None, help="integer version (default: the next free one)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="ONNX Runtime dynamic quantisation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder, meta = export_run(Path(args.run), Path(args.repository), args.name, args.version, args.quantize)
    except ExportError as e:
        raise SystemExit(f"export refused: {e}") from e
    par = meta["parity"]
    print(
        f"published {folder}  parity over {par['cases']} cases ({par['candidates']} candidates): "
        f"max |Δp| {par['max_abs_diff_probability']:.2e}, max |Δattention| {par['max_abs_diff_attention']:.2e}"
    )
    if meta["quantization"]:
        q = meta["quantization"]
        print(f"int8: test AUC {q['test_auc_fp32']:.4f} → {q['test_auc_int8']:.4f}, speed-up ×{q['speedup']:.2f}")


if __name__ == "__main__":
    main()
