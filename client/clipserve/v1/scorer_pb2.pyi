from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "query", "image_url", "image_bytes", "query_id", "image_id", "image_sha256", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    query: str
    image_url: str
    image_bytes: bytes
    query_id: str
    image_id: str
    image_sha256: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., query: _Optional[str] = ..., image_url: _Optional[str] = ..., image_bytes: _Optional[bytes] = ..., query_id: _Optional[str] = ..., image_id: _Optional[str] = ..., image_sha256: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    reason: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "query_id", "image_id", "score", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    query_id: str
    image_id: str
    score: float
    error: ItemError
    def __init__(self, request_id: _Optional[str] = ..., query_id: _Optional[str] = ..., image_id: _Optional[str] = ..., score: _Optional[float] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "text", "image_url", "image_bytes", "raw", "image_sha256", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    image_url: str
    image_bytes: bytes
    raw: bool
    image_sha256: str
    model: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., image_url: _Optional[str] = ..., image_bytes: _Optional[bytes] = ..., raw: _Optional[bool] = ..., image_sha256: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "embedding", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    error: ItemError
    def __init__(self, request_id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ScoreRequestChunk(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreResponseChunk(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...

class EmbedRequestChunk(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EmbedRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[EmbedRequest, _Mapping]]] = ...) -> None: ...

class EmbedResponseChunk(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EmbedResponse]
    def __init__(self, items: _Optional[_Iterable[_Union[EmbedResponse, _Mapping]]] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("capacity", "entries", "hits", "misses", "hit_rate")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    entries: int
    hits: int
    misses: int
    hit_rate: float
    def __init__(self, capacity: _Optional[int] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "device", "dtype", "embedding_dim", "logit_scale", "logit_bias", "max_text_tokens", "max_batch_size", "max_batch_delay_ms", "text_cache", "image_cache", "server_version", "compiled", "normalized", "replica", "name", "backend", "text_model_id", "instances", "image_runtime", "text_runtime")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CACHE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TEXT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TEXT_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    device: str
    dtype: str
    embedding_dim: int
    logit_scale: float
    logit_bias: float
    max_text_tokens: int
    max_batch_size: int
    max_batch_delay_ms: float
    text_cache: CacheStats
    image_cache: CacheStats
    server_version: str
    compiled: bool
    normalized: bool
    replica: str
    name: str
    backend: str
    text_model_id: str
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    image_runtime: str
    text_runtime: str
    def __init__(self, model_id: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., logit_scale: _Optional[float] = ..., logit_bias: _Optional[float] = ..., max_text_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., text_cache: _Optional[_Union[CacheStats, _Mapping]] = ..., image_cache: _Optional[_Union[CacheStats, _Mapping]] = ..., server_version: _Optional[str] = ..., compiled: _Optional[bool] = ..., normalized: _Optional[bool] = ..., replica: _Optional[str] = ..., name: _Optional[str] = ..., backend: _Optional[str] = ..., text_model_id: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ..., image_runtime: _Optional[str] = ..., text_runtime: _Optional[str] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("device", "index", "forwards", "items", "busy_seconds", "alive")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    device: str
    index: int
    forwards: int
    items: int
    busy_seconds: float
    alive: bool
    def __init__(self, device: _Optional[str] = ..., index: _Optional[int] = ..., forwards: _Optional[int] = ..., items: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., alive: _Optional[bool] = ...) -> None: ...
