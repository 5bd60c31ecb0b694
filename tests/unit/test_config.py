"""Configuration: defaults < config files < CLIPSERVE_* env < flags, into one frozen config."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import os

import pytest

from clipserve_server.config_loaders import load_config
from clipserve_server.utils.config import ModelSpec, ServerConfig, fetch_headers

# The benchmark maker's config.toml, as its loader accepts it: the server takes the model from it.
BENCHMARK_TOML = """
column_query = "query_text"

[similarity_config]
adapter = "local_clip"
model = "apple/DFN5B-CLIP-ViT-H-14-378"
col_name = "clip_score"
device = "cpu"
torch_dtype = "bfloat16"
use_safetensors = true
"""

# clipserve's own file, beside it.
CLIPSERVE_TOML = """
[server]
port = 6000
max_batch_size = 16
"""


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_sane():
    config = load_config([], environ={})
    assert config.models == (ModelSpec("default", "openai/clip-vit-base-patch32"),)
    assert (config.device, config.dtype, config.port) == ("auto", "float32", 50051)
    assert config.allow_private_networks is False and config.cache is True


def test_the_benchmark_makers_config_and_clipserves_own_file_are_read_together(tmp_path):
    benchmark, own = write(tmp_path, "config.toml", BENCHMARK_TOML), write(tmp_path, "clipserve.toml", CLIPSERVE_TOML)
    config = load_config(["--config", benchmark, "--config", own], environ={})
    assert config.models == (ModelSpec("default", "apple/DFN5B-CLIP-ViT-H-14-378"),)
    assert (config.device, config.dtype, config.use_safetensors) == ("cpu", "bfloat16", True)
    assert (config.port, config.max_batch_size) == (6000, 16)


def test_env_wins_over_the_files_and_flags_win_over_env(tmp_path):
    files = os.pathsep.join(
        [write(tmp_path, "config.toml", BENCHMARK_TOML), write(tmp_path, "clipserve.toml", CLIPSERVE_TOML)]
    )
    env = {
        "CLIPSERVE_CONFIG": files,
        "CLIPSERVE_PORT": "7000",
        "CLIPSERVE_MAX_BATCH_SIZE": "8",
        "CLIPSERVE_ALLOW_PRIVATE_NETWORKS": "true",
    }
    config = load_config(["--max-batch-size", "4"], environ=env)
    assert (config.port, config.max_batch_size, config.allow_private_networks) == (7000, 4, True)
    assert config.models[0].source == "apple/DFN5B-CLIP-ViT-H-14-378"


def test_several_models_by_name_from_flags_env_or_clipserve_toml(tmp_path):
    flags = load_config(
        [
            "--model",
            "b32=openai/clip-vit-base-patch32",
            "--model",
            "ml=/models/clip",
            "--text-model",
            "ml=/models/mdistil",
        ],
        environ={},
    )
    assert flags.models == (
        ModelSpec("b32", "openai/clip-vit-base-patch32"),
        ModelSpec("ml", "/models/clip", text_model="/models/mdistil"),
    )
    assert flags.default_model == "b32"  # the first, as none is named "default"
    env = load_config([], environ={"CLIPSERVE_MODEL": "small=fake:dim=8;default=fake"})
    assert [spec.name for spec in env.models] == ["small", "default"] and env.default_model == "default"
    own = write(tmp_path, "clipserve.toml", """
[models.h14]
source = "apple/DFN5B-CLIP-ViT-H-14-378"

[models.oc]
source = "open_clip:ViT-B-32"
pretrained = "/weights/b32.safetensors"
""")
    config = load_config(["--config", own], environ={})
    assert config.models == (
        ModelSpec("h14", "apple/DFN5B-CLIP-ViT-H-14-378"),
        ModelSpec("oc", "open_clip:ViT-B-32", pretrained="/weights/b32.safetensors"),
    )
    # A stand-in model's options are not a name.
    assert load_config(["--model", "fake:forward_ms=30"], environ={}).models == (
        ModelSpec("default", "fake:forward_ms=30"),
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "a", "--model", "b"], "give each a name"),
        (["--model", "x=fake", "--model", "x=fake"], "must differ"),
        (["--model", "x=fake", "--text-model", "y=st"], "no model is named 'y'"),
    ],
)
def test_a_bad_list_of_models_is_refused(argv, words):
    with pytest.raises(ValueError, match=words):
        load_config(argv, environ={})


def test_no_cache_turns_both_caches_off():
    config = load_config(["--no-cache"], environ={})
    assert (config.text_cache_size, config.image_cache_size) == (0, 0)


@pytest.mark.parametrize(
    ("argv", "window", "queue"),
    [
        ([], 256, 1024),
        (["--max-batch-size", "256"], 1024, 2048),
        (["--max-batch-size", "256", "--stream-max-in-flight", "300", "--max-queue-size", "500"], 300, 500),
    ],
    ids=["cpu-batch", "gpu-batch", "set"],
)
def test_a_streams_window_and_the_queue_grow_with_the_batch(argv, window, queue):
    """A stream is read four batches ahead (a forward pass overlaps the decoding of the next
    ones), and the queue has room for two such windows before unary calls are refused."""
    config = load_config(argv, environ={})
    assert (config.resolved_stream_max_in_flight, config.resolved_max_queue_size) == (window, queue)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config([], environ={}).port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
        (["--stream-max-in-flight", "-1"], {}, "stream_max_in_flight must not be negative"),
        ([], {"CLIPSERVE_PORT": "many"}, "CLIPSERVE_PORT: expected int"),
        ([], {"CLIPSERVE_CACHE": "maybe"}, "CLIPSERVE_CACHE: expected true/false"),
    ],
)
def test_bad_values_are_reported_by_name(argv, env, words):
    with pytest.raises(ValueError, match=words):
        load_config(argv, environ=env)


def test_unknown_keys_in_clipserves_file_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key \[server\].max_bach_size"):
        load_config(["--config", write(tmp_path, "clipserve.toml", "[server]\nmax_bach_size = 3\n")], environ={})
    with pytest.raises(ValueError, match=r"unknown key \[models.a\].sauce"):
        load_config(
            ["--config", write(tmp_path, "clipserve.toml", "[models.a]\nsource = 'x'\nsauce = 'y'\n")], environ={}
        )


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        ServerConfig(dtype="int8")


def test_the_fake_model_simulates_accelerator_time_per_batch_and_per_image():
    """Benchmarks stand in for a GPU with ``fake:forward_ms=..,image_ms=..``: a batch costs a
    fixed time plus a time per image, as an accelerator's forward pass does."""
    from clipserve_server.models.loading import _fake

    model = _fake("fake:forward_ms=20,image_ms=1.5,dim=8")
    assert (model.forward_delay_s, model.image_delay_s, model.description.embedding_dim) == (0.02, 0.0015, 8)
    with pytest.raises(ValueError, match="unknown option.*gpu_ms"):
        _fake("fake:gpu_ms=3")


