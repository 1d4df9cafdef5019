"""What the server says of a model version (`ListModels`, `GetModel`): its manifest's
architecture, tokenizer, quality and continuous cache, and where it runs."""

from __future__ import annotations

from rnnlm.v1 import language_model_pb2 as pb
from server.bundle import Bundle
from server.repository import LoadedModel


def model_info(model: LoadedModel, is_default: bool) -> pb.ModelInfo:
    """What `ListModels` and `GetModel` say of a loaded model version."""
    b = model.bundle
    arch = b.manifest.get("architecture", {})
    prov = b.manifest.get("provenance", {})
    return pb.ModelInfo(
        name=b.name,
        version=b.version,
        is_default=is_default,
        architecture=pb.Architecture(
            cell=b.cell,
            layers=b.layers,
            hidden=b.hidden,
            embedding=int(arch.get("embedding") or 0),
            vocab_size=b.vocab_size,
            tied=bool(arch.get("tied")),
        ),
        tokenizer_kind=b.tokenizer_kind,
        vocab_size=b.vocab_size,
        provider=model.provider,
        precision=b.precision,
        quality=pb.Quality(
            valid_perplexity=float(prov.get("valid_perplexity") or 0.0),
            test_perplexity=float(prov.get("test_perplexity") or 0.0),
            tokens_seen=int(prov.get("tokens_seen") or 0),
            corpus_sha256=str(prov.get("corpus_sha256") or ""),
        ),
        eos_token_id=b.eos_id,
        continuous_cache=_cache_info(b),
    )


def _cache_info(bundle: Bundle) -> pb.ContinuousCache | None:
    params = bundle.continuous_cache
    if params is None:
        return None
    block = bundle.manifest["continuous_cache"]

    def figure(key: str) -> float:  # informative in the manifest: 0 unless a number
        value = block.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    return pb.ContinuousCache(
        window=params.window,
        theta=params.theta,
        mixture_weight=params.lam,
        valid_perplexity=figure("valid_perplexity"),
        test_perplexity=figure("test_perplexity"),
    )
