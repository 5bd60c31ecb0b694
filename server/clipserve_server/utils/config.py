"""Server configuration: one frozen ``ServerConfig``, read once at start-up (by
``clipserve_server.config_loaders``: defaults < config files < ``CLIPSERVE_*`` env < flags) and
handed to the components; nothing reads the environment at import time or later. Its
``__post_init__`` checks and normalises it, however it was built.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from clipserve._wire import DEFAULT_MAX_IMAGE_BYTES

DTYPES = ("float32", "float16", "bfloat16", "auto")
DECODE_POOLS = ("auto", "threads", "processes")
# What runs the towers' forward (models/runtimes/): auto = openvino on CPU when installed, else torch.
RUNTIMES = ("auto", "torch", "openvino", "cuda-graphs", "tensorrt")
# --stream-max-in-flight 0: this many batches of --max-batch-size per stream, at least MIN_STREAM_WINDOW.
STREAM_WINDOW_BATCHES = 4
MIN_STREAM_WINDOW = 256
# --max-queue-size 0: room for two streams' windows, at least MIN_QUEUE_SIZE.
QUEUE_WINDOWS = 2
MIN_QUEUE_SIZE = 1024
# Download statuses that say "not now" rather than "no" (images/retry.py retries them), and the
# longest wait between two attempts without a Retry-After: written here, in the bottom layer, so
# that --help says what the fetcher does.
FETCH_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
FETCH_BACKOFF_CAP_S = 8.0
_RETRIED = "/".join(str(status) for status in sorted(FETCH_RETRY_STATUSES))
# --http-port auto: the HTTP face listens this far above the gRPC port.
HTTP_PORT_OFFSET = 1000

# NAME=VALUE in --model, --text-model, --pretrained (a name has no ':' or '/', so that neither
# a hub id nor "fake:forward_ms=30" reads as one).
_NAMED = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)", re.DOTALL)
DEFAULT_MODEL_NAME = "default"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name on this server and where it comes from."""

    name: str
    source: str  # hub id, local folder, open_clip:ARCH, or fake[:options]
    text_model: str = ""  # a separate (sentence-transformers) text tower, paired with the image tower of `source`
    pretrained: str = ""  # the weights file of an open_clip:ARCH source


def _named(entry: str) -> tuple[str, str]:
    match = _NAMED.fullmatch(entry.strip())
    return (match[1], match[2].strip()) if match else ("", entry.strip())


