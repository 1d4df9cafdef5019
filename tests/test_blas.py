"""A server process holds numpy's BLAS to one thread (server/blas.py), unless told otherwise.

Each case runs a real `RnnlmServer` in a fresh interpreter: the BLAS pool's size is
process-wide, so the other tests' servers would decide it here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from server.blas import ENV, limit_blas_threads

SCRIPT = """
import asyncio, json, sys
from pathlib import Path
import numpy
from threadpoolctl import threadpool_info, threadpool_limits
from server.app import RnnlmServer
from server.config import ServerConfig

def pools():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

async def main():
    before = pools()
    config = ServerConfig(models=Path(sys.argv[1]), host="127.0.0.1", port=0, metrics_port=0)
    server = RnnlmServer(config)
    await server.start()
    try:
        print(json.dumps({"before": before, "after": pools()}))
    finally:
        await server.stop(grace=0)

asyncio.run(main())
"""

HAS_BLAS_POOL = any(i["user_api"] == "blas" for i in threadpool_info())


def _pools(models: Path, environ: dict[str, str]) -> dict[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != ENV} | environ
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(models)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not HAS_BLAS_POOL, reason="this numpy loads no BLAS with a thread pool")
def test_a_server_holds_the_blas_pool_to_one_thread(default_bundle: Path) -> None:
    pools = _pools(default_bundle, {ENV: "2"})
    assert pools == {"before": pools["before"], "after": pools["before"]}  # the operator's
    assert set(pools["before"]) == {2}
    pools = _pools(default_bundle, {})
    assert pools["after"] and set(pools["after"]) == {1}


@pytest.mark.skipif(not HAS_BLAS_POOL, reason="this numpy loads no BLAS with a thread pool")
def test_the_operators_setting_is_kept() -> None:
    def pools() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    # The pool at 2 first (another test's server may have limited it here), put back after.
    with threadpool_limits(2, user_api="blas"):
        assert limit_blas_threads({ENV: "4"}) is None
        assert pools() == {2}
        assert limit_blas_threads({}) is not None
        assert pools() == {1}
