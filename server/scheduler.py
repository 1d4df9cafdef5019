"""The scheduler: the queue, the worker threads that step batches, and the step-time policy.

Requests cross from the event loop to the workers through one locked queue. Each worker owns a
batch; every step it takes its share of the queue into the batch (so a request waits for no
slot: it joins the next step), picks which generations advance this step (`Pace`), runs
`step`, writes the prefix states it reached into the state cache, and posts the replies to
the event loop (a `Mailbox`: one wake-up for the steps the loop has not yet taken).
onnxruntime's `run` and numpy's array work release the GIL, so one worker's run overlaps
another's sampling and the event loop keeps serving while steps run.

No request waits behind another. Next-token work (a prompt, a next-token call, a score or
embed chunk) runs in the next step, always; when the generations of that step would keep a
next-token call or a new stream's first token waiting 2 ms or more, those run first, in a step
of their own (`Pace.lane`). Generations past their prompt advance together while the step
stays under `max_step_ms` (and `max_batch_size`, the old slot pool's flag, when set); beyond
that they take turns, those that advanced least first. Admission control
counts waiting work (requests not yet in a batch, generations sitting a step out, chunks held
for a later step), not running rows.

`run_inline` is the fast path: a short next-token request on an idle engine runs through the
same `step` on the caller's thread at once (two thread wake-ups cost more than its step), and
so does one arriving while generations would keep it waiting for a run of its own: it then
runs beside the step under way instead of after it (`inline_now`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.batch import Batch
from server.delivery import Mailbox, dispatch
from server.engine_config import EngineConfig
from server.engine_errors import EngineClosed, Overloaded, failure_error
from server.metrics import EngineMetrics
from server.requests import Failure, GenerateRequest, Request
from server.row_sampler import RowSampler
from server.runner import Runner
from server.state_cache import StateCache
from server.step import Prefix, Reply, StepConfig, StepResult, step

log = logging.getLogger(__name__)

# Weight of the newest step in the running estimate of a generation's share of step time.
PACE_WEIGHT = 0.2
# Generations' estimated share of a step from which next-token work runs in a step of its
# own, before theirs (see `Pace.lane`).
LANE_S = 0.002


class Pace:
    """The step-time policy: how many generations one step advances, and which.

    The cost of a row is its share of the step's time, estimated as steps run (the step's
    seconds over its rows, a moving average: an overestimate at small batches, where a step's
    fixed cost weighs most, so the batch grows as the estimate falls). `clock` times steps:
    the worker thread's CPU time where all of a step's work runs on it (onnxruntime on the
    CPU with one intra-op thread), so that other processes on a shared machine do not make
    the hardware look slower than it is; the wall clock otherwise."""

    def __init__(
        self, max_step_ms: float, max_rows: int | None, clock: Callable[[], float]
    ) -> None:
        self.max_step_s = max_step_ms / 1000
        self.max_rows = max_rows
        self.clock = clock
        self.row_s: float | None = None  # estimated seconds a row adds to a step

    def limit(self) -> int | None:
        """The most generations the next step advances (None: all)."""
        row_s = self.row_s
        by_time = max(1, math.floor(self.max_step_s / row_s)) if row_s else None
        if by_time is None or self.max_rows is None:
            return by_time if by_time is not None else self.max_rows
        return min(by_time, self.max_rows)

    def observe(self, seconds: float, rows: int) -> None:
        if rows:
            sample = seconds / rows
            old = self.row_s
            self.row_s = sample if old is None else old + PACE_WEIGHT * (sample - old)

    def keeps_waiting(self, batch: Batch) -> bool:
        """Whether the generations advancing in `batch`'s next step would keep next-token
        work waiting at least `LANE_S` (their estimated share of the step)."""
        if self.row_s is None:
            return False
        advancing = int(np.count_nonzero(batch.decoding())) - len(batch.resting)  # all decode
        return self.row_s * advancing >= LANE_S

    def lane(self, batch: Batch, chunk: int) -> frozenset[int]:
        """The rows to step on their own before the rest: next-token work that answers in one
        step (a next-token call, a new stream's prompt and first token), when the
        generations advancing this step would keep it waiting at least `LANE_S`. Then it
        waits for no generation's run; the extra run costs well under that."""
        if not self.keeps_waiting(batch):
            return frozenset()
        requests = batch.requests
        return frozenset(
            row
            for row in (~batch.decoding()).nonzero()[0].tolist()
            if requests[row].answers_next and len(requests[row].feed) - requests[row].fed <= chunk
        )

    def rest(self, batch: Batch) -> Batch:
        """`batch` with the generations beyond this step's limit resting, the ones that
        advanced least taking their turn first."""
        limit = self.limit()
        rows = batch.decoding().nonzero()[0]
        if limit is None or len(rows) <= limit:
            return batch
        # Fewest tokens generated first, then by row.
        order = rows[np.argsort(batch.sampling.position[rows], kind="stable")]
        return batch.rest(frozenset(order[limit:].tolist()))


@dataclass
class StepTotals:
    """What the batching threads' steps cost, summed: how many, the rows they advanced, the
    threads' CPU seconds in them and, of those, in onnxruntime's runs and the sampler (the
    model's work, `StepResult.model_s`). The rest is the engine's own Python, which issue 14
    asks to stay flat from 1 to 256 rows a step (`rnnlm bench` reports it a step)."""

    steps: int = 0
    rows: int = 0
    cpu_s: float = 0.0
    model_s: float = 0.0

    def add(self, other: StepTotals) -> StepTotals:
        return StepTotals(
            self.steps + other.steps,
            self.rows + other.rows,
            self.cpu_s + other.cpu_s,
            self.model_s + other.model_s,
        )


class Scheduler:
    """The queue and the worker threads (see the module docstring)."""

    def __init__(
        self,
        runner: Runner,
        step_config: StepConfig,
        config: EngineConfig,
        cache: StateCache,
        metrics: EngineMetrics | None,
        num_states: int,
        make_sampler: Callable[[], RowSampler],
        loop: asyncio.AbstractEventLoop,
        name: str,
        cpu_bound: bool,
    ) -> None:
        self.runner = runner
        self.step_config = step_config
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self._num_states = num_states
        self._make_sampler = make_sampler
        # How steps are timed for the step-time policy (see `Pace`).
        self._clock = time.thread_time if cpu_bound else time.perf_counter
        self._mailbox = Mailbox(loop)
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._closing = False
        self._idle_threads = 0  # workers waiting with nothing to do (lock held)
        threads = config.batch_threads
        self.sizes = [0] * threads  # rows in each worker's batch
        self._waiting = [0] * threads  # each worker's rows that sat out its last step
        # Whether each worker's generations keep next-token work waiting (`Pace.keeps_waiting`)
        self._slow = [False] * threads
        self._totals = [StepTotals() for _ in range(threads)]  # each worker's own
        self._inline_sampler = make_sampler()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"engine-{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def active(self) -> int:
        """Requests admitted to a batch or waiting for one."""
        return len(self._queue) + sum(self.sizes)

    @property
    def waiting(self) -> int:
        """Work that did not run in the last step: queued requests and rows sitting out."""
        return len(self._queue) + sum(self._waiting)

    def step_totals(self) -> StepTotals:
        """The workers' step costs so far (a snapshot, read while they run: a step's fields
        may be counted in part; see `StepTotals`)."""
        total = StepTotals()
        for part in list(self._totals):
            total = total.add(part)
        return total

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    def submit(self, request: Request, model: str) -> None:
        """Queue a request for the next step; Overloaded when too much work is waiting."""
        with self._cond:
            self._admissible(model)
            self._queue.append(request)
            self._cond.notify()

    def _admissible(self, model: str) -> None:
        """EngineClosed or Overloaded unless a new request may be queued (lock held)."""
        if self._closing:
            raise EngineClosed("the engine is shutting down")
        waiting = self.waiting
        if waiting >= self.config.max_queued:
            raise Overloaded(
                f"{waiting} requests are already waiting for {model} "
                f"(max_queued {self.config.max_queued}); try again later"
            )

    def start_inline(self, request: GenerateRequest, model: str) -> None:
        """A generation's (short) prompt and first token, run here at once (see
        `inline_now`) and delivered (the caller is on the event loop); then the generation
        is queued for the workers with its state and random stream where they are."""
        with self._cond:
            self._admissible(model)
        batch = Batch.of([request], self.step_config.vocab_size)
        while not (request.done or batch.decoding()[0]):
            result = step(batch, self.runner, self.step_config, self._inline_sampler)
            self._store(result.prefixes)
            dispatch(result.replies)
            batch = result.batch
        if not request.done:
            request.resume(batch.row_state(0), batch.sampling)
            self.submit(request, model)

    def idle_now(self) -> bool:
        """True when every worker waits with an empty batch and the queue is empty.

        Only the event loop submits work, so the engine stays idle until this caller returns.
        """
        with self._cond:
            idle = self._idle_threads == len(self._threads)
            return idle and not self._queue and not self._closing

    def inline_now(self) -> bool:
        """True when a short next-token request should run on the caller's thread at once
        (`run_inline`): the engine is idle, or nothing is queued and a worker's generations
        would keep it waiting `LANE_S` or more. It would then get a run of its own anyway
        (`Pace.lane`), but only after the step under way; on the caller's thread it runs now,
        beside the worker's run (onnxruntime's `run` is thread-safe and releases the GIL)."""
        with self._cond:
            if self._queue or self._closing:
                return False
            return self._idle_threads == len(self._threads) or any(self._slow)

    def run_inline(self, request: Request) -> object:
        """Run a request to its answer here, through `step` (see `inline_now`)."""
        return self.run_inline_many([request])[0]

    def run_inline_many(self, requests: Sequence[Request]) -> list[object]:
        """Run requests to their answers here, in one batch of their own (see `inline_now`):
        it shares only the sessions and the state cache (locked) with the workers' batches."""
        if self.metrics is not None:
            self.metrics.observe_no_wait(len(requests))
        batch = Batch.of(requests, self.step_config.vocab_size)
        answers: dict[int, object] = {}
        while len(answers) < len(requests):
            result = step(batch, self.runner, self.step_config, self._inline_sampler)
            self._store(result.prefixes)
            for r, payload in result.replies:  # each request answers once, when done
                answers[id(r)] = payload
            batch = result.batch
        payloads = [answers[id(r)] for r in requests]
        for payload in payloads:
            if isinstance(payload, Failure):
                raise failure_error(payload)
        return payloads

    def _store(self, prefixes: Sequence[Prefix]) -> None:
        """The one place the state cache is written: the prefix states steps reached."""
        for p in prefixes:
            self.cache.insert(p.tokens, p.state, p.logprobs, p.key)

    # ---- the worker threads ----------------------------------------------------------------

    def _work(self, index: int) -> None:
        """One worker's loop: admit its share of the queue into its batch, step it."""
        vocab = self.step_config.vocab_size
        batch = Batch.empty(self._num_states, vocab)
        sampler = self._make_sampler()
        pace = Pace(self.config.max_step_ms, self.config.max_batch_size, self._clock)
        last_size, last_end = 0, 0.0
        while True:
            admitted = self._admit(len(batch), last_size, last_end)
            if admitted is None:
                break
            if admitted:
                batch = batch.concatenate([Batch.of(admitted, vocab)])
            batch = pace.rest(batch.live())
            self.sizes[index] = len(batch)
            self._slow[index] = pace.keeps_waiting(batch)
            urgent = pace.lane(batch, self.step_config.chunk)
            if urgent:  # next-token work first, in a run of its own
                lane = batch.rest(frozenset(range(len(batch))) - urgent)
                batch = pace.rest(self._deliver(self._step(lane, sampler, index)))
            if not len(batch):
                continue
            # Only steps of decoding rows alone measure what a generation adds to a step (a
            # prompt chunk or a shape's first run would make rows look dearer for a while).
            resting = batch.resting
            decode_only = bool(batch.decoding().all())  # the resting rows decode too
            start = pace.clock()
            result = self._step(batch, sampler, index)
            if decode_only:
                pace.observe(pace.clock() - start, len(batch) - len(resting))
            last_size, last_end = len(batch), time.perf_counter()
            self._waiting[index] = len(batch.resting) + result.held
            batch = self._deliver(result)
            self.sizes[index] = len(batch)
        self._shut_down(index, batch)

    def _deliver(self, result: StepResult) -> Batch:
        """Cache a step's prefix states, post its replies; the batch's live rows after it."""
        # Cached before the results go out, so a caller's next request can hit them.
        self._store(result.prefixes)
        if result.replies:
            self._post(result.replies)
        return result.batch.live()

    def _step(self, batch: Batch, sampler: RowSampler, index: int) -> StepResult:
        """One step of worker `index`'s batch, its cost added to the worker's `StepTotals`."""
        start = time.thread_time()
        try:
            result = step(batch, self.runner, self.step_config, sampler, time.thread_time)
        except Exception as e:  # a bug must not take the engine down with it
            log.exception("engine step failed")
            result = StepResult(batch, _fail(batch, f"internal engine error: {e}"), [])
        totals = self._totals[index]  # the worker's own: updated in place, read as a snapshot
        totals.steps += 1
        totals.rows += len(batch) - len(batch.resting)
        totals.cpu_s += time.thread_time() - start
        totals.model_s += result.model_s
        return result

    def _admit(self, size: int, last_size: int, last_end: float) -> list[Request] | None:
        """This worker's share of the queue, waiting for work while its batch is empty;
        None when the engine is closing."""
        wait = self.config.max_queue_wait_ms / 1000 if self.config.batching else 0.0
        with self._cond:
            while not self._closing and not self._queue and not size:
                self._idle_threads += 1
                self._cond.wait()
                self._idle_threads -= 1
            if not self._closing and not size and wait > 0:
                self._wait_for_company(last_size, last_end, wait)
            if self._closing:
                return None
            share = -(-self.active // len(self._threads))  # an even share of all the work
            admitted: list[Request] = []
            while self._queue and size + len(admitted) < share:
                request = self._queue.popleft()
                if not request.cancelled:
                    admitted.append(request)
            depth = len(self._queue)
        if self.metrics is not None:
            self.metrics.set_queue_depth(depth)
            now = time.perf_counter()
            for request in admitted:
                self.metrics.observe_queue_wait(now - request.submitted)
        return admitted

    def _wait_for_company(self, target: int, last_end: float, wait: float) -> None:
        """Hold a step (lock held) while closed-loop callers of the last one come back.

        When the last step served `target` requests and ended just before the first waiting
        one arrived, up to `wait` seconds are spent letting the others rejoin, so they share
        one run instead of trickling through one at a time. A lone caller never waits.
        """
        if not self._queue or len(self._queue) >= target:
            return
        first = self._queue[0].submitted
        if first - last_end > wait:
            return
        deadline = first + wait
        while not self._closing and len(self._queue) < target:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _shut_down(self, index: int, batch: Batch) -> None:
        with self._cond:
            waiting = list(self._queue)
            self._queue.clear()
        closing = Failure("the engine is shutting down", shutdown=True)
        replies = _fail(batch, closing.message, shutdown=True)
        replies += [(r, closing) for r in waiting if not r.cancelled]
        self.sizes[index] = 0
        if replies:
            self._post(replies)
        if self.metrics is not None:
            self.metrics.set_queue_depth(0)

    def _post(self, replies: list[Reply]) -> None:
        self._mailbox.post(replies)


def _fail(batch: Batch, message: str, shutdown: bool = False) -> list[Reply]:
    """End every live request of `batch` with a failure."""
    replies: list[Reply] = []
    for r in batch.requests:
        if not (r.done or r.cancelled):
            r.done = True
            replies.append((r, Failure(message, shutdown)))
    return replies
