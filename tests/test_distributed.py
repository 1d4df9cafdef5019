"""Data-parallel training on the CPU: 2 processes (torchrun, gloo) against one process.

With dropout off, a step of 2 processes with 4 streams each is the step of one process with the
same 8 streams: DDP averages the two halves' mean gradients, which is the mean over all 8. The
ranks must hold identical weights (the trainer checks it at every save and records the largest
difference), and a run resumes on another number of processes from the same data position.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import tiny
from torch import nn

from training import distributed as ddp
from training.train import TrainOptions, train

torch.set_num_threads(1)

PER_RANK_BATCH = 4
FLAGS = ["--layers", "1", "--hidden", "16", "--embedding", "16", "--bptt", "8", "--epochs", "2",
         "--dropout", "0", "--lr", "0.01", "--seed", "5", "--threads", "1", "--quiet"]  # fmt: skip
# Two epochs of the tiny corpus are 52 steps; 30 stops in the middle of the second.
STOP_AT = 30
TOLERANCE = 1e-5  # float sums in another order, over a few dozen Adam steps


def single(corpus: Path, out: Path, **kw: Any) -> Path:
    options = tiny(corpus, out, dropout=0.0, seed=5, batch_size=2 * PER_RANK_BATCH)
    return train(replace(options, **kw))


def torchrun_train(args: list[str], nproc: int = 2) -> None:
    """`rnnlm train --nproc N ...`: it runs torchrun, which runs `python -m training` N times."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "training", "--nproc", str(nproc), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("checkpoint: ") == 1, done.stdout  # rank 0 alone reports


def provenance(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["provenance"]


def max_difference(a: Path, b: Path) -> float:
    wa = safetensors.torch.load_file(str(a / "last.safetensors"))
    wb = safetensors.torch.load_file(str(b / "last.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture
def corpus(tiny_corpus: Path) -> Path:
    return tiny_corpus


def test_two_processes_equal_one_and_resume_on_another_count(corpus: Path, tmp_path: Path) -> None:
    # 2 processes x 4 streams, stopped mid-epoch, against 1 process x 8 streams.
    two = tmp_path / "two"
    torchrun_train(["--corpus", str(corpus), "--out", str(two), *FLAGS,
                   "--batch-size", str(PER_RANK_BATCH), "--max-steps", str(STOP_AT)])  # fmt: skip
    one = single(corpus, tmp_path / "one", max_steps=STOP_AT)
    p_two, p_one = provenance(two), provenance(one)
    assert (p_two["world_size"], p_two["global_batch"], p_two["rank_divergence"]) == (2, 8, 0.0)
    assert (p_two["steps"], p_two["tokens_seen"]) == (p_one["steps"], p_one["tokens_seen"])
    assert max_difference(two, one) < TOLERANCE
    assert p_two["valid_loss"] == pytest.approx(p_one["valid_loss"], abs=TOLERANCE)
    train_records = [
        json.loads(line)
        for line in (two / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert all(r["tokens_per_s"] > 0 for r in train_records)

    # The 2-process checkpoint finishes in 1 process, the 1-process one in 2: both end where an
    # uninterrupted 1-process run ends.
    straight = single(corpus, tmp_path / "straight")
    finished_by_one = train(TrainOptions(resume=two, out=tmp_path / "by-one", quiet=True))
    torchrun_train(["--resume", str(one), "--out", str(tmp_path / "by-two"), "--quiet"])
    for finished in (finished_by_one, tmp_path / "by-two"):
        assert provenance(finished)["steps"] == provenance(straight)["steps"]
        assert max_difference(finished, straight) < TOLERANCE
    assert provenance(tmp_path / "by-two")["world_size"] == 2
    # The per-process batch follows the number of processes; the global batch stays 8.
    args = json.loads((tmp_path / "by-two" / "config.json").read_text())["train_args"]
    assert args["batch_size"] == PER_RANK_BATCH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = ddp.Group(rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    in_sync = ddp.divergence(model, group)
    if rank == 1:
        with torch.no_grad():
            model.bias[0] += 0.5
    out_of_sync = ddp.divergence(model, group)
    state = (torch.full((2, 3, 4), float(rank)),)
    rows = ddp.all_rows(state, group)[0]
    streams = torch.arange(15).view(5, 3)
    results[rank] = {
        "divergence": (in_sync, out_of_sync),
        "rows": rows[0, :, 0].tolist(),
        "own": ddp.own_rows(torch.arange(8).view(4, 2), group).tolist(),
        "eval": ddp.eval_rows(streams, group).tolist(),
        "sum": ddp.all_sum([1.0, float(rank)], group, torch.device("cpu")),
    }
    dist.destroy_process_group()


def test_the_collectives_and_the_sync_check() -> None:
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        # In sync: exactly 0; one bias moved by 0.5 on rank 1: every rank sees 0.5.
        assert r["divergence"] == (0.0, 0.5)
        assert r["rows"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # rank 0's rows, then rank 1's
        assert r["sum"] == [2.0, 1.0]
    assert results[0]["own"] == [[0, 1], [2, 3]] and results[1]["own"] == [[4, 5], [6, 7]]
    # Evaluation rows need not split evenly: 5 streams are 3 + 2.
    assert len(results[0]["eval"]) == 3 and len(results[1]["eval"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_on_one_gpu_trains_and_saves(corpus: Path, tmp_path: Path) -> None:
    """`--nproc 1 --device cuda`: torchrun, NCCL and DDP on `cuda:0`, through to the checkpoint."""
    out = tmp_path / "nccl"
    torchrun_train(["--corpus", str(corpus), "--out", str(out), "--device", "cuda", *FLAGS], 1)
    assert provenance(out)["stopped"] == "completed"
    assert safetensors.torch.load_file(str(out / "model.safetensors"))