def model_specs(
    models: Sequence[str], text_models: Sequence[str] = (), pretrained: Sequence[str] = ()
) -> tuple[ModelSpec, ...]:
    """The models that ``--model [NAME=]SOURCE`` (repeatable), ``--text-model [NAME=]SOURCE``
    and ``--pretrained [NAME=]PATH`` describe; the last two go with the default model unless
    named. One unnamed model is called ``default``."""
    entries = [_named(entry) for entry in models]
    if not entries:
        raise ValueError("no --model given")
    if len(entries) > 1 and any(not name for name, _ in entries):
        raise ValueError("with several --model, give each a name: --model NAME=SOURCE")
    names = [name or DEFAULT_MODEL_NAME for name, _ in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--model names must differ: {', '.join(repeated)} given more than once")
    default = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in names else names[0]
    extras: dict[str, dict[str, str]] = {name: {} for name in names}
    for flag, values in (("text_model", text_models), ("pretrained", pretrained)):
        for entry in values:
            name, value = _named(entry)
            name = name or default
            if name not in extras:
                raise ValueError(
                    f"--{flag.replace('_', '-')} {entry}: no model is named {name!r} (models: {', '.join(names)})"
                )
            if flag in extras[name]:
                raise ValueError(f"--{flag.replace('_', '-')} given twice for the model {name!r}")
            extras[name][flag] = value
    return tuple(ModelSpec(name, source, **extras[name]) for name, (_, source) in zip(names, entries))


@dataclass(frozen=True)
class FetchHeader:
    """A request header for image hosts whose name matches ``pattern`` (fnmatch, case-insensitive)."""

    pattern: str
    name: str
    value: str = dataclasses.field(repr=False)  # a credential, as often as not: kept out of logs

    def matches(self, host: str) -> bool:
        return fnmatch.fnmatchcase(host.lower(), self.pattern.lower())


def fetch_headers(entries: Sequence[str]) -> tuple[FetchHeader, ...]:
    """``--fetch-header HOST_PATTERN=Name: value`` entries, read."""
    headers = []
    for entry in entries:
        pattern, sep, header = (part.strip() for part in entry.partition("="))
        name, colon, value = (part.strip() for part in header.partition(":"))
        pattern_ok = bool(sep and pattern) and not any(c in pattern for c in ": \t")
        if not (pattern_ok and colon and _HEADER_NAME.fullmatch(name)):
            # Nothing past a well-formed pattern is quoted back: it may be a secret.
            which = f"the entry for {pattern!r}" if pattern_ok else "an entry without a HOST_PATTERN="
            raise ValueError(
                "--fetch-header wants HOST_PATTERN=Name: value "
                f"(e.g. 'images.example.org=Authorization: Bearer ...'): {which} is not"
            )
        headers.append(FetchHeader(pattern, name, value))
    return tuple(headers)


@dataclass(frozen=True)
class ServerConfig:
    """Every knob of a running server. Field docs double as ``--help`` text."""

    model: tuple[str, ...] = dataclasses.field(
        default=("openai/clip-vit-base-patch32",),
        metadata={
            "help": (
                "[NAME=]SOURCE, repeatable: a hub id or local folder (transformers or open_clip), open_clip:ARCH "
                "with --pretrained, or 'fake:forward_ms=N' (the stand-in model for tests and benchmarks); "
                "the model named 'default', else the first, answers requests that name none"
            )
        },
    )
    text_model: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": (
                "[NAME=]SOURCE: a sentence-transformers text model (hub id or folder) "
                "paired with the image tower of the model NAME (default: the default model)"
            )
        },
    )
    pretrained: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "[NAME=]PATH: the weights of an open_clip:ARCH model"}
    )
    memory_budget_gb: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "refuse to start when the models' weights need more than this many GiB (0: the device's memory)"
        },
    )
    device: str = dataclasses.field(
        default="auto",
        metadata={
            "help": (
                "auto | cpu | cuda | cuda:N | cuda:all, or a comma-separated list (cuda:0,cuda:1): "
                "every model on each device, weights loaded once per device (auto: CUDA when available)"
            )
        },
    )
    instances: int = dataclasses.field(
        default=1,
        metadata={
            "help": (
                "forward workers per model per device, each on its own thread, fed by the model's one batcher: "
                "a batch goes to whichever is free, so forwards overlap (on CPU they share the cores)"
            )
        },
    )
    dtype: str = dataclasses.field(
        default="float32",
        metadata={
            "help": "float32 | float16 | bfloat16 | auto (auto: float16 on CUDA, float32 on CPU)",
            "choices": DTYPES,
        },
    )
    use_safetensors: bool | None = dataclasses.field(
        default=None, metadata={"help": "require safetensors weights (default: prefer them)"}
    )
    compile: bool = dataclasses.field(
        default=False,
        metadata={
            "help": (
                "run the image tower through torch.compile: about a quarter faster per image on CPU; start-up "
                "takes 20-60 s longer and needs a C++ compiler; implies --runtime torch (auto picks torch with it)"
            )
        },
    )
    runtime: str = dataclasses.field(
        default="auto",
        metadata={
            "help": (
                "what runs the image and text towers: auto | torch | openvino | cuda-graphs | tensorrt "
                "(auto: OpenVINO on CPU when installed, else torch); "
                "a tower that does not convert, or whose features differ from torch's by more than "
                "1e-4 relative (1e-2 in float16/bfloat16), runs in torch (one log line says why)"
            ),
            "choices": RUNTIMES,
        },
    )
    runtime_cache: str = dataclasses.field(
        default="",
        metadata={
            "help": (
                "folder for converted towers, reused by the next start of the same model (default: "
                "$XDG_CACHE_HOME/clipserve/runtimes, else ~/.cache/clipserve/runtimes; 'off': convert at every start)"
            )
        },
    )
    host: str = dataclasses.field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = dataclasses.field(default=50051, metadata={"help": "port to listen on (0: pick a free one)"})
    replica_name: str = dataclasses.field(
        default="",
        metadata={"help": "this server's name in GetModelInfo, to tell replicas apart (default: hostname:port)"},
    )
    max_batch_size: int = dataclasses.field(default=32, metadata={"help": "most texts+images per forward pass"})
    max_batch_delay_ms: float = dataclasses.field(
        default=5.0, metadata={"help": "longest wait for a batch to fill, from its first item"}
    )
    max_queue_size: int = dataclasses.field(
        default=0,
        metadata={
            "help": (
                "items waiting for the model before unary calls get RESOURCE_EXHAUSTED "
                f"(0: {QUEUE_WINDOWS * STREAM_WINDOW_BATCHES} x --max-batch-size, at least {MIN_QUEUE_SIZE})"
            )
        },
    )
    stream_max_in_flight: int = dataclasses.field(
        default=0,
        metadata={
            "help": (
                "items one stream (ScoreBatch, ScoreChunks, Embed, EmbedChunks) may have in progress before the "
                "server stops reading it; the SDK keeps that many outstanding "
                f"(0: {STREAM_WINDOW_BATCHES} x --max-batch-size, at least {MIN_STREAM_WINDOW})"
            )
        },
    )
    forward_timeout_s: float = dataclasses.field(
        default=300.0,
        metadata={
            "help": (
                "a forward pass running longer means the model is wedged: "
                "fail its items and turn NOT_SERVING (0: never)"
            )
        },
    )
    cache: bool = dataclasses.field(default=True, metadata={"help": "cache text and image embeddings"})
    text_cache_size: int = dataclasses.field(default=100_000, metadata={"help": "text embeddings kept (LRU)"})
    image_cache_size: int = dataclasses.field(default=50_000, metadata={"help": "image embeddings kept (LRU)"})
    text_cache_mb: int = dataclasses.field(
        default=256,
        metadata={
            "help": (
                "most MiB the text cache holds, keys and embeddings counted (LRU, beside --text-cache-size); "
                "a key is the query as the model reads it, cut to --max-query-chars"
            )
        },
    )
    max_query_chars: int = dataclasses.field(
        default=0,
        metadata={
            "help": (
                "a query is cut to this many characters before it is tokenized (characters the tokenizer drops, "
                "such as whitespace, not counted), so a huge query costs no more than one that fills the model's "
                "tokens (0: 64 x the model's max text tokens, which no query that fits in the tokens reaches)"
            )
        },
    )
    fetch_timeout_s: float = dataclasses.field(
        default=15.0, metadata={"help": "total seconds allowed to download one image"}
    )
    fetch_attempt_timeout_s: float = dataclasses.field(
        default=10.0,
        metadata={
            "help": (
                "longest one HTTP request of a download may take, connect to last byte; a request that "
                "runs out is retried while --fetch-timeout-s, the total, allows (0: no limit but the total)"
            )
        },
    )
    fetch_attempts: int = dataclasses.field(
        default=4,
        metadata={
            "help": "tries per image, the first included, after a transient failure "
            "(connect error, timeout, reset, HTTP "
            + _RETRIED
            + "); all within --fetch-timeout-s (1: never retry)"
        },
    )
    fetch_backoff_s: float = dataclasses.field(
        default=0.5,
        metadata={
            "help": (
                "wait before the first retry, doubling for each next one (jittered, "
                f"at most {FETCH_BACKOFF_CAP_S:g} s); a Retry-After header from the host replaces it"
            )
        },
    )
    fetch_host_connections: int = dataclasses.field(
        default=32,
        metadata={
            "help": (
                "most simultaneous downloads from one host, across the server "
                "(decode worker processes each get an equal share); a host answering 429 gets fewer"
            )
        },
    )
    fetch_header: tuple[str, ...] = dataclasses.field(
        default=(),
        repr=False,  # may hold credentials: never printed with the config
        metadata={
            "help": (
                "HOST_PATTERN=Name: value, repeatable: "
                "a request header (e.g. Authorization) sent only to hosts matching the pattern (fnmatch, "
                "e.g. '*.example.org'), never after a redirect to another host, never logged"
            )
        },
    )
    fetch_concurrency: int = dataclasses.field(default=64, metadata={"help": "simultaneous image downloads"})
    max_image_bytes: int = dataclasses.field(
        default=DEFAULT_MAX_IMAGE_BYTES, metadata={"help": "largest image file accepted (download or upload)"}
    )
    max_image_pixels: int = dataclasses.field(
        default=50_000_000, metadata={"help": "largest width*height decoded (decompression-bomb guard)"}
    )
    max_image_aspect_ratio: float = dataclasses.field(
        default=100.0,
        metadata={
            "help": (
                "longest side / shortest side of an image (file or pixel tensor), "
                "checked from the header before decoding: the processor scales the short side up "
                "to the model's input, so a 600000x1 image would be resized to 134 million pixels"
            )
        },
    )
    max_jpeg_scans: int = dataclasses.field(
        default=100,
        metadata={
            "help": (
                "most scans (SOS markers) in a JPEG, counted before decoding: each scan of a progressive "
                "JPEG costs a pass over the whole image (ordinary ones have 1-12, optimised ones a few more)"
            )
        },
    )
    max_jpeg_scan_passes: float = dataclasses.field(
        default=24.0,
        metadata={
            "help": (
                "most decoding work a JPEG may take, in passes over an image at --max-image-pixels: "
                "its scans x width x height / --max-image-pixels, from the header (an ordinary progressive "
                "photo at the pixel limit takes ~10; 100 scans of 7000x7000 would take 98, ~9 s of decoding)"
            )
        },
    )
    decode_timeout_s: float = dataclasses.field(
        default=10.0,
        metadata={
            "help": (
                "longest one image may take to decode and preprocess in a worker process (--decode-pool processes): "
                "past it the worker is killed and replaced and the image fails (0: no limit; "
                "decode threads cannot be stopped)"
            )
        },
    )
    max_redirects: int = dataclasses.field(default=5, metadata={"help": "HTTP redirects followed per image"})
    allow_private_networks: bool = dataclasses.field(
        default=False, metadata={"help": "allow image URLs on loopback/private/link-local addresses"}
    )
    decode_workers: int = dataclasses.field(
        default=0, metadata={"help": "image decode/preprocess threads or processes (0: one per core)"}
    )
    decode_pool: str = dataclasses.field(
        default="auto",
        metadata={
            "help": (
                "threads | processes (which also download the images) | auto "
                "(auto: processes above 4 decode workers, where threads stop scaling on the GIL)"
            ),
            "choices": DECODE_POOLS,
        },
    )
    jpeg_draft: bool = dataclasses.field(
        default=False,
        metadata={
            "help": (
                "decode JPEGs at 1/2-1/8 scale (libjpeg DCT scaling, never below the model's input size): "
                "less CPU per photo, not bit-exact (scores moved by up to 0.04 on the benchmark's photos)"
            )
        },
    )
    gpu_decode: bool = dataclasses.field(
        default=False,
        metadata={
            "help": (
                "decode JPEGs with nvJPEG and resize them on the model's CUDA device: "
                "least CPU per photo, not bit-exact (needs --device cuda)"
            )
        },
    )
    v2_alias: str = dataclasses.field(
        default="clip",
        metadata={
            "help": (
                "the Open Inference Protocol (KServe v2, Triton's gRPC API) "
                "serves the default model under this name too, with a Triton CLIP model's signature: "
                "text BYTES [1] + image FP32 [H, W, 3] -> text_embedding, image_embedding FP32 [1, D] ('': no alias; "
                "every model is also served under its own name with a batch scoring signature)"
            )
        },
    )
    max_message_mb: int = dataclasses.field(default=48, metadata={"help": "largest gRPC request message in MiB"})
    max_items_per_message: int = dataclasses.field(
        default=4096,
        metadata={
            "help": (
                "most items in one ScoreChunks/EmbedChunks message and in one ModelInfer call (its batch), "
                "counted on the wire before they are parsed; more is INVALID_ARGUMENT (the SDK sends 64 per chunk)"
            )
        },
    )
    grace_period_s: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds in-flight calls get to finish on shutdown"}
    )
    auth_token_file: str = dataclasses.field(
        default="",
        metadata={"help": "require 'authorization: Bearer <token>' with the token in this file (health stays open)"},
    )
    tls_cert: str = dataclasses.field(default="", metadata={"help": "PEM certificate chain: serve TLS"})
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM private key for --tls-cert"})
    tls_client_ca: str = dataclasses.field(
        default="", metadata={"help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"}
    )
    metrics_port: int = dataclasses.field(
        default=0, metadata={"help": "serve Prometheus metrics at http://HOST:PORT/metrics (0: off)"}
    )
    metrics_host_labels: bool = dataclasses.field(
        default=False,
        metadata={
            "help": (
                "label the fetch metrics with the image hosts callers name (the first 50 hosts reached; "
                "the rest, and hosts refused or not resolved, as 'other'); "
                "off, every host counts as host='all', so the metrics port shows no caller's hosts"
            )
        },
    )
    http_port: str = dataclasses.field(
        default="auto",
        metadata={
            "help": (
                "port of the HTTP face (OpenAI /v1/embeddings, /v1/score, KServe v2 REST, Weaviate multi2vec-clip; "
                "same models, token, TLS and limits as gRPC): a number, 0 (pick a free one), off, or auto "
                "(--port + 1000, so 50051 -> 51051 and a second server on 50052 -> 51052; with --port 0, a free one)"
            )
        },
    )
    http_idle_timeout_s: float = dataclasses.field(
        default=15.0,
        metadata={
            "help": (
                "the HTTP face closes a connection idle this long between requests, "
                "and refuses (408) a request whose body takes longer to arrive"
            )
        },
    )
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG | INFO | WARNING | ERROR"})
    log_format: str = dataclasses.field(
        default="text", metadata={"help": "text | json (one JSON object per line)", "choices": ("text", "json")}
    )

    @property
    def resolved_v2_alias(self) -> str:
        """The alias the Open Inference Protocol serves, or '' where a model already has that name:
        a model's own name wins, so a configuration that names a model "clip" keeps working."""
        names = {spec.name for spec in self.models}
        return "" if self.v2_alias in names else self.v2_alias

    def __post_init__(self) -> None:
        if not self.cache:  # --no-cache (cache=False) empties both caches, however the config is built
            object.__setattr__(self, "text_cache_size", 0)
            object.__setattr__(self, "image_cache_size", 0)
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.decode_pool not in DECODE_POOLS:
            raise ValueError(f"decode_pool must be one of {', '.join(DECODE_POOLS)}, not {self.decode_pool!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if self.compile and self.runtime not in ("auto", "torch"):
            raise ValueError(
                "--compile is torch.compile of the torch runtime's image tower: "
                f"it does not go with --runtime {self.runtime}"
            )
        _ = self.models  # refuse a bad list of models now (read once, then cached)
        devices = device_entries(self.device)  # refuse an empty entry now
        if self.gpu_decode and "cpu" in devices:
            raise ValueError(
                "gpu_decode decodes on the model's CUDA device: it needs --device cuda (or auto on a machine with CUDA)"
            )
        _ = self.resolved_http_port  # refuse a bad --http-port now (it raises)
        fetch_headers(self.fetch_header)  # refuse a malformed header now, not at the first download
        for name in (
            "max_batch_size",
            "instances",
            "fetch_concurrency",
            "fetch_attempts",
            "fetch_host_connections",
            "max_image_bytes",
            "max_image_pixels",
            "max_message_mb",
            "max_items_per_message",
            "max_jpeg_scans",
            "text_cache_mb",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "max_batch_delay_ms",
            "fetch_timeout_s",
            "fetch_attempt_timeout_s",
            "fetch_backoff_s",
            "grace_period_s",
            "forward_timeout_s",
            "text_cache_size",
            "image_cache_size",
            "max_redirects",
            "decode_workers",
            "stream_max_in_flight",
            "max_queue_size",
            "port",
            "metrics_port",
            "memory_budget_gb",
            "http_idle_timeout_s",
            "max_query_chars",
            "decode_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_jpeg_scan_passes <= 0:
            raise ValueError("max_jpeg_scan_passes must be positive")
        if self.max_image_aspect_ratio < 1:
            raise ValueError("max_image_aspect_ratio must be at least 1")

    @property
    def resolved_http_port(self) -> int | None:
        """The HTTP face's port (0: any free one), or None when it is off."""
        value = str(self.http_port).strip().lower()
        if value == "off":
            return None
        if value == "auto":
            if self.port + HTTP_PORT_OFFSET > 65535:
                raise ValueError(
                    f"--http-port auto is --port + {HTTP_PORT_OFFSET}, "
                    f"past 65535 for --port {self.port}: give --http-port"
                )
            return self.port + HTTP_PORT_OFFSET if self.port else 0
        try:
            port = int(value)
        except ValueError:
            raise ValueError(f"http_port must be a port number, 0, auto or off, not {self.http_port!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"http_port {port} is not a port number (0-65535)")
        return port

    @functools.cached_property
    def models(self) -> tuple[ModelSpec, ...]:
        return model_specs(self.model, self.text_model, self.pretrained)

    @property
    def default_model(self) -> str:
        names = [spec.name for spec in self.models]
        return DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in names else names[0]

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0

    @property
    def resolved_stream_max_in_flight(self) -> int:
        # More than one batch in flight per stream, so that a forward pass overlaps the
        # downloading and decoding of the next batches (a big model on a GPU waits for nothing).
        return self.stream_max_in_flight or max(MIN_STREAM_WINDOW, STREAM_WINDOW_BATCHES * self.max_batch_size)

    @property
    def resolved_max_queue_size(self) -> int:
        # A stream waits for room in the queue, a unary call is refused: one stream's cold
        # window (each of its images queued while the model is busy) must leave room for others.
        return self.max_queue_size or max(MIN_QUEUE_SIZE, QUEUE_WINDOWS * STREAM_WINDOW_BATCHES * self.max_batch_size)

    @property
    def resolved_decode_workers(self) -> int:
        return self.decode_workers or max(1, os.cpu_count() or 1)


def device_entries(device: str) -> list[str]:
    """The entries of a ``--device`` list as given (``models.devices`` resolves them)."""
    entries = [entry.strip() for entry in device.split(",")]
    if not all(entries):
        raise ValueError(f"device {device!r}: an empty entry in the list")
    return entries
