"""PNG plots of a run: Generate throughput against concurrency, PredictNext latency against
context length. matplotlib (the `train` extra) is imported only here, with the Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GENERATE_PNG = "generate_throughput.png"
CONTEXT_PNG = "predict_next_context.png"
CPU_PNG = "cpu_per_token.png"


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """The plots the results have data for; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    server = results.get("server") or {}
    on, off = server.get("batching_on") or {}, server.get("batching_off") or {}
    bare = results.get("bare") or {}
    large = results["run"]["plan"]["large_batch"]
    title = results["run"]["bundle"]["summary"]
    if results["run"].get("quick"):
        title = f"QUICK RUN, rough figures: {title}"
    written = []

    if on.get("generate"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, s, style in (("batching on", on, "o-"), ("batching off", off, "s--")):
            generate = s.get("generate") or {}
            streams = [int(c) for c in generate]
            ax.plot(
                streams,
                [generate[str(c)]["tokens_per_s"] for c in streams],
                style,
                label=f"server, {label}",
            )
        reference = (bare.get(f"step_b{large}") or {}).get("tokens_per_s")
        if reference:
            ax.axhline(
                reference,
                color="grey",
                linestyle=":",
                label=f"bare onnxruntime, batch-{large} step",
            )
        ax.set_xscale("log", base=2)
        ticks = [int(c) for c in on["generate"]]
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrent Generate streams")
        ax.set_ylabel("tokens/s (all streams)")
        ax.set_title(f"Generate throughput\n{title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / GENERATE_PNG))

    cpu = _cpu_figure(plt, results, title)
    if cpu is not None:
        written.append(_save(cpu, out / CPU_PNG))

    contexts = on.get("predict_context") or {}
    if contexts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lengths = [int(n) for n in contexts]
        for figure, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(
                lengths,
                [contexts[str(n)][figure] for n in lengths],
                style,
                label=f"PredictNext {figure[:3]}",
            )
        b1 = (bare.get("step_b1") or {}).get("p50_ms")
        echo = (results.get("echo") or {}).get("p50_ms")
        if b1 is not None and echo is not None:
            ax.axhline(
                b1 + echo,
                color="grey",
                linestyle=":",
                label="bare batch-1 step p50 + gRPC echo p50",
            )
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("cached context (tokens), extended by one token per call")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"PredictNext latency against context length\n{title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / CONTEXT_PNG))
    return written


def _cpu_figure(plt: Any, results: dict[str, Any], title: str) -> Any:
    """CPU time per generated token against streams: the server (from /proc), the engine
    in-process and bare onnxruntime's step at the same batch; None without server figures."""
    generate = ((results.get("server") or {}).get("batching_on") or {}).get("generate") or {}
    server = {int(c): g.get("server_cpu_us_per_token") for c, g in generate.items()}
    server = {c: v for c, v in server.items() if v is not None}
    if not server:
        return None
    bare = results.get("bare") or {}
    engine = (results.get("engine") or {}).get("generate") or {}
    lines = {
        "server (rnnlm serve)": server,
        "engine in-process": {int(c): e.get("cpu_us_per_token") for c, e in engine.items()},
        "bare onnxruntime step (one thread)": {
            int(k[6:]): v.get("cpu_us_per_token")
            for k, v in bare.items()
            if k.startswith("step_b") and k[6:].isdigit()
        },
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, points), style in zip(lines.items(), ("o-", "s--", "^:"), strict=True):
        xs = sorted(c for c, v in points.items() if v is not None)
        if xs:
            ax.plot(xs, [points[c] for c in xs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent Generate streams (bare: batch rows)")
    ax.set_ylabel("CPU us per generated token")
    ax.set_title(f"CPU per generated token\n{title}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
