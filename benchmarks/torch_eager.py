"""PyTorch eager on the checkpoint the bundle came from: serving without onnxruntime.

Imported only when `--checkpoint` is given, so a plain `rnnlm bench` never imports torch. It
runs on one thread (`torch.set_num_threads(1)`), like the engine's one intra-op thread, and is
measured twice, with oneDNN (`torch.backends.mkldnn`) on and off: on this kind of CPU oneDNN's
single-step LSTM is several times slower (see FIELD-NOTES.md), so the targets use the better.
Before measuring, the checkpoint is checked to be the bundle's model: same architecture, and for
an fp32 bundle the same logits as onnxruntime after eos.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bare
from benchmarks.timing import BenchError, latency, over_trials, time_calls
from benchmarks.workload import Plan, Workload
from server.bundle import Bundle
from training.checkpoint import CheckpointError, load_checkpoint
from training.model import RNNLM

MODES = (("onednn_on", True), ("onednn_off", False))
ARCHITECTURE = ("cell", "layers", "hidden", "embedding", "vocab_size")
# fp32 logits of the same weights agree to about 1e-6 (the exporter's parity check).
PARITY_ATOL = 1e-3
WARMUP_CALLS = 5


def run(checkpoint_dir: Path, bundle: Bundle, workload: Workload, plan: Plan) -> dict[str, Any]:
    """Steps at batch 1 and 64 and scoring the document, oneDNN on and off, and the better."""
    torch.set_num_threads(1)
    try:
        ckpt = load_checkpoint(checkpoint_dir)
    except CheckpointError as e:
        raise BenchError(f"--checkpoint: {e}") from e
    model = ckpt.model.eval()
    parity = _check_same_model(model, checkpoint_dir, bundle, plan)
    out: dict[str, Any] = {}
    previous = torch.backends.mkldnn.enabled
    try:
        for name, enabled in MODES:
            # Set directly: the `flags` context manager warns about TF32 on every use.
            torch.backends.mkldnn.enabled = enabled  # type: ignore[assignment]
            with torch.inference_mode():
                out[name] = _measure(model, bundle, workload, plan)
    finally:
        torch.backends.mkldnn.enabled = previous
    out["best"] = _best(out)
    out["threads"] = torch.get_num_threads()
    out["max_abs_logit_diff_vs_onnxruntime"] = parity
    return out


def _measure(model: RNNLM, bundle: Bundle, workload: Workload, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, batch, calls in (
        ("step_b1", 1, plan.step_calls),
        (f"step_b{plan.large_batch}", plan.large_batch, plan.large_step_calls),
    ):
        out[key] = over_trials(
            [
                _step_trial(model, workload.ids, batch, calls, plan.budget_s)
                for _ in range(plan.trials)
            ]
        )
    ids = workload.score_ids(plan.score_tokens)
    budget = plan.score_budget_s
    _score_trial(model, bundle, ids[: plan.score_chunk * 2], plan.score_chunk, budget)
    out["score"] = over_trials(
        [_score_trial(model, bundle, ids, plan.score_chunk, budget) for _ in range(plan.trials)]
    )
    out["score"]["chunk"] = plan.score_chunk
    return out


def _step_trial(
    model: RNNLM, tokens: np.ndarray, batch: int, calls: int, seconds: float
) -> dict[str, float]:
    columns = [torch.from_numpy(c) for c in bare.step_columns(tokens, batch, calls + WARMUP_CALLS)]
    state = model.initial_state(batch)

    def call(i: int) -> None:
        nonlocal state
        _, state = model(columns[i], state)

    for i in range(WARMUP_CALLS):
        call(calls + i)
    return latency(time_calls(call, calls, seconds), tokens_per_call=batch)


def _score_trial(
    model: RNNLM, bundle: Bundle, ids: np.ndarray, chunk: int, seconds: float
) -> dict[str, float]:
    """As `bare.score_trial`: chunks with the state carried, stopping after `seconds`."""
    tokens = torch.from_numpy(np.concatenate([[bundle.eos_id], ids[:-1]]).astype(np.int64))[None]
    targets = torch.from_numpy(ids.astype(np.int64))[None]
    state = model.initial_state(1)
    total, n = 0.0, 0
    start = time.perf_counter()
    for i in range(0, tokens.shape[1], chunk):
        logits, state = model(tokens[:, i : i + chunk], state)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, i : i + chunk, None])
        total += float(picked.double().sum())
        n += picked.shape[1]
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": float(n), "tokens_per_s": n / elapsed, "log_prob": total}


def _best(results: dict[str, Any]) -> dict[str, Any]:
    """Per measurement, the better mode: lower p50 for steps, more tokens/s for scoring."""
    best: dict[str, Any] = {}
    for key in results[MODES[0][0]]:
        runs = {name: results[name][key] for name, _ in MODES}
        if key == "score":
            name = max(runs, key=lambda n: runs[n]["tokens_per_s"])
        else:
            name = min(runs, key=lambda n: runs[n]["p50_ms"])
        best[key] = {**runs[name], "mode": name}
    return best


def _check_same_model(model: RNNLM, checkpoint_dir: Path, bundle: Bundle, plan: Plan) -> float:
    """BenchError unless the checkpoint is the bundle's model; the max |logit| difference."""
    arch = bundle.manifest.get("architecture", {})
    config = model.config.to_dict()
    differ = [
        f"{k} {config.get(k)!r} vs {arch.get(k)!r}"
        for k in ARCHITECTURE
        if config.get(k) != arch.get(k)
    ]
    if differ:
        raise BenchError(
            f"--checkpoint {checkpoint_dir}: not the model of --bundle {bundle.path} "
            f"({'; '.join(differ)})"
        )
    eos = np.array([[bundle.eos_id]], dtype=np.int64)
    feeds = dict(zip([s.input for s in bundle.state], bundle.zero_state(1), strict=True))
    feeds["tokens"] = eos
    ort_logits = bare.session(bundle, "step", plan).run(["logits"], feeds)[0]
    with torch.inference_mode():
        torch_logits, _ = model(torch.from_numpy(eos), model.initial_state(1))
    diff = float(np.abs(torch_logits.numpy() - ort_logits).max())
    if bundle.precision == "fp32" and not diff <= PARITY_ATOL:
        raise BenchError(
            f"--checkpoint {checkpoint_dir}: its weights are not those of --bundle {bundle.path} "
            f"(logits after eos differ by up to {diff:.3g}, more than {PARITY_ATOL}); give the "
            "checkpoint the bundle was exported from"
        )
    return diff
