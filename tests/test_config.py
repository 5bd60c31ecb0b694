"""Configuration: defaults < config.toml < CLIPSERVE_* env < flags, into one frozen config."""

from __future__ import annotations

import dataclasses

import pytest

from clipserve_server.config import ServerConfig, load_config

TOML = """
column_query = "query_text"

[similarity_config]
adapter = "local_clip"
model = "apple/DFN5B-CLIP-ViT-H-14-378"
col_name = "clip_score"
device = "cpu"
torch_dtype = "bfloat16"
use_safetensors = true

[server]
port = 6000
max_batch_size = 16
"""


def test_defaults_are_sane():
    config = load_config([], environ={})
    assert (config.model, config.device, config.dtype, config.port) == ("openai/clip-vit-base-patch32", "auto", "float32", 50051)
    assert config.allow_private_networks is False and config.cache is True


def test_the_adapters_config_toml_is_understood(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    config = load_config(["--config", str(path)], environ={})
    assert (config.model, config.device, config.dtype, config.use_safetensors) == ("apple/DFN5B-CLIP-ViT-H-14-378", "cpu", "bfloat16", True)
    assert (config.port, config.max_batch_size) == (6000, 16)


def test_env_wins_over_the_file_and_flags_win_over_env(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    env = {"CLIPSERVE_CONFIG": str(path), "CLIPSERVE_PORT": "7000", "CLIPSERVE_MAX_BATCH_SIZE": "8", "CLIPSERVE_ALLOW_PRIVATE_NETWORKS": "true"}
    config = load_config(["--max-batch-size", "4"], environ=env)
    assert (config.port, config.max_batch_size, config.allow_private_networks) == (7000, 4, True)
    assert config.model == "apple/DFN5B-CLIP-ViT-H-14-378"


def test_no_cache_turns_both_caches_off():
    config = load_config(["--no-cache"], environ={})
    assert (config.text_cache_size, config.image_cache_size) == (0, 0)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config([], environ={}).port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
        ([], {"CLIPSERVE_PORT": "many"}, "CLIPSERVE_PORT: expected int"),
        ([], {"CLIPSERVE_CACHE": "maybe"}, "CLIPSERVE_CACHE: expected true/false"),
    ],
)
def test_bad_values_are_reported_by_name(argv, env, words):
    with pytest.raises(ValueError, match=words):
        load_config(argv, environ=env)


def test_unknown_server_keys_in_the_file_are_errors(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[server]\nmax_bach_size = 3\n")
    with pytest.raises(ValueError, match=r"unknown key \[server\].max_bach_size"):
        load_config(["--config", str(path)], environ={})


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        ServerConfig(dtype="int8")
