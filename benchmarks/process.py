"""A server run as a child process: its port read from its log, its memory and CPU from /proc.

Running servers as separate processes keeps their CPU time apart from the load generator's (as
in production, where clients are elsewhere) and makes their resident memory measurable alone.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.timing import BenchError

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL = 40
STOP_SECONDS = 10.0


class ChildServer:
    """`python -m MODULE ARGS...`, whose stderr announces its port in a line matching `port_re`.

    Environment variables starting with `strip_env` are removed, so a configuration left in the
    shell cannot silently change what is measured; `env` adds or replaces variables (e.g. a
    PYTHONPATH that runs another checkout of the server).
    """

    def __init__(
        self,
        module: str,
        args: list[str],
        port_re: str,
        *,
        strip_env: str = "RNNLM_",
        start_seconds: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = [sys.executable, "-m", module, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(strip_env)} | (env or {})
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self.port = 0
        self._port_re = re.compile(port_re)
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self._found = threading.Event()
        threading.Thread(target=self._read, name=f"log-{module}", daemon=True).start()
        deadline = time.monotonic() + start_seconds
        while not self._found.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                why = "exited" if self.process.returncode else "did not announce its port"
                raise BenchError(f"{' '.join(self.command)} {why}; its log:\n{self.log_tail()}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.append(line.rstrip("\n"))
            match = self._port_re.search(line)
            if match and not self._found.is_set():
                self.port = int(match.group(1))
                self._found.set()

    def log_tail(self) -> str:
        return "\n".join(self._log)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{' '.join(self.command)} exited with code {self.process.returncode}; "
                f"its log:\n{self.log_tail()}"
            )

    def rss_mb(self) -> float | None:
        """Resident memory (VmRSS) in MiB of the server and the processes it started (its
        native front end, an engine core process); None where /proc is not available."""
        kb = _over_tree(self.pid, _rss_kb)
        return None if kb is None else kb / 1024

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds used so far by the server and the processes it started
        (its native front end, an engine core process); None where /proc is not available.
        A child that ended meanwhile has its time in its parent's reaped children's."""
        ticks = _over_tree(self.pid, _cpu_ticks)
        return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_SECONDS."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _over_tree(pid: int, read: Callable[[int], int]) -> int | None:
    """`read` of `pid` plus that of every live process below it (None when `pid` cannot be
    read: no /proc); a child that ends while being read counts nothing."""
    try:
        total = read(pid)
    except OSError:
        return None
    for child in descendants(pid):
        try:
            total += read(child)
        except (OSError, IndexError):
            continue
    return total


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` and of the children it has waited for (cutime + cstime)."""
    return sum(int(f) for f in _stat(pid)[11:15])


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(entry.name)[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found
