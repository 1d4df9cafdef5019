"""`rnnlm serve` as a real process (configured by RNNLM_* variables), and the client commands."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import onnxruntime
import pytest

from rnnlm.cli import main
from rnnlm.client import Client

ROOT = Path(__file__).resolve().parent.parent


class ServeProcess:
    """`python -m rnnlm serve ...` with its log lines collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnlm", "serve", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{''.join(self.log)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def served(default_bundle: Path) -> Iterator[tuple[ServeProcess, str]]:
    """A server configured only through its environment twins, on ports it picked itself."""
    env = {
        "RNNLM_MODELS": str(default_bundle),
        "RNNLM_HOST": "127.0.0.1",
        "RNNLM_PORT": "0",
        "RNNLM_METRICS_PORT": "0",
        "RNNLM_GRACE_SECONDS": "2",
        "RNNLM_LOG_LEVEL": "info",
    }
    server = ServeProcess([], env)
    port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
    server.wait_for_line(r"serving tiny-lstm-word:1 ")
    yield server, f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def target(served: tuple[ServeProcess, str]) -> str:
    return served[1]


def rnnlm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_process_logs_its_provider(served: tuple[ServeProcess, str]) -> None:
    server, _ = served
    assert any("provider CPUExecutionProvider" in line for line in server.log)
    assert any(
        re.search(r"sampling with the native sampler \((x86-64-v[34]|baseline) build\)", line)
        for line in server.log
    )
    assert any(re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", x) for x in server.log)


def test_models(capsys: pytest.CaptureFixture[str], target: str) -> None:
    code, out, _ = rnnlm(capsys, "models", "--target", target)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["name", "version", "cell"]
    assert row.split() == [
        "tiny-lstm-word", "1", "lstm", "2", "16", row.split()[5], "word",
        "CPUExecutionProvider", "-", "default",
    ]  # fmt: skip
    assert header.split()[-1] == "cache"  # a model without a continuous cache shows "-"
    code, out, _ = rnnlm(capsys, "models", "--target", target, "--json")
    assert json.loads(out)["provider"] == "CPUExecutionProvider"


def test_generate_prints_the_text_and_a_summary(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    argv = ("generate", "the cat", "--max-tokens", "6", "--seed", "4", "--target", target)
    code, out, err = rnnlm(capsys, *argv)
    assert code == 0
    with Client(target) as client:
        expected = client.generate_text("the cat", max_tokens=6, seed=4)
    assert out == (expected if expected.endswith("\n") else expected + "\n")
    assert "[length: 2 prompt tokens, 6 generated]" in err


def test_generate_json_is_one_object_per_response(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    code, out, _ = rnnlm(
        capsys, "generate", "the", "--max-tokens", "3", "--temperature", "0", "--json",
        "--target", target,
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 4
    assert all(len(line["token_ids"]) == 1 for line in lines[:3])
    assert lines[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert lines[-1]["completion_tokens"] == 3


def test_predict(capsys: pytest.CaptureFixture[str], target: str) -> None:
    code, out, _ = rnnlm(capsys, "predict", "the old man calls the", "-k", "3", "--target", target)
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 3
    probabilities = [float(p) for p, _ in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    code, out, _ = rnnlm(
        capsys, "predict", "the", "--partial-word", "s", "-k", "20", "--target", target
    )
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows and all(word.startswith("s") for _, word in rows)
    assert sum(float(p) for p, _ in rows) == pytest.approx(1.0, abs=1e-3)


def test_predict_with_the_word_cache(capsys: pytest.CaptureFixture[str], target: str) -> None:
    context = "the old man calls the moon . the old man calls the"
    code, out, _ = rnnlm(capsys, "predict", context, "-k", "5", "--word-cache", "--target", target)
    assert code == 0
    shown = [(word, float(p)) for p, word in (line.split() for line in out.strip().splitlines())]
    with Client(target) as client:
        mixed = client.predict_next(context, k=5, word_cache=True).predictions
        plain = client.predict_next(context, k=5).predictions
    assert [w for w, _ in shown] == [p.token for p in mixed]
    assert [p for _, p in shown] == pytest.approx([p.probability for p in mixed], abs=1e-3)
    assert [p.probability for p in mixed] != [p.probability for p in plain]


def test_score(capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("the cat sees the moon .\na dog likes a red house .\n")
    code, out, _ = rnnlm(
        capsys, "score", "the cat sees the moon .", "--file", str(document), "--json",
        "--target", target,
    )  # fmt: skip
    assert code == 0
    results = json.loads(out)["results"]
    with Client(target) as client:
        expected = client.score(["the cat sees the moon .", document.read_text()]).results
    assert [r["num_tokens"] for r in results] == [e.num_tokens for e in expected]
    assert [r["perplexity"] for r in results] == pytest.approx([e.perplexity for e in expected])
    code, out, _ = rnnlm(capsys, "score", "a dog", "--token-logprobs", "--target", target)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["perplexity", "log_prob", "tokens", "text"]
    assert lines[1].split()[2:] == ["2", "a", "dog"]
    assert [line.split()[-1] for line in lines[2:]] == ["a", "dog"]


def test_embed(capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a dog likes a red house .\n")
    code, out, _ = rnnlm(
        capsys, "embed", "the cat sees the moon .", "--file", str(document), "--pooling", "max",
        "--json", "--target", target,
    )  # fmt: skip
    assert code == 0
    reply = json.loads(out)
    with Client(target) as client:
        expected = client.embed(["the cat sees the moon .", document.read_text()], pooling="max")
    assert reply["dimension"] == expected.dimension == 16
    for got, want in zip(reply["embeddings"], expected.embeddings, strict=True):
        assert got["values"] == pytest.approx(list(want.values))
        assert got["num_tokens"] == want.num_tokens
    code, out, _ = rnnlm(capsys, "embed", "a dog", "the bird", "--target", target)
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split() == ["tokens", "norm", "values", "(first", "6", "of", "16)", "text"]
    with Client(target) as client:
        mean = client.embed(["a dog", "the bird"]).embeddings
    for row, want in zip(rows, mean, strict=True):
        fields = row.split()
        assert int(fields[0]) == want.num_tokens
        assert [float(v) for v in fields[2:8]] == pytest.approx(list(want.values)[:6], abs=1e-4)
        assert fields[8:] in (["a", "dog"], ["the", "bird"])
    with pytest.raises(SystemExit) as exited:
        rnnlm(capsys, "embed", "x", "--pooling", "median", "--target", target)
    assert exited.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "the cat sees the moon .", "a dog likes a red house ."],
        ["generate", "the cat", "--max-tokens", "5", "--seed", "1"],
        ["models", "--json"],
    ],
)
def test_a_closed_pipe_ends_the_command_quietly(target: str, argv: list[str]) -> None:
    """`rnnlm score ... | head` when head has gone: no error, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the command's first write finds the pipe broken
    try:
        result = subprocess.run(
            [sys.executable, "-m", "rnnlm", *argv, "--target", target],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""


def test_errors_are_one_line_with_the_code(capsys: pytest.CaptureFixture[str], target: str) -> None:
    code, out, err = rnnlm(capsys, "predict", "the", "-k", "0", "--target", target)
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("rnnlm predict: INVALID_ARGUMENT: k must be in [1, ")
    code, _, err = rnnlm(capsys, "score", "--model", "nope", "x", "--target", target)
    assert code == 1 and "NOT_FOUND" in err and "nope" in err
    code, _, err = rnnlm(capsys, "score", "the cat", "--continuous-cache", "--target", target)
    assert code == 1 and err.count("\n") == 1
    assert "FAILED_PRECONDITION" in err and "has no continuous cache" in err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = rnnlm(capsys, "models", "--target", "127.0.0.1:1", "--timeout", "2")
    assert code == 1
    assert err.startswith("rnnlm models: ")
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def serving(bundle: Path, *flags: str) -> tuple[ServeProcess, str]:
    """`rnnlm serve` on `bundle` and loopback ports it picks, with `flags`, once it serves;
    the process and its gRPC target."""
    server = ServeProcess(
        ["--models", str(bundle), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         *flags],
        {},
    )  # fmt: skip
    port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
    server.wait_for_line("serving ")
    return server, f"127.0.0.1:{port}"


def test_sigterm_stops_cleanly(default_bundle: Path) -> None:
    server, target = serving(default_bundle, "--grace-seconds", "1")
    with Client(target, timeout=10) as client:
        assert client.health() == "SERVING"
    assert server.stop() == 0
    server.wait_for_line("stopped")


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs onnxruntime-gpu and a GPU",
)
def test_serve_on_cuda_answers_like_cpu(default_bundle: Path, target: str) -> None:
    """`--provider cuda` end to end: every RPC kind answers as the CPU server does (within
    float tolerance: onnxruntime's CUDA kernels round differently, 2e-4 was seen)."""
    server, gpu_target = serving(default_bundle, "--provider", "cuda")
    texts = ["the cat sees the moon .", "a dog likes a red house . " * 40]
    try:
        with Client(gpu_target, timeout=30) as gpu, Client(target) as cpu:
            assert gpu.get_model().provider == "CUDAExecutionProvider"
            on_gpu, on_cpu = (c.score(texts, return_token_logprobs=True) for c in (gpu, cpu))
            for x, y in zip(on_gpu.results, on_cpu.results, strict=True):
                assert x.num_tokens == y.num_tokens
                assert [t.token_id for t in x.token_logprobs] == [
                    t.token_id for t in y.token_logprobs
                ]
                assert [t.logprob for t in x.token_logprobs] == pytest.approx(
                    [t.logprob for t in y.token_logprobs], rel=1e-3, abs=1e-3
                )
            for context in ("the old man calls the", texts[1]):
                x, y = (c.predict_next(context, k=5) for c in (gpu, cpu))
                assert [p.token_id for p in x.predictions] == [p.token_id for p in y.predictions]
                assert [p.probability for p in x.predictions] == pytest.approx(
                    [p.probability for p in y.predictions], rel=1e-3, abs=1e-3
                )
            x, y = (c.generate_text("the cat", max_tokens=20, temperature=0) for c in (gpu, cpu))
            assert x == y
            x, y = (c.embed(texts).embeddings for c in (gpu, cpu))
            for a, b in zip(x, y, strict=True):
                assert list(a.values) == pytest.approx(list(b.values), rel=1e-3, abs=1e-3)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--models", "/nonexistent/models"], {}, "/nonexistent/models"),
        (["--port", "0"], {"RNNLM_MODELS": ""}, "--models"),
        ([], {"RNNLM_PORT": "http"}, "RNNLM_PORT='http'"),
    ],
)
def test_bad_start_exits_2_with_a_message(
    default_bundle: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    env = {"RNNLM_MODELS": str(default_bundle), "RNNLM_METRICS_PORT": "0", **env}
    server = ServeProcess(["--host", "127.0.0.1", *args], env)
    assert server.process.wait(60) == 2
    server.wait_for_line(re.escape(message))


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="a GPU is present"
)
def test_provider_cuda_without_a_gpu_exits_2(default_bundle: Path) -> None:
    server = ServeProcess(
        ["--models", str(default_bundle), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--provider", "cuda"],
        {},
    )  # fmt: skip
    assert server.process.wait(60) == 2
    server.wait_for_line(r"rnnlm serve: cannot start: .*(?i:cuda)")
