"""`rnnlm generate | predict | score | embed | models`: call a running server from the command line.

Output is for people by default and one JSON object per line with `--json`. A failed call prints
one line, `rnnlm COMMAND: CODE: message`, on stderr and exits with 1; bad options exit with 2.
Servers with TLS take `--tls-ca` (or `--tls` for the system's CAs), with client certificates
also `--tls-cert` and `--tls-key`, and with bearer tokens `--token` (or `$RNNLM_TOKEN`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from rnnlm.client import DEFAULT_TARGET, POOLINGS, Client
from rnnlm.v1 import language_model_pb2 as pb

# Shown for an empty or whitespace-only token so that tables stay readable.
_VISIBLE = {"\n": "\\n", "\t": "\\t", " ": "␣"}
# `rnnlm embed` shows this many values of each vector (all of them with --json).
_EMBED_SHOWN = 6


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
    options = _COMMAND_OPTIONS.get(name)
    if options is None:
        raise ValueError(f"unknown client command {name!r}")
    options(parser)


def _generate_options(parser: argparse.ArgumentParser) -> None:
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


def _predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("context", nargs="?", default="", help="the text typed so far")
    parser.add_argument("-k", "--k", type=int, default=10, help="number of predictions")
    parser.add_argument("--partial-word", default="", help="letters typed of the next word")
    parser.add_argument(
        "--continuous-cache",
        action="store_true",
        help="mix in the model's continuous cache (a recall of the context's own words)",
    )
    parser.add_argument(
        "--fold-case",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="match --partial-word ignoring case and accents (default: the model's; on for "
        "character and BPE models)",
    )
    parser.add_argument(
        "--block", action="append", default=[], metavar="WORD", help="never suggest WORD"
    )
    parser.add_argument(
        "--user-word", action="append", default=[], metavar="WORD", help="favour WORD"
    )
    parser.add_argument(
        "--next-tokens",
        action="store_true",
        help="show a character or BPE model's next tokens instead of whole words",
    )
    parser.add_argument(
        "--word-cache",
        action="store_true",
        help="make the words already in the context likelier (the word cache, docs/typing.md)",
    )
    parser.add_argument(
        "--fewest-keys",
        action="store_true",
        help="show the words that save a typist the most keys, not the likeliest "
        "(docs/typing.md#fewest-keys)",
    )


def _text_options(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("texts", nargs="*", help=f"texts to {verb}, each on its own")
    parser.add_argument(
        "--file",
        type=Path,
        action="append",
        default=[],
        help=f"{verb} a whole file as one text (repeatable)",
    )


def _score_options(parser: argparse.ArgumentParser) -> None:
    _text_options(parser, "score")
    parser.add_argument(
        "--token-logprobs", action="store_true", help="also show each token's log-prob"
    )
    parser.add_argument(
        "--continuous-cache",
        action="store_true",
        help="mix in the model's continuous cache (a recall of the text's own earlier words)",
    )


def _embed_options(parser: argparse.ArgumentParser) -> None:
    _text_options(parser, "encode")
    parser.add_argument(
        "--pooling",
        choices=tuple(POOLINGS),
        default="mean",
        help="how each token's features become the text's vector (default: mean)",
    )


_COMMAND_OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "generate": _generate_options,
    "predict": _predict_options,
    "score": _score_options,
    "embed": _embed_options,
}


def run(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[Client, argparse.Namespace], None]] = {
        "generate": _generate,
        "predict": _predict,
        "score": _score,
        "embed": _embed,
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
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        return _reader_gone()
    except grpc.RpcError as e:
        print(f"rnnlm {args.command}: {_error_line(e, args.target)}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as e:
        print(f"rnnlm {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _reader_gone() -> int:
    """The reader of stdout went away (`rnnlm score ... | head`): stop quietly, as a command
    killed by SIGPIPE would, with nothing left to flush into the closed pipe at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


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
        fold_case=args.fold_case,
        blocked_words=args.block,
        user_words=args.user_word,
        next_tokens=args.next_tokens,
        word_cache=args.word_cache,
        fewest_keys=args.fewest_keys,
        model=args.model,
        model_version=args.model_version,
    )
    if args.json:
        _print_json(response)
        return
    for p in response.predictions:
        print(f"{p.probability:8.4f}  {_visible(p.token)}")


def _texts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The texts of `score` and `embed` (the arguments, then each --file whole) and how each
    is shown: itself, or the file's name."""
    texts = list(args.texts) + [path.read_text(encoding="utf-8") for path in args.file]
    labels = list(args.texts) + [str(path) for path in args.file]
    return texts, labels


def _label(text: str) -> str:
    return _visible(text if len(text) <= 50 else text[:47] + "...")


def _score(client: Client, args: argparse.Namespace) -> None:
    texts, labels = _texts(args)
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
        print(
            f"{result.perplexity:12.4f}  {result.log_prob:12.4f}  {result.num_tokens:7d}  "
            f"{_label(label)}"
        )
        for t in result.token_logprobs:
            print(f"{'':12}  {t.logprob:12.4f}  {'':7}    {_visible(t.token)}")


def _embed(client: Client, args: argparse.Namespace) -> None:
    texts, labels = _texts(args)
    response = client.embed(
        texts, pooling=args.pooling, model=args.model, model_version=args.model_version
    )
    if args.json:
        _print_json(response)
        return
    shown = min(_EMBED_SHOWN, response.dimension)
    title = f"values (first {shown} of {response.dimension})"
    width = max(len(title), 8 * shown - 1)  # each value is "+0.1234" and a space
    print(f"{'tokens':>7}  {'norm':>9}  {title:<{width}}  text")
    for label, embedding in zip(labels, response.embeddings, strict=True):
        values = list(embedding.values)
        norm = math.sqrt(sum(v * v for v in values))
        head = " ".join(f"{v:+.4f}" for v in values[:shown])
        print(f"{embedding.num_tokens:7d}  {norm:9.4f}  {head:<{width}}  {_label(label)}")


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
