"""`rnnlm bench` end to end on a tiny bundle: every section is written. Timings are not checked.

One quick run with a checkpoint and an int8 bundle, so every measurement family runs: bare
onnxruntime, the gRPC echo, PyTorch eager, the server in a child process (batching on and off)
and int8. The figures of a tiny model on a shared machine mean nothing; what is checked is that
each one is there, that the targets are computed, and that every scorer scored the same text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime
import pytest

from benchmarks.workload import Plan
from exporter.export import export_bundle
from rnnlm.cli import main

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "server_cpu_per_token",
    "engine_vs_bare_64",
    "engine_vs_bare_256",
    "predict_next_latency",
    "predict_under_load",
    "first_token_under_load",
    "generate_vs_no_batching",
    "score_vs_bare",
    "score_vs_torch",
    "cached_context",
    "int8_speedup",
    "int8_perplexity",
    "server_rss",
}
DIAGNOSTICS = {
    "generate_vs_bare",
    "engine_cpu_per_token",
    "engine_python_flat",
    "step_after_idle",
    "score_with_cache",
    "server_vs_engine",
    "prefill_vs_step",
    "transport_vs_bare",
    "transport_vs_server",
}
HEADINGS = (
    "## Machine",
    "## Targets",
    "## Diagnostics",
    "## Bare onnxruntime",
    "## The engine in-process",
    "## gRPC echo",
    "## PyTorch eager",
    "## The server",
    "### PredictNext at concurrency 1",
    "### PredictNext extending a cached context",
    "### PredictNext on a fresh 1000-token context",
    "### Under load: 64 long Generate streams running",
    "### Score",
    "### Generate",
    "### Resident memory",
    "## fp32 against int8",
)
LATENCY = ("p50_ms", "p90_ms", "p99_ms")


@pytest.fixture(scope="module")
def bench_run(
    default_bundle: Path,
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    checkpoint = tiny_checkpoint_factory("lstm", "word")
    tmp = tmp_path_factory.mktemp("bench")
    # The tiny model's int8 perplexity may move more than the default 1%; the figure is read
    # back from the manifest, so any recorded value will do here.
    int8 = export_bundle(
        checkpoint, tmp / "tiny-int8", quantize="int8", max_perplexity_change=100.0
    )
    # A continuous cache in the manifest (which no hash covers), so cached Score is measured.
    bundle = tmp / "tiny-lstm-word"
    shutil.copytree(default_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["continuous_cache"] = {"window": 50, "theta": 0.5, "lambda": 0.1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp / "results"
    code = main(
        [
            "bench",
            "--bundle",
            str(bundle),
            "--checkpoint",
            str(checkpoint),
            "--int8-bundle",
            str(int8),
            "--quick",
            "--trials",
            "1",
            "--duration",
            "1.0",
            # Every side then runs two batching threads: the engine's, and the report says so.
            "--server-arg=--batch-threads=2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_json_has_every_measurement(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, r = bench_run
    assert r["machine"]["cpu"] and r["machine"]["onnxruntime"] and r["machine"]["grpcio"]
    assert r["run"]["command"].startswith("rnnlm bench --bundle ")
    for key in ("step_b1", "step_b64", "step_b256"):
        assert all(r["bare"][key][f] > 0 for f in (*LATENCY, "tokens_per_s", "cpu_us_per_token"))
    for key in ("step_b1", "step_b64"):
        assert r["int8"][key]["p50_ms"] > 0 and r["int8"]["fp32_" + key]["p50_ms"] > 0
        for mode in ("onednn_on", "onednn_off", "best"):
            assert r["torch"][mode][key]["p50_ms"] > 0
    assert all(r["bare"]["step_b1_after_idle"][f] > 0 for f in LATENCY)
    for graph in ("step", "prefill"):
        assert all(r["bare"]["prefill_chunk"][graph][f] > 0 for f in LATENCY)
    assert set(r["engine"]["generate"]) == {"1", "64", "256"}
    for figures in r["engine"]["generate"].values():
        assert figures["tokens_per_s"] > 0 and figures["cpu_us_per_token"] > 0
        assert figures["bare_tokens_per_s"] > 0 and figures["bare_cpu_us_per_token"] > 0
        assert figures["rows_per_step"] >= 1 and figures["step_model_us"] > 0
        assert figures["step_cpu_us"] >= figures["step_model_us"]
    assert all(r["echo"][f] > 0 for f in LATENCY)
    stream = r["echo_stream"]
    assert stream["streams"] == 64 and stream["message_us"] > 0 and stream["call_us"] > 0
    assert stream["cpu_us_per_call"]["64"] > stream["cpu_us_per_call"]["1"]
    on, off = r["server"]["batching_on"], r["server"]["batching_off"]
    assert all(on["predict_c1"][f] > 0 for f in LATENCY)
    assert set(on["predict_context"]) == {"10", "100", "1000"}
    for length, figures in on["predict_context"].items():
        assert figures["context_tokens_min"] > int(length)
    assert on["predict_fresh"]["context_tokens"] == 1000
    assert all(on["predict_fresh"][f] > 0 for f in LATENCY)
    assert on["under_load"]["streams"] == 64
    for call in ("predict", "first_token"):
        assert all(on["under_load"][call][f] > 0 for f in LATENCY)
    assert on["generate"]["64"]["server_cpu_us_per_token"] > 0
    assert on["generate"]["64"]["messages_per_call"] >= 2  # the first token's and the last
    transport = {d["key"]: d for d in r["diagnostics"]}["transport_vs_server"]
    assert 0 < transport["value"] < 1  # gRPC alone costs less than the whole server
    for server in (on, off):
        assert set(server["generate"]) == {"1", "8", "64", "256"}
        assert all(g["tokens_per_s"] > 0 for g in server["generate"].values())
        assert server["rss_mb_after_load"] > 0 and server["rss_mb_after_load_test"] > 0
    assert isinstance(r["int8"]["perplexity_change_percent"], float)
    assert {t["key"] for t in r["targets"]} == TARGETS
    assert all(t["status"] in ("PASS", "FAIL") for t in r["targets"])
    assert {d["key"] for d in r["diagnostics"]} == DIAGNOSTICS
    assert all(d["value"] > 0 for d in r["diagnostics"])


@pytest.mark.slow
def test_every_scorer_scored_the_same_document(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, r = bench_run
    bare = r["bare"]["score"]
    scorers = [
        r["server"]["batching_on"]["score"],
        r["server"]["batching_on"]["score_cached"],
        r["torch"]["onednn_on"]["score"],
        r["torch"]["onednn_off"]["score"],
    ]
    for scored in scorers:
        assert scored["tokens"] == bare["tokens"] == 2000
    for scored in (scorers[0], *scorers[2:]):
        assert scored["log_prob"] == pytest.approx(bare["log_prob"], rel=1e-4)


@pytest.mark.slow
def test_markdown_and_plots(bench_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = bench_run
    md = (out / "results.md").read_text()
    for heading in HEADINGS:
        assert heading in md, heading
    assert r["run"]["command"] in md
    assert md.count("| PASS |") + md.count("| FAIL |") == len(TARGETS)
    assert r["run"]["plan"]["engine"]["batch_threads"] == 2
    assert "The servers ran 2 batching threads" in md
    for png in ("generate_throughput.png", "predict_next_context.png", "cpu_per_token.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def test_harness_does_not_import_torch_without_a_checkpoint() -> None:
    modules = (
        "benchmarks.cli",
        "benchmarks.bare",
        "benchmarks.echo",
        "benchmarks.engine_inproc",
        "benchmarks.server_load",
        "benchmarks.report",
        "benchmarks.plots",
        "benchmarks.targets",
    )
    code = f"import sys, {', '.join(modules)}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_bad_bundle_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--bundle", str(tmp_path / "missing"), "--quick", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and "missing" in err


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="a GPU is present"
)
def test_provider_cuda_without_a_gpu_is_refused_before_measuring(
    default_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--bundle", str(default_bundle), "--provider", "cuda", "--quick"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnlm bench: --provider cuda: ") and "CUDAExecutionProvider" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs onnxruntime-gpu and a GPU",
)
def test_provider_cuda_refuses_a_pytorch_checkpoint(
    default_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--bundle", str(default_bundle), "--provider", "cuda", "--quick"]
    assert main([*args, "--checkpoint", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_the_in_process_sides_copy_the_servers_engine_settings() -> None:
    plan = Plan.make(server_args=("--batch-threads=2", "--intra-op-threads", "2"))
    assert (plan.engine.batch_threads, plan.engine.intra_op_threads) == (2, 2)
    assert plan.engine.max_step_ms == Plan.make().engine.max_step_ms == 20.0


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--bogus", "not a flag of rnnlm serve: --bogus"),
        ("--batch-threads=0", "--batch-threads (RNNLM_BATCH_THREADS): must be at least 1"),
        ("--max-batch-size=many", "--max-batch-size: invalid int value"),
    ],
)
def test_a_bad_server_arg_is_refused_before_measuring(
    default_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    message: str,
) -> None:
    args = ["bench", "--bundle", str(default_bundle), "--quick", f"--server-arg={flag}"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnlm bench: --server-arg: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_cpu_time_counts_the_children_a_process_has_reaped() -> None:
    """The server's CPU time includes what its ended children (an engine core) spent: a reading
    taken after a child ends must not lose it, nor fail because it ended mid-read."""
    from benchmarks.process import _cpu_ticks

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time\n"
         f"subprocess.run([sys.executable, '-c', {burn!r}])\nprint(flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "\n"  # child reaped
        assert _cpu_ticks(parent.pid) / os.sysconf("SC_CLK_TCK") >= 0.25
    finally:
        parent.kill()
        parent.wait()
