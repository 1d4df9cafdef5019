"""`rnnlm generate | predict | score | models`: call a running server from the command line.

Output is for people by default and one JSON object per line with `--json`. A failed call prints
one line, `rnnlm COMMAND: CODE: message`, on stderr and exits with 1; bad options exit with 2.
Servers with TLS take `--tls-ca` (or `--tls` for the system's CAs), with client certificates
also `--tls-cert` and `--tls-key`, and with bearer tokens `--token` (or `$RNNLM_TOKEN`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from rnnlm.client import DEFAULT_TARGET, Client
from rnnlm.v1 import language_model_pb2 as pb

# Shown for an empty or whitespace-only token so that tables stay readable.
_VISIBLE = {"\n": "\\n", "\t": "\\t", " ": "␣"}


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("RNNLM_TARGET", DEFAULT_TARGET),
        help=f"server address HOST:PORT (default: $RNNLM_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print JSON, one object per line")
    security = parser.add_argument_group("TLS and authentication")
    security.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CA certificates"
    )
    security.add_argument(
        "--tls-ca",
        type=Path,
        default=_env_path("RNNLM_TLS_CA"),
        help="use TLS, trusting the CA certificates in this PEM file (default: $RNNLM_TLS_CA)",
    )
    security.add_argument(
        "--tls-cert", type=Path, help="client certificate (PEM) for servers that require one"
    )
    security.add_argument("--tls-key", type=Path, help="the private key (PEM) of --tls-cert")
    security.add_argument(
        "--tls-server-name", help="the name in the server's certificate, if not the target's host"
    )
    security.add_argument(
        "--token",
        default=os.environ.get("RNNLM_TOKEN") or None,
        help="bearer token sent with every call (default: $RNNLM_TOKEN)",
    )
    if name == "models":
        return
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--model-version", default="", help="model version (default: newest)")
    if name == "generate":
        parser.add_argument("prompt", nargs="?", default="", help="text to continue")
        parser.add_argument("--max-tokens", type=int, default=None, help="tokens to generate")
        parser.add_argument("--temperature", type=float, default=None, help="0 is greedy")
        parser.add_argument("--top-k", type=int, default=0, help="0 is off")
        parser.add_argument("--top-p", type=float, default=None, help="nucleus, in (0, 1]")
        parser.add_argument("--min-p", type=float, default=0.0, help="in [0, 1); 0 is off")
        parser.add_argument("--repetition-penalty", type=float, default=None, help="> 0")
        parser.add_argument("--seed", type=int, default=None, help="same seed, same text")
        parser.add_argument(
            "--stop", action="append", default=[], help="stop at this string (repeatable)"
        )
    elif name == "predict":
        parser.add_argument("context", nargs="?", default="", help="the text typed so far")
        parser.add_argument("-k", "--k", type=int, default=10, help="number of predictions")
        parser.add_argument("--partial-word", default="", help="letters typed of the next word")
        parser.add_argument(
            "--continuous-cache",
            action="store_true",
            help="mix in the model's continuous cache (a recall of the context's own words)",
        )
    elif name == "score":
        parser.add_argument("texts", nargs="*", help="texts to score, each on its own")
        parser.add_argument(
            "--file",
            type=Path,
            action="append",
            default=[],
            help="score a whole file as one text (repeatable)",
        )
        parser.add_argument(
            "--token-logprobs", action="store_true", help="also show each token's log-prob"
        )
        parser.add_argument(
            "--continuous-cache",
            action="store_true",
            help="mix in the model's continuous cache (a recall of the text's own earlier words)",
        )
    else:
        raise ValueError(f"unknown client command {name!r}")


def run(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[Client, argparse.Namespace], None]] = {
        "generate": _generate,
        "predict": _predict,
        "score": _score,
        "models": _models,
    }
    if (args.tls_cert is None) != (args.tls_key is None):
        print(f"rnnlm {args.command}: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        with Client(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token=args.token,
        ) as client:
            commands[args.command](client, args)
    except grpc.RpcError as e:
        print(f"rnnlm {args.command}: {_error_line(e, args.target)}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as e:
        print(f"rnnlm {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _error_line(error: grpc.RpcError, target: str) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    name = code.name if code is not None else "ERROR"
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"{details} (is a server running at {target}? does it need --tls-ca?)"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        details = f"{details} (give --token or set RNNLM_TOKEN)"
    return f"{name}: {details}"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _print_json(message: Message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True)), flush=True)


def _visible(token: str) -> str:
    return _VISIBLE.get(token, token.replace("\n", "\\n"))


def _generate(client: Client, args: argparse.Namespace) -> None:
    stream = client.generate(
        args.prompt,
        model=args.model,
        model_version=args.model_version,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    try:
        text = ""
        for chunk in stream:
            if args.json:
                _print_json(chunk)
                continue
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            text += chunk.text
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                if not text.endswith("\n"):
                    sys.stdout.write("\n")
                reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_")
                print(
                    f"[{reason.lower()}: {chunk.prompt_tokens} prompt tokens, "
                    f"{chunk.completion_tokens} generated]",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        stream.cancel()
        raise


def _predict(client: Client, args: argparse.Namespace) -> None:
    response = client.predict_next(
        args.context,
        k=args.k,
        partial_word=args.partial_word,
        continuous_cache=args.continuous_cache,
        model=args.model,
        model_version=args.model_version,
    )
    if args.json:
        _print_json(response)
        return
    for p in response.predictions:
        print(f"{p.probability:8.4f}  {_visible(p.token)}")


def _score(client: Client, args: argparse.Namespace) -> None:
    texts = list(args.texts) + [path.read_text(encoding="utf-8") for path in args.file]
    labels = list(args.texts) + [str(path) for path in args.file]
    response = client.score(
        texts,
        return_token_logprobs=args.token_logprobs,
        continuous_cache=args.continuous_cache,
        model=args.model,
        model_version=args.model_version,
    )
    if args.json:
        _print_json(response)
        return
    print(f"{'perplexity':>12}  {'log_prob':>12}  {'tokens':>7}  text")
    for label, result in zip(labels, response.results, strict=True):
        shown = label if len(label) <= 50 else label[:47] + "..."
        print(
            f"{result.perplexity:12.4f}  {result.log_prob:12.4f}  {result.num_tokens:7d}  "
            f"{_visible(shown)}"
        )
        for t in result.token_logprobs:
            print(f"{'':12}  {t.logprob:12.4f}  {'':7}    {_visible(t.token)}")


def _models(client: Client, args: argparse.Namespace) -> None:
    models = client.list_models()
    if args.json:
        for m in models:
            _print_json(m)
        return
    rows: list[tuple[Any, ...]] = [
        (
            "name",
            "version",
            "cell",
            "layers",
            "hidden",
            "vocab",
            "tokenizer",
            "provider",
            "cache",
            "",
        )
    ]
    for m in models:
        a = m.architecture
        rows.append(
            (
                m.name,
                m.version,
                a.cell,
                a.layers,
                a.hidden,
                m.vocab_size,
                m.tokenizer_kind,
                m.provider,
                "yes" if m.HasField("continuous_cache") else "-",
                "default" if m.is_default else "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(f"{v!s:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
