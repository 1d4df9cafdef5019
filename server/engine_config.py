"""The engine's settings (`EngineConfig`), checked when made."""

from __future__ import annotations

from dataclasses import dataclass

PROVIDERS = ("cpu", "cuda", "auto")
SAMPLERS = ("auto", "native", "graph", "numpy")


@dataclass(frozen=True)
class EngineConfig:
    provider: str = "cpu"  # "cpu" | "cuda" | "auto"; cuda without a GPU -> EngineError at start
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    batching: bool = True  # False: one onnxruntime run per request (for comparison)
    # The step-time policy (server/scheduler.py): a step advances as many generations as fit
    # in this many milliseconds (measured as steps run); beyond that they take turns, the
    # ones that waited longest first. Next-token work (prompts, next-token calls, score and
    # embed chunks) never waits for a turn.
    max_step_ms: float = 20.0
    # The old slot pool's flag, kept: at most this many generations advance in one step (the
    # others take turns; nothing waits for a slot). None: the step time alone decides.
    max_batch_size: int | None = None
    # Worker threads, each stepping its own batch, the requests shared out between them:
    # while one thread's onnxruntime run computes, another samples. More than one pays on
    # machines with cores to spare under many streams (docs/performance.md).
    batch_threads: int = 1
    max_queue_wait_ms: float = 2.0  # how long a step may wait to fill a batch
    prefill_chunk: int = 128  # tokens of a prompt/document fed per step per request
    # Waiting work (requests not yet in a batch, generations that missed their turn, chunks
    # held for a later step) beyond which a new request is refused with Overloaded.
    max_queued: int = 1024
    state_cache_bytes: int = 64 * 2**20
    # Under load, a generation's tokens reach its consumer this many at a time, or when the
    # oldest has waited `stream_ms` (see server/delivery.py, TokenStream); 1: one at a time.
    stream_tokens: int = 16
    stream_ms: float = 100.0
    # Which sampler draws the tokens (server/row_sampler.py): "graph" (the ONNX sampler graph),
    # "numpy", "native" (in C, server/_fastsample.c; penalised rows on the graph), or
    # "auto" (native on the CPU where it was built, else the graph). All give the same tokens
    # for the same seed (but where rounding puts a draw on a boundary).
    sampler: str = "auto"
    # Runs of decoding rows leave their logits on the device for the sampler graph, and their
    # states for the next step's run (onnxruntime I/O binding; server/runner.py,
    # `DeviceStates`). None: on with CUDA and the sampler graph.
    device_logits: bool | None = None
    # Tokens before a request's last from which they are fed on the prefill graph in a run of
    # their own (see server/runner.py, choose_prefill_split); None: measured at start.
    prefill_split: int | None = None
    # Run the engine core (scheduler, steps, onnxruntime) in a process of its own, so gRPC's
    # writes in the server process never hold the GIL the steps need (server/remote_engine.py).
    process: bool = False

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"engine {name} must be {rule}, not {getattr(self, name)!r}")

        check(self.provider in PROVIDERS, "provider", f"one of {', '.join(PROVIDERS)}")
        check(self.sampler in SAMPLERS, "sampler", f"one of {', '.join(SAMPLERS)}")
        check(self.intra_op_threads >= 0, "intra_op_threads", ">= 0 (0: onnxruntime decides)")
        check(self.inter_op_threads >= 0, "inter_op_threads", ">= 0 (0: onnxruntime decides)")
        for name in ("batch_threads", "prefill_chunk", "max_queued", "stream_tokens"):
            check(getattr(self, name) >= 1, name, ">= 1")
        size = self.max_batch_size
        check(size is None or size >= 1, "max_batch_size", "None (step time decides) or >= 1")
        check(self.max_step_ms > 0, "max_step_ms", "> 0")
        check(self.stream_ms >= 0, "stream_ms", ">= 0")
        check(self.max_queue_wait_ms >= 0, "max_queue_wait_ms", ">= 0")
        check(self.state_cache_bytes >= 0, "state_cache_bytes", ">= 0")
        split = self.prefill_split
        check(split is None or split >= 1, "prefill_split", "None (measured) or >= 1")
