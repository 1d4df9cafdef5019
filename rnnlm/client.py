"""A small synchronous Python client for an rnnlm server (grpcio and the generated code only).

    from rnnlm.client import Client

    with Client("localhost:50051") as client:
        for chunk in client.generate("the cat", max_tokens=20, seed=1):
            print(chunk.text, end="", flush=True)
        print()
        for p in client.predict_next("the", k=3).predictions:
            print(f"{p.probability:.3f} {p.token}")
        print(client.score("the cat sees the moon .").results[0].perplexity)

Methods return the API's protobuf messages (see proto/rnnlm/v1/language_model.proto); a failed
call raises `grpc.RpcError`, whose `code()` and `details()` say what went wrong.

A server started with TLS takes `tls_ca=` (the CA that signed its certificate; `tls=True` uses
the system's CAs), one that requires client certificates also `tls_cert=` and `tls_key=`, and
one that requires bearer tokens `token=`:

    Client("rnnlm.example.com:443", tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key",
           token=os.environ["RNNLM_TOKEN"])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
POOLINGS = {"last": pb.POOLING_LAST, "mean": pb.POOLING_MEAN, "max": pb.POOLING_MAX}


class Client:
    """One channel to a server. `timeout` (seconds) is the default deadline of every call.

    TLS is on when `tls` is true or any of `tls_ca`, `tls_cert` is given; `tls_ca` is a PEM
    file of the CAs to trust (default: the system's), `tls_cert` and `tls_key` the client's
    PEM certificate and key for servers that require client certificates (mutual TLS), and
    `tls_server_name` the name to expect in the server's certificate when it differs from the
    target's host (e.g. through a port-forward). `token` is sent as `authorization: Bearer`
    metadata with every call. Unreadable files raise OSError naming the file.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 16 * 2**20,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: a client certificate and its key")
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "tls_ca"),
                private_key=_read(tls_key, "tls_key"),
                certificate_chain=_read(tls_cert, "tls_cert"),
            )
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.LanguageModelStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self._timeout(timeout), "metadata": self._metadata}

    def generate(
        self,
        prompt: str = "",
        *,
        model: str = "",
        model_version: str = "",
        prompt_token_ids: Sequence[int] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        min_p: float = 0.0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        top_logprobs: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Stream a generation: an iterator of `GenerateResponse` as the tokens are made.

        The iterator also has `cancel()`, which stops the generation on the server. Unset
        options take the server's defaults (64 tokens, temperature 1, no top-p, no penalty).
        """
        request = pb.GenerateRequest(
            model=model,
            model_version=model_version,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            top_k=top_k,
            min_p=min_p,
            stop=list(stop),
            top_logprobs=top_logprobs,
        )
        optional: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        for field, value in optional.items():
            if value is not None:
                setattr(request, field, value)
        return self._stub.Generate(request, **self._options(timeout))

    def generate_text(self, prompt: str = "", **kwargs: Any) -> str:
        """The whole generated text of `generate` (same options)."""
        return "".join(chunk.text for chunk in self.generate(prompt, **kwargs))

    def predict_next(
        self,
        context: str = "",
        *,
        k: int = 5,
        partial_word: str = "",
        model: str = "",
        model_version: str = "",
        state_token: bytes = b"",
        return_state_token: bool = False,
        continuous_cache: bool = False,
        fold_case: bool | None = None,
        blocked_words: Sequence[str] = (),
        user_words: Sequence[str] = (),
        next_tokens: bool = False,
        word_cache: bool | None = None,
        fewest_keys: bool = False,
        timeout: float | None = None,
    ) -> pb.PredictNextResponse:
        """The k most likely next words after `context` (or tokens: `next_tokens`), most
        likely first.

        With `state_token` (from an earlier reply), `context` continues the token's context;
        `return_state_token` asks for a token for this request's context; `continuous_cache`
        mixes in the model's recall of the context's own words. `fold_case`, `blocked_words`,
        `user_words` and `word_cache` (None or False: the model's own probabilities): see
        PredictNextRequest. `fewest_keys`: the k words that save a typist the most keys
        instead of the k likeliest (`selection`).
        """
        request = pb.PredictNextRequest(
            model=model,
            model_version=model_version,
            context=context,
            k=k,
            partial_word=partial_word,
            state_token=state_token,
            return_state_token=return_state_token,
            continuous_cache=continuous_cache,
            fold_case=fold_case,
            blocked_words=blocked_words,
            user_words=user_words,
            next_tokens=next_tokens,
            word_cache=word_cache,
            selection=pb.SELECTION_FEWEST_KEYS if fewest_keys else pb.SELECTION_UNSPECIFIED,
        )
        return self._stub.PredictNext(request, **self._options(timeout))

    def score(
        self,
        texts: str | Sequence[str],
        *,
        return_token_logprobs: bool = False,
        continuous_cache: bool = False,
        model: str = "",
        model_version: str = "",
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        """Log-probability, token count and perplexity of each text (a str is one text);
        `continuous_cache` mixes in the model's recall of each text's own earlier words."""
        request = pb.ScoreRequest(
            model=model,
            model_version=model_version,
            texts=[texts] if isinstance(texts, str) else list(texts),
            return_token_logprobs=return_token_logprobs,
            continuous_cache=continuous_cache,
        )
        return self._stub.Score(request, **self._options(timeout))

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        pooling: str = "mean",
        model: str = "",
        model_version: str = "",
        timeout: float | None = None,
    ) -> pb.EmbedResponse:
        """A sentence encoding per text; `pooling` is "last", "mean" or "max"."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        request = pb.EmbedRequest(
            model=model,
            model_version=model_version,
            texts=[texts] if isinstance(texts, str) else list(texts),
            pooling=POOLINGS[pooling],
        )
        return self._stub.Embed(request, **self._options(timeout))

    def typing_session(
        self, events: Iterable[pb.TypingEvent], *, timeout: float | None = None
    ) -> Iterator[pb.Suggestions]:
        """One `Suggestions` per `TypingEvent`, over one stream that keeps the context."""
        return self._stub.TypingSession(iter(events), **self._options(timeout))

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        response = self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout))
        return list(response.models)

    def get_model(
        self, name: str = "", version: str = "", *, timeout: float | None = None
    ) -> pb.ModelInfo:
        """A loaded model version; empty `name` is the default model, empty `version` the newest."""
        request = pb.GetModelRequest(name=name, version=version)
        return self._stub.GetModel(request, **self._options(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), **self._options(timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _read(path: str | Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{name} {path}: cannot read the file ({e.strerror or e})") from e
