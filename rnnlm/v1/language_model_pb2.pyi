from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_LAST: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]

class Selection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_UNSPECIFIED: _ClassVar[Selection]
    SELECTION_LIKELIEST: _ClassVar[Selection]
    SELECTION_FEWEST_KEYS: _ClassVar[Selection]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
POOLING_UNSPECIFIED: Pooling
POOLING_LAST: Pooling
POOLING_MEAN: Pooling
POOLING_MAX: Pooling
SELECTION_UNSPECIFIED: Selection
SELECTION_LIKELIEST: Selection
SELECTION_FEWEST_KEYS: Selection

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("alternatives",)
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, alternatives: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "model_version", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop", "top_logprobs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_logprobs: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs", "top_logprobs", "finish_reason", "prompt_tokens", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class PredictNextRequest(_message.Message):
    __slots__ = ("model", "model_version", "context", "k", "partial_word", "state_token", "return_state_token", "continuous_cache", "fold_case", "blocked_words", "user_words", "next_tokens", "word_cache", "selection")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_WORD_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_CACHE_FIELD_NUMBER: _ClassVar[int]
    FOLD_CASE_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_WORDS_FIELD_NUMBER: _ClassVar[int]
    USER_WORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORD_CACHE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    context: str
    k: int
    partial_word: str
    state_token: bytes
    return_state_token: bool
    continuous_cache: bool
    fold_case: bool
    blocked_words: _containers.RepeatedScalarFieldContainer[str]
    user_words: _containers.RepeatedScalarFieldContainer[str]
    next_tokens: bool
    word_cache: bool
    selection: Selection
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., context: _Optional[str] = ..., k: _Optional[int] = ..., partial_word: _Optional[str] = ..., state_token: _Optional[bytes] = ..., return_state_token: _Optional[bool] = ..., continuous_cache: _Optional[bool] = ..., fold_case: _Optional[bool] = ..., blocked_words: _Optional[_Iterable[str]] = ..., user_words: _Optional[_Iterable[str]] = ..., next_tokens: _Optional[bool] = ..., word_cache: _Optional[bool] = ..., selection: _Optional[_Union[Selection, str]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("token", "token_id", "probability", "token_ids")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    probability: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., probability: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictNextResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "context_tokens", "state_token", "words", "model_steps")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STEPS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    context_tokens: int
    state_token: bytes
    words: bool
    model_steps: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., context_tokens: _Optional[int] = ..., state_token: _Optional[bytes] = ..., words: _Optional[bool] = ..., model_steps: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "model_version", "texts", "return_token_logprobs", "continuous_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    return_token_logprobs: bool
    continuous_cache: bool
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., return_token_logprobs: _Optional[bool] = ..., continuous_cache: _Optional[bool] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("log_prob", "num_tokens", "perplexity", "token_logprobs")
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    log_prob: float
    num_tokens: int
    perplexity: float
    token_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, log_prob: _Optional[float] = ..., num_tokens: _Optional[int] = ..., perplexity: _Optional[float] = ..., token_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "model_version", "texts", "pooling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    pooling: Pooling
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "num_tokens")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dimension", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimension: int
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimension: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class TypingEvent(_message.Message):
    __slots__ = ("model", "model_version", "text", "reset", "partial_word", "k", "state_token", "return_state_token", "continuous_cache", "fold_case", "blocked_words", "user_words", "word_cache", "selection")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_WORD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_CACHE_FIELD_NUMBER: _ClassVar[int]
    FOLD_CASE_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_WORDS_FIELD_NUMBER: _ClassVar[int]
    USER_WORDS_FIELD_NUMBER: _ClassVar[int]
    WORD_CACHE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    text: str
    reset: bool
    partial_word: str
    k: int
    state_token: bytes
    return_state_token: bool
    continuous_cache: bool
    fold_case: bool
    blocked_words: _containers.RepeatedScalarFieldContainer[str]
    user_words: _containers.RepeatedScalarFieldContainer[str]
    word_cache: bool
    selection: Selection
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., text: _Optional[str] = ..., reset: _Optional[bool] = ..., partial_word: _Optional[str] = ..., k: _Optional[int] = ..., state_token: _Optional[bytes] = ..., return_state_token: _Optional[bool] = ..., continuous_cache: _Optional[bool] = ..., fold_case: _Optional[bool] = ..., blocked_words: _Optional[_Iterable[str]] = ..., user_words: _Optional[_Iterable[str]] = ..., word_cache: _Optional[bool] = ..., selection: _Optional[_Union[Selection, str]] = ...) -> None: ...

class Suggestions(_message.Message):
    __slots__ = ("predictions", "context_tokens", "state_token", "words", "model_steps")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STEPS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    context_tokens: int
    state_token: bytes
    words: bool
    model_steps: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., context_tokens: _Optional[int] = ..., state_token: _Optional[bytes] = ..., words: _Optional[bool] = ..., model_steps: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("cell", "layers", "hidden", "embedding", "vocab_size", "tied")
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIED_FIELD_NUMBER: _ClassVar[int]
    cell: str
    layers: int
    hidden: int
    embedding: int
    vocab_size: int
    tied: bool
    def __init__(self, cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., embedding: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tied: _Optional[bool] = ...) -> None: ...

class Quality(_message.Message):
    __slots__ = ("valid_perplexity", "test_perplexity", "tokens_seen", "corpus_sha256")
    VALID_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TEST_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    valid_perplexity: float
    test_perplexity: float
    tokens_seen: int
    corpus_sha256: str
    def __init__(self, valid_perplexity: _Optional[float] = ..., test_perplexity: _Optional[float] = ..., tokens_seen: _Optional[int] = ..., corpus_sha256: _Optional[str] = ...) -> None: ...

class ContinuousCache(_message.Message):
    __slots__ = ("window", "theta", "mixture_weight", "valid_perplexity", "test_perplexity")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALID_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TEST_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    window: int
    theta: float
    mixture_weight: float
    valid_perplexity: float
    test_perplexity: float
    def __init__(self, window: _Optional[int] = ..., theta: _Optional[float] = ..., mixture_weight: _Optional[float] = ..., valid_perplexity: _Optional[float] = ..., test_perplexity: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "is_default", "architecture", "tokenizer_kind", "vocab_size", "provider", "precision", "quality", "eos_token_id", "continuous_cache")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_CACHE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    is_default: bool
    architecture: Architecture
    tokenizer_kind: str
    vocab_size: int
    provider: str
    precision: str
    quality: Quality
    eos_token_id: int
    continuous_cache: ContinuousCache
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., is_default: _Optional[bool] = ..., architecture: _Optional[_Union[Architecture, _Mapping]] = ..., tokenizer_kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., provider: _Optional[str] = ..., precision: _Optional[str] = ..., quality: _Optional[_Union[Quality, _Mapping]] = ..., eos_token_id: _Optional[int] = ..., continuous_cache: _Optional[_Union[ContinuousCache, _Mapping]] = ...) -> None: ...
