"""results.json and results.md: every figure of a run, the targets, the machine and the command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort

from benchmarks.process import ROOT
from benchmarks.targets import Target

PACKAGES = ("grpcio", "numpy", "protobuf", "tokenizers", "torch")


def machine() -> dict[str, Any]:
    """The CPU, cores, load, OS, package versions and source revision of this run."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    # The module in use, whichever distribution holds it (onnxruntime or onnxruntime-gpu).
    info["onnxruntime"] = ort.__version__
    info["onnxruntime_providers"] = ", ".join(ort.get_available_providers())
    for package in PACKAGES:
        try:
            # Read from the installed metadata: asking torch its version would import it.
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how busy the machine was around the run."""
    if not hasattr(os, "getloadavg"):
        return None
    return [round(v, 2) for v in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def write_json(results: dict[str, Any], targets: list[Target], path: Path) -> None:
    data = {**results, "targets": [t.to_dict() for t in targets]}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- markdown ------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    """A figure with `digits` significant digits; "—" when not measured."""
    if value is None:
        return "—"
    if isinstance(value, float | int):
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _latency_row(name: str, m: dict[str, Any] | None) -> list[Any]:
    m = m or {}
    return [
        name,
        m.get("p50_ms"),
        m.get("p90_ms"),
        m.get("p99_ms"),
        m.get("tokens_per_s"),
        m.get("cpu_us_per_token"),
    ]


LATENCY_HEADER = ["measurement", "p50 ms", "p90 ms", "p99 ms", "tokens/s at p50", "CPU us/token"]
# Which part of a run measures each target (all of them come from the run's one command).
MEASURED_BY = {
    "server_cpu_per_token": "bare steps (CPU time), server Generate@64 (/proc CPU time)",
    "engine_vs_bare_64": "the engine in-process, trials alternating with bare steps",
    "engine_vs_bare_256": "the engine in-process, trials alternating with bare steps",
    "predict_next_latency": "bare steps after idle, gRPC echo, server PredictNext",
    "predict_under_load": "server under load (64 long Generates)",
    "first_token_under_load": "server under load (64 long Generates)",
    "generate_vs_no_batching": "server Generate@64, batching on and off",
}


QUICK_NOTE = (
    "A quick run (--quick): small counts and short trials, rough figures for a smoke test, "
    "not results to compare or publish"
)


def markdown(results: dict[str, Any], targets: list[Target]) -> str:
    run, m = results["run"], results["machine"]
    large = f"b{run['plan']['large_batch']}"
    lines = [
        "# rnnlm benchmark results" + (" (quick run)" if run.get("quick") else ""),
        "",
        *([f"**{QUICK_NOTE}**", ""] if run.get("quick") else []),
        f"Command: `{run['command']}`",
        "",
        f"Bundle: `{run['bundle']['path']}`: {run['bundle']['summary']}. Document: "
        f"{run['workload']['source']}. Each figure is the median over {run['plan']['trials']} "
        "trials (every trial is in results.json).",
        "",
        "## Machine",
        "",
    ]
    lines += _table(["", ""], [[k.replace("_", " "), v] for k, v in m.items()])
    lines += _targets_section(results, targets)
    bare = results.get("bare") or {}
    lines += _bare_section(bare)
    lines += _echo_section(results.get("echo") or {}, results.get("echo_stream") or {})
    lines += _engine_section((results.get("engine") or {}).get("generate") or {})
    lines += _torch_section(results.get("torch"), large)
    lines += _server_section(results.get("server") or {}, bare, large)
    lines += _int8_section(results.get("int8"), large)
    return "\n".join(lines)


def _targets_section(results: dict[str, Any], targets: list[Target]) -> list[str]:
    run = results["run"]
    lines = ["## Targets", ""]
    lines += [f"Every target is reproduced by the command above (`{run['command']}`).", ""]
    lines += _table(
        ["target", "measured", "threshold", "status", "how", "measured by"],
        [
            [t.rule, t.value, f"{t.op} {t.threshold:g}", t.status, t.detail, MEASURED_BY.get(t.key)]
            for t in targets
        ],
    )
    threads = run["plan"]["engine"]["batch_threads"]
    if threads > 1:
        lines += [
            f"The servers ran {threads} batching threads, whose onnxruntime runs go on at once; "
            "bare onnxruntime's steps run one at a time, so the Generate ratios against them "
            "count the server's extra cores too.",
            "",
        ]
    lines += ["## Diagnostics", ""]
    lines += [
        "Ratios with no threshold that split the PredictNext and Generate figures into their "
        "causes (docs/performance.md reads them).",
        "",
    ]
    lines += _table(
        ["ratio", "measured", "how"],
        [[d["what"], d["value"], d["detail"]] for d in results.get("diagnostics") or []],
    )
    return lines


def _bare_section(bare: dict[str, Any]) -> list[str]:
    lines = ["## Bare onnxruntime, in-process", ""]
    lines += [f"Session options as the server's engine: {_settings(bare.get('session'))}.", ""]
    rows = [
        _latency_row("step, batch 1", bare.get("step_b1")),
        _latency_row("step, batch 1, each after 1 ms idle", bare.get("step_b1_after_idle")),
    ]
    rows += [
        _latency_row(f"step, batch {key[6:]}", value)
        for key, value in bare.items()
        if key.startswith("step_b") and key[6:].isdigit() and key != "step_b1"
    ]
    chunk = bare.get("prefill_chunk")
    if chunk:
        what = f"{chunk['chunk']}-token prompt chunk, batch 1"
        rows.append(_latency_row(f"{what}, step graph (logits too)", chunk["step"]))
        rows.append(_latency_row(f"{what}, prefill graph", chunk["prefill"]))
    lines += _table(LATENCY_HEADER, rows)
    return lines + _score_table({"bare onnxruntime": bare.get("score")})


def _echo_section(echo: dict[str, Any], stream: dict[str, Any]) -> list[str]:
    lines = ["## gRPC echo round trip on loopback (the transport floor)", ""]
    lines += _table(
        ["measurement", "p50 ms", "p90 ms", "p99 ms"],
        [
            [
                f"unary echo, {echo.get('payload_bytes')} B each way",
                echo.get("p50_ms"),
                echo.get("p90_ms"),
                echo.get("p99_ms"),
            ]
        ],
    )
    if not stream:
        return lines
    lines += [
        f"A server-streaming echo under {stream.get('streams')} streams (calls of one "
        f"{stream.get('reply_bytes')}-byte message, then of 64, alternating), its server's CPU "
        "from /proc: what gRPC alone costs a Generate call and each of its messages (the "
        "diagnostics below turn it into CPU a generated token).",
        "",
    ]
    return lines + _table(
        ["server CPU (us)", "a call", "a message"],
        [["streaming echo", stream.get("call_us"), stream.get("message_us")]],
    )


def _engine_section(engine: dict[str, Any]) -> list[str]:
    lines = ["## The engine in-process (no gRPC)", ""]
    lines += [
        "`server.engine.Engine` configured as the servers' engine, driven like the server's "
        "Generate rows; CPU is this process's. Each trial follows a bare step trial at the same "
        "batch (the bare columns), so their ratio compares like machine conditions. A step's "
        "CPU is the batching thread's (`Engine.step_totals`): in the model (onnxruntime's runs "
        "and the sampler) and the engine's own, outside them.",
        "",
    ]
    return lines + _table(
        [
            "streams",
            "tokens/s",
            "CPU %",
            "CPU us/token",
            "bare tokens/s",
            "bare CPU us/token",
            "rows a step",
            "step: model us",
            "step: engine us",
        ],
        [
            [
                n,
                e.get("tokens_per_s"),
                e.get("cpu_percent"),
                e.get("cpu_us_per_token"),
                e.get("bare_tokens_per_s"),
                e.get("bare_cpu_us_per_token"),
                e.get("rows_per_step"),
                e.get("step_model_us"),
                e.get("step_engine_us"),
            ]
            for n, e in engine.items()
        ],
    )


def _settings(settings: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (settings or {}).items())


def _score_table(rows: dict[str, dict[str, Any] | None]) -> list[str]:
    return _table(
        ["scoring the document", "tokens", "seconds", "tokens/s", "log-prob"],
        [
            [
                name,
                (s or {}).get("tokens"),
                (s or {}).get("seconds"),
                (s or {}).get("tokens_per_s"),
                (s or {}).get("log_prob"),
            ]
            for name, s in rows.items()
        ],
    )


def _torch_section(torch: dict[str, Any] | None, large: str) -> list[str]:
    lines = ["## PyTorch eager, in-process", ""]
    if not torch:
        return [*lines, "Not measured: give `--checkpoint DIR` (the checkpoint of the bundle).", ""]
    lines += [
        f"One thread; the same weights (logits after eos within "
        f"{_f(torch.get('max_abs_logit_diff_vs_onnxruntime'))} of onnxruntime).",
        "",
    ]
    rows = []
    for key, label, field in (
        ("step_b1", "step, batch 1: p50 ms", "p50_ms"),
        (f"step_{large}", f"step, batch {large[1:]}: p50 ms", "p50_ms"),
        (f"step_{large}", f"step, batch {large[1:]}: tokens/s", "tokens_per_s"),
        ("score", "scoring the document: tokens/s", "tokens_per_s"),
    ):
        best = torch["best"][key]
        rows.append(
            [
                label,
                torch["onednn_on"][key][field],
                torch["onednn_off"][key][field],
                f"{_f(best[field])} ({best['mode'].replace('_', ' ')})",
            ]
        )
    return lines + _table(["measurement", "oneDNN on", "oneDNN off", "better"], rows)


def _server_section(server: dict[str, Any], bare: dict[str, Any], large: str) -> list[str]:
    on, off = server.get("batching_on") or {}, server.get("batching_off") or {}
    lines = ["## The server (`rnnlm serve` in a child process, grpc.aio client)", ""]
    for name, s in (("batching on", on), ("batching off", off)):
        if s:
            lines += [f"- {name}: `{s.get('command')}`"]
    model = on.get("model") or {}
    if model:
        lines += [
            f"- serving {model.get('name')} version {model.get('version')} "
            f"({model.get('precision')}) on {model.get('provider')}"
        ]
    lines += [""]
    lines += _predict_next_sections(on)
    lines += ["### Score", ""]
    scores = {"server Score": on.get("score")}
    if on.get("score_cached"):
        scores["server Score, continuous cache"] = on.get("score_cached")
    lines += _score_table({**scores, "bare onnxruntime": bare.get("score")})
    lines += _generate_section(on, off, bare, large)
    lines += ["### Resident memory of the server process (VmRSS, MiB)", ""]
    lines += _table(
        ["server", "after load", "after the load test"],
        [
            [name, s.get("rss_mb_after_load"), s.get("rss_mb_after_load_test")]
            for name, s in (("batching on", on), ("batching off", off))
            if s
        ],
    )
    return lines


def _predict_next_sections(on: dict[str, Any]) -> list[str]:
    c1 = on.get("predict_c1") or {}
    lines = ["### PredictNext at concurrency 1", ""]
    lines += [
        f"The typing pattern: sentences grown one token per call ({c1.get('context_tokens')} "
        f"tokens of context), each call extending the previous one; "
        f"{_f(c1.get('repeated_contexts'))} calls per trial repeated an earlier context.",
        "",
    ]
    lines += _table(LATENCY_HEADER[:4], [_latency_row("PredictNext, k=5", c1)[:4]])

    lines += ["### PredictNext extending a cached context by one token", ""]
    rows = []
    variants = {
        "": on.get("predict_context"),
        ", continuous cache": on.get("predict_context_cached"),
    }
    for label, contexts in variants.items():
        for length, s in (contexts or {}).items():
            seen = f"{_f(s.get('context_tokens_min'))}–{_f(s.get('context_tokens_max'))}"
            rows.append([length + label, s.get("p50_ms"), s.get("p90_ms"), s.get("p99_ms"), seen])
    lines += _table(["cached context tokens", "p50 ms", "p90 ms", "p99 ms", "tokens sent"], rows)

    fresh = on.get("predict_fresh")
    if fresh:
        lines += [f"### PredictNext on a fresh {fresh.get('context_tokens')}-token context", ""]
        lines += ["Nothing cached: the whole context is fed (prefill) before the next token.", ""]
        lines += _table(LATENCY_HEADER, [_latency_row("PredictNext, k=5", fresh)])

    under = on.get("under_load")
    if under:
        lines += [f"### Under load: {under.get('streams')} long Generate streams running", ""]
        lines += _table(
            LATENCY_HEADER[:4],
            [
                _latency_row("PredictNext, k=5", under.get("predict"))[:4],
                _latency_row("first token of one stream more", under.get("first_token"))[:4],
            ],
        )
    return lines


def _generate_section(
    on: dict[str, Any], off: dict[str, Any], bare: dict[str, Any], large: str
) -> list[str]:
    lines = ["### Generate: aggregate tokens/s", ""]
    b64 = (bare.get(f"step_{large}") or {}).get("tokens_per_s")
    b1 = (bare.get("step_b1") or {}).get("tokens_per_s")
    lines += [
        f"Bare onnxruntime steps for reference: batch 1 {_f(b1)} tokens/s, batch {large[1:]} "
        f"{_f(b64)} tokens/s.",
        "",
    ]
    rows = []
    for streams, s in (on.get("generate") or {}).items():
        o = (off.get("generate") or {}).get(streams) or {}
        ratio = s["tokens_per_s"] / o["tokens_per_s"] if o.get("tokens_per_s") else None
        rows.append(
            [
                streams,
                s.get("tokens_per_s"),
                o.get("tokens_per_s"),
                ratio,
                s.get("server_cpu_percent"),
                s.get("server_cpu_us_per_token"),
                s.get("client_cpu_percent"),
                o.get("server_cpu_percent"),
            ]
        )
    return lines + _table(
        [
            "streams",
            "batching on",
            "batching off",
            "on / off",
            "server CPU % (on)",
            "server CPU us/token (on)",
            "client CPU % (on)",
            "server CPU % (off)",
        ],
        rows,
    )


def _int8_section(int8: dict[str, Any] | None, large: str) -> list[str]:
    lines = ["## fp32 against int8", ""]
    if not int8:
        return [*lines, "Not measured: give `--int8-bundle DIR`.", ""]
    rows = []
    for key, label in (("step_b1", "step, batch 1"), (f"step_{large}", f"step, batch {large[1:]}")):
        fp = (int8.get("fp32_" + key) or {}).get("p50_ms")
        q = (int8.get(key) or {}).get("p50_ms")
        rows.append([f"{label}: p50 ms", fp, q, fp / q if fp and q else None])
    lines += _table(["measurement", "fp32", "int8", "speedup"], rows)
    lines += [
        "fp32 and int8 trials alternate here, so these fp32 figures can differ from the bare "
        "rows above, which were taken minutes earlier.",
        "",
    ]
    quality = int8.get("quality") or {}
    lines += [
        f"Recorded by the exporter on {_f((quality.get('text') or {}).get('tokens'))} held-out "
        f"tokens: perplexity {_f(quality.get('fp32_perplexity'), 6)} (fp32) -> "
        f"{_f(quality.get('int8_perplexity'), 6)} (int8), "
        f"{_f(quality.get('perplexity_change_percent'))} %; top-1 agreement "
        f"{_f(quality.get('top1_agreement'), 4)}.",
        "",
    ]
    return lines