def test_the_runtime_is_auto_by_default_and_set_by_flag_env_or_file(tmp_path):
    assert (load_config([], environ={}).runtime, load_config([], environ={}).runtime_cache) == ("auto", "")
    own = write(tmp_path, "clipserve.toml", '[server]\nruntime = "torch"\nruntime_cache = "/srv/conversions"\n')
    assert (
        load_config(["--config", own], environ={}).runtime,
        load_config(["--config", own], environ={}).runtime_cache,
    ) == ("torch", "/srv/conversions")
    assert load_config(["--config", own], environ={"CLIPSERVE_RUNTIME": "openvino"}).runtime == "openvino"
    assert load_config(["--runtime", "cuda-graphs"], environ={"CLIPSERVE_RUNTIME": "openvino"}).runtime == "cuda-graphs"


def test_compile_is_the_torch_runtimes_and_unknown_runtimes_are_refused():
    assert load_config(["--compile"], environ={}).runtime == "auto"  # auto then means torch
    assert load_config(["--compile", "--runtime", "torch"], environ={}).compile
    with pytest.raises(ValueError, match="--compile is torch.compile of the torch runtime's image tower"):
        load_config(["--compile", "--runtime", "openvino"], environ={})
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, openvino"):
        load_config([], environ={"CLIPSERVE_RUNTIME": "tvm"})


def test_the_fetch_retries_and_politeness_come_from_flags_env_or_clipserve_toml(tmp_path):
    defaults = load_config([], environ={})
    assert (
        defaults.fetch_timeout_s,
        defaults.fetch_attempt_timeout_s,
        defaults.fetch_attempts,
        defaults.fetch_backoff_s,
        defaults.fetch_host_connections,
    ) == (15.0, 10.0, 4, 0.5, 32)
    own = write(
        tmp_path,
        "clipserve.toml",
        "[server]\nfetch_attempts = 6\nfetch_header = ['*.example.org=Authorization: Bearer t']\n",
    )
    env = {"CLIPSERVE_FETCH_HOST_CONNECTIONS": "8", "CLIPSERVE_FETCH_BACKOFF_S": "0.25"}
    config = load_config(["--config", own, "--fetch-attempt-timeout-s", "4"], environ=env)
    assert (
        config.fetch_attempts,
        config.fetch_host_connections,
        config.fetch_backoff_s,
        config.fetch_attempt_timeout_s,
    ) == (6, 8, 0.25, 4.0)
    [header] = fetch_headers(config.fetch_header)
    assert (header.name, header.value) == ("Authorization", "Bearer t")
    assert header.matches("images.EXAMPLE.org") and not header.matches("example.org.evil.net")


def test_a_fetch_header_is_never_printed_not_even_when_refused():
    config = load_config(["--fetch-header", "cdn.example=X-Key: hunter2"], environ={})
    assert "hunter2" not in repr(config) and "hunter2" not in repr(fetch_headers(config.fetch_header))
    for entry in ("X-Key: hunter2", "cdn.example=hunter2", "cdn.example=Bad Name: hunter2"):
        with pytest.raises(ValueError, match="HOST_PATTERN=Name: value") as refused:
            load_config(["--fetch-header", entry], environ={})
        assert "hunter2" not in str(refused.value)


def test_no_cache_empties_both_caches_however_the_config_is_built():
    """``cache=False`` is normalised by the config itself, not only by the flag loader."""
    for config in (
        ServerConfig(cache=False),
        load_config(["--no-cache"], environ={}),
        replace(ServerConfig(), cache=False),
    ):
        assert (config.text_cache_size, config.image_cache_size) == (0, 0)


def test_the_models_are_read_once():
    config = ServerConfig(model=("a=fake", "b=fake"))
    assert config.models is config.models
