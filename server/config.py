"""Server configuration: each option is a flag `--foo-bar` with an environment twin `RNNLM_FOO_BAR`.

A flag given on the command line wins over its environment variable, which wins over the
default; this is what Kubernetes manifests rely on (environment in the pod spec, flags for
people). Every bad value is reported with the flag or variable it came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from server.engine_config import PROVIDERS, SAMPLERS

LOG_LEVELS = ("debug", "info", "warning", "error")
SELECTIONS = ("likeliest", "fewest-keys")  # --typing-selection
FRONT_ENDS = ("auto", "python", "native")  # --front-end
ENV_PREFIX = "RNNLM_"


class ConfigError(Exception):
    """A flag or environment variable has a bad value; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `rnnlm serve` can be told; the defaults suit a small shared CPU."""

    models: Path
    default_model: str = ""
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464
    processes: int = 1
    front_end: str = "auto"
    provider: str = "cpu"
    intra_op_threads: int = 1
    sampler: str = "auto"
    batching: bool = True
    max_step_ms: float = 20.0
    max_batch_size: int | None = None
    batch_threads: int = 1
    engine_process: bool = False
    max_queue_wait_ms: float = 2.0
    max_queued: int = 1024
    stream_tokens: int = 16
    stream_ms: float = 100.0
    state_cache_mb: float = 64.0
    max_tokens: int = 1024
    max_prompt_tokens: int = 8192
    max_text_chars: int = 131_072
    max_message_bytes: int = 16 * 2**20
    grace_seconds: float = 10.0
    max_connection_age_seconds: float = 300.0
    max_connection_age_grace_seconds: float = 0.0
    log_level: str = "info"
    reload_seconds: float = 0.0
    strict_models: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    health_port: int | None = None
    auth_token_file: Path | None = None
    state_token_key_file: Path | None = None
    word_search_width: int = 6
    word_search_depth: int = 16
    word_search_ms: float = 50.0
    blocklist: Path | None = None
    user_word_boost: float = 10.0
    user_word_floor: float = 0.05
    word_cache: bool = True
    word_cache_weight: float = 0.1
    word_cache_decay: float = 0.98
    word_cache_bigram: float = 0.3
    typing_selection: str = "likeliest"

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(
                    f"{_flag(name)} ({env_name(name)}): {rule}, not {getattr(self, name)!r}"
                )

        check(str(self.models) != "", "models", "must name a model repository directory")
        for name in ("port", "metrics_port"):
            check(0 <= getattr(self, name) <= 65535, name, "must be a port in [0, 65535]")
        if self.health_port is not None:
            check(0 <= self.health_port <= 65535, "health_port", "must be a port in [0, 65535]")
        check(self.provider in PROVIDERS, "provider", f"must be one of {', '.join(PROVIDERS)}")
        check(self.sampler in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}")
        check(self.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        check(self.front_end in FRONT_ENDS, "front_end", f"must be one of {', '.join(FRONT_ENDS)}")
        check(
            self.typing_selection in SELECTIONS,
            "typing_selection",
            f"must be one of {', '.join(SELECTIONS)}",
        )
        for name in (
            "processes",
            "intra_op_threads",
            "batch_threads",
            "max_queued",
            "stream_tokens",
            "max_tokens",
            "max_prompt_tokens",
            "max_text_chars",
            "max_message_bytes",
            "word_search_width",
            "word_search_depth",
        ):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.word_search_ms > 0, "word_search_ms", "must be more than 0")
        boost = self.user_word_boost
        check(boost >= 1 and math.isfinite(boost), "user_word_boost", "must be finite, at least 1")
        check(0 < self.user_word_floor <= 1, "user_word_floor", "must be in (0, 1]")
        check(0 < self.word_cache_weight < 1, "word_cache_weight", "must be in (0, 1)")
        check(0 < self.word_cache_decay <= 1, "word_cache_decay", "must be in (0, 1]")
        check(0 <= self.word_cache_bigram < 1, "word_cache_bigram", "must be in [0, 1)")
        if self.max_batch_size is not None:
            check(self.max_batch_size >= 1, "max_batch_size", "must be at least 1")
        check(self.max_step_ms > 0, "max_step_ms", "must be more than 0")
        for name in (
            "max_queue_wait_ms",
            "stream_ms",
            "state_cache_mb",
            "grace_seconds",
            "reload_seconds",
            "max_connection_age_seconds",
            "max_connection_age_grace_seconds",
        ):
            check(getattr(self, name) >= 0, name, "must be at least 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (
                ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            )
            raise ConfigError(
                f"{_flag(given)} ({env_name(given)}) needs {_flag(missing)} ({env_name(missing)}): "
                "TLS takes a certificate and its private key"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                f"{_flag('tls_client_ca')} ({env_name('tls_client_ca')}) needs --tls-cert and "
                "--tls-key: client certificates are only checked over TLS"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def state_cache_bytes(self) -> int:
        return int(self.state_cache_mb * 2**20)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


# field -> (parser of the environment value, help); the order is the order of --help.
_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "models": (Path, "model repository: a bundle, a directory of bundles, or NAME/VERSION/ dirs"),
    "default_model": (
        str,
        "model answering requests that name none (default: the repository's repository.json "
        "default_model, else the only model)",
    ),
    "host": (str, "address to listen on"),
    "port": (int, "gRPC port; 0 picks a free one (logged)"),
    "metrics_port": (int, "Prometheus /metrics port; 0 picks a free one (logged)"),
    "processes": (
        int,
        "server processes sharing the gRPC port (SO_REUSEPORT), each loading the models, "
        "under a supervisor that serves their summed /metrics (docs/deployment.md); one a core",
    ),
    "front_end": (
        str.lower,
        "what speaks gRPC on the port: native (gRPC's C++ API in a process beside this one, "
        "relaying every call to it; built at install where grpc++ is found), python (grpc.aio "
        "in this process), or auto (native where built, else python; docs/performance.md)",
    ),
    "provider": (
        str.lower,
        "onnxruntime execution provider: cpu, cuda (fail without a GPU) or auto",
    ),
    "intra_op_threads": (int, "onnxruntime threads per session"),
    "sampler": (
        str.lower,
        "what draws Generate's tokens: native (in C; rows with a repetition penalty on the "
        "sampler graph), graph (onnxruntime), numpy, or auto (native on the CPU where it was "
        "built, else graph)",
    ),
    "batching": (_parse_bool, "gather concurrent requests into one onnxruntime run per step"),
    "max_step_ms": (
        float,
        "step-time budget in ms: a step advances as many Generate streams as fit in it, the "
        "others take turns; next-token work (PredictNext, typing, Score, prompts) never waits",
    ),
    "max_batch_size": (
        int,
        "at most this many Generate streams advance in one step, the others taking turns (no "
        "longer a slot pool: nothing waits for a slot; default: --max-step-ms alone decides)",
    ),
    "batch_threads": (
        int,
        "threads per model, each stepping its own batch, so that one's onnxruntime run "
        "overlaps another's sampling (1: one batch)",
    ),
    "engine_process": (
        _parse_bool,
        "run each model's engine core (scheduler, steps, onnxruntime) in a process of its own, "
        "beside this gRPC process (docs/performance.md, the engine core in its own process)",
    ),
    "max_queue_wait_ms": (float, "how long a step may wait to fill a batch, in ms"),
    "max_queued": (int, "queued requests per model beyond which calls get RESOURCE_EXHAUSTED"),
    "stream_tokens": (int, "under load, Generate tokens sent per response message (1: one each)"),
    "stream_ms": (
        float,
        "under load, the longest a Generate token waits for others to share its message, in ms",
    ),
    "state_cache_mb": (
        float,
        "state cache size per model, in MiB (a quarter of it holds the continuous cache's "
        "features for models that have one)",
    ),
    "max_tokens": (int, "cap on a Generate request's max_tokens"),
    "max_prompt_tokens": (int, "cap on prompt and context length, in tokens"),
    "max_text_chars": (
        int,
        "cap on a request's text in characters (prompt, context, a typing session's context, "
        "a Score or Embed call's texts in all)",
    ),
    "max_message_bytes": (
        int,
        "largest gRPC message accepted or sent (calls whose reply would be larger are refused)",
    ),
    "grace_seconds": (float, "on SIGTERM/SIGINT, how long in-flight calls may take to finish"),
    "max_connection_age_seconds": (
        float,
        "send GOAWAY to a client connection this old (give or take 10%%), so long-lived "
        "channels reconnect and spread over new replicas; 0 is off",
    ),
    "max_connection_age_grace_seconds": (
        float,
        "how long calls on a connection past its age may go on before it is closed; "
        "0 is as long as they take",
    ),
    "log_level": (str.lower, "debug, info, warning or error"),
    "reload_seconds": (
        float,
        "poll the model repository for new or changed bundles every this many seconds; "
        "0 is off (SIGHUP reloads either way)",
    ),
    "strict_models": (
        _parse_bool,
        "refuse to start unless every bundle in the model repository loads (default: serve "
        "the bundles that load, and log, count and report the others)",
    ),
    "tls_cert": (Path, "serve TLS with this PEM certificate chain (needs --tls-key)"),
    "tls_key": (Path, "the PEM private key of --tls-cert"),
    "tls_client_ca": (
        Path,
        "require client certificates signed by these PEM CA certificates (mutual TLS)",
    ),
    "health_port": (
        int,
        "also serve only grpc.health.v1, in plaintext, on this port: for probes that cannot "
        "speak TLS, such as the kubelet's (default: off)",
    ),
    "auth_token_file": (
        Path,
        "require `authorization: Bearer <token>` on every call but health and reflection; "
        "the file has one token per line",
    ),
    "state_token_key_file": (
        Path,
        "enable portable state tokens, signed with the first key in this file (one per line; "
        "all of them verify); replicas that resume each other's tokens share it",
    ),
    "word_search_width": (
        int,
        "hypotheses the next-word search of character and BPE models keeps per round",
    ),
    "word_search_depth": (int, "the most pieces (characters, subwords) a searched word has"),
    "word_search_ms": (
        float,
        "a next-word search stops after the round that passes this many milliseconds",
    ),
    "blocklist": (
        Path,
        "words never suggested by any model (one a line, UTF-8; '#' starts a comment), on top "
        "of each bundle's own blocklist",
    ),
    "user_word_boost": (
        float,
        "a user word (PredictNext/TypingEvent user_words) that matches is suggested with its "
        "probability multiplied by this",
    ),
    "user_word_floor": (
        float,
        "... after raising that probability to at least this (a word the model did not find)",
    ),
    "word_cache": (
        _parse_bool,
        "mix the word cache (the words of the text before the cursor, docs/typing.md) into "
        "TypingSession suggestions when an event does not say (word_cache); a PredictNext "
        "gets it only when it asks",
    ),
    "word_cache_weight": (float, "the word cache's share of a suggestion's probability"),
    "word_cache_decay": (
        float,
        "a word in the text counts this power of the number of words after it in the cache",
    ),
    "word_cache_bigram": (
        float,
        "the word cache's share given to the words that followed the text's last word before",
    ),
    "typing_selection": (
        str,
        "which words TypingSession suggests when an event does not say (selection): the "
        "likeliest, or those that save a typist the most keys (docs/typing.md#fewest-keys)",
    ),
}


# The options whose values are one of a few names.
_CHOICES = {
    "provider": PROVIDERS,
    "log_level": LOG_LEVELS,
    "sampler": SAMPLERS,
    "typing_selection": SELECTIONS,
    "front_end": FRONT_ENDS,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option; unset flags stay None so the environment can fill them in."""
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    for name, (_, help_) in _OPTIONS.items():
        default = defaults.get(name)
        shown = (
            ""
            if name in ("models", "default_model") or default is None
            else (f" (default: {default})")
        )
        text = f"{help_}{shown}; env {env_name(name)}"
        if name in ("batching", "strict_models", "engine_process", "word_cache"):
            parser.add_argument(
                _flag(name), action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif name in _CHOICES:
            choices = _CHOICES[name]
            parser.add_argument(_flag(name), choices=choices, default=None, help=text)
        else:
            kind = _OPTIONS[name][0]
            parser.add_argument(_flag(name), type=kind, default=None, help=text)


def config_to_json(config: ServerConfig) -> str:
    """The configuration as JSON, which `config_from_json` reads back (a worker's settings)."""
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def config_from_json(text: str) -> ServerConfig:
    values: dict[str, Any] = json.loads(text)
    for name, value in values.items():
        if isinstance(value, str) and _OPTIONS[name][0] is Path:
            values[name] = Path(value)
    return ServerConfig(**values)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Flags, then `RNNLM_*` environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (parse, _) in _OPTIONS.items():
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name] = flag_value
            continue
        raw = environ.get(env_name(name))
        if raw is None or raw == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise ConfigError(f"{env_name(name)}={raw!r}: {e}") from e
    if "models" not in values:
        raise ConfigError(f"--models (or {env_name('models')}) is required: the model repository")
    return ServerConfig(**values)
