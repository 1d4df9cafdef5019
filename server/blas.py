"""numpy's BLAS threads in a server process: one, unless the operator sets them.

numpy's OpenBLAS keeps a pool of as many threads as the machine has cores and, after each
large matrix product, leaves them spinning for the next one (about a tenth of a second). The
server's large products are the continuous cache's attention over a `Score` chunk
(server/continuous_cache.py): on the 2-core machine, three 20,000-character Scores with the
cache cost the server 312 to 345 CPU ticks with the pool and 179 to 207 with one thread
(docs/performance.md, "numpy's BLAS threads"). The pool's second thread mostly spun on the
core that gRPC, the event loop and the other requests need; the server's parallelism is the
engine's threads. An operator who sets `OPENBLAS_NUM_THREADS` keeps what they set.
"""

from __future__ import annotations

from collections.abc import Mapping

from threadpoolctl import threadpool_info, threadpool_limits

ENV = "OPENBLAS_NUM_THREADS"


def limit_blas_threads(environ: Mapping[str, str]) -> str | None:
    """Limit the BLAS libraries numpy loaded to one thread, unless `environ` sets `ENV`;
    what changed, for the log (None: nothing did)."""
    if ENV in environ:
        return None
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    if all(n == 1 for n in before):
        return None
    threadpool_limits(1, user_api="blas")
    pools = ", ".join(f"{n} threads" for n in before)
    return f"numpy's BLAS limited to one thread (it had {pools}; {ENV} overrides)"
