"""The benchmark maker's own config.toml, unchanged, drives clipserve; nothing of clipserve's
ever goes into it (its loader refuses what it does not define, and every step reads it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clipserve_server.config_loaders import load_config

from ..conftest import ROOT, ServerProcess
from ..helpers import make_image

pytestmark = pytest.mark.cost(5)  # its CPU cost among the files (tests/conftest.py)

# -- the benchmark maker's loader, as data ------------------------------------------------------------
# waggle-sensor/imsearch_benchmaker (7d23bdb), imsearch_benchmaker/framework/config.py:
# BenchmarkConfig._from_dict refuses every key that its dataclasses do not define, in every
# table. It is not on PyPI, so its rules are written out here: the field names of
# BenchmarkConfig, of OpenAIVisionConfig / OpenAIJudgeConfig (the only vision and judge
# adapters it registers, and it refuses a config without them), and of CLIPConfig, the
# config of the local_clip adapter that clipserve replaces.

TOP_LEVEL = frozenset(
    """
    benchmark_name benchmark_description benchmark_author benchmark_author_email benchmark_author_affiliation
    benchmark_author_orcid benchmark_author_github log_level column_image column_image_id column_mime_type
    column_license column_doi column_original_dataset_name column_query column_query_id column_relevance
    column_tags column_summary column_confidence columns_taxonomy columns_boolean image_root_dir meta_json
    metadata_jsonl images_jsonl seeds_jsonl annotations_jsonl query_plan_jsonl qrels_jsonl
    qrels_with_score_jsonl summary_output_dir hf_dataset_dir hf_dataset_card_path _hf_token _hf_repo_id
    _hf_private _hf_num_proc vision_config judge_config similarity_config query_plan_num_seeds
    query_plan_seed_image_ids_column query_plan_candidate_image_ids_column query_plan_core_facets
    query_plan_off_facets query_plan_diversity_facets query_plan_neg_total query_plan_neg_hard
    query_plan_neg_nearmiss query_plan_neg_easy query_plan_random_seed image_base_url image_url_temp_column
    upload_use_local_image_paths
    """.split()
)
_OPENAI = {
    "adapter", "model", "system_prompt", "user_prompt", "max_output_tokens", "reasoning_effort", "stage",
    "_openai_api_key", "completion_window", "price_per_million_input_tokens",
    "price_per_million_cached_input_tokens", "price_per_million_output_tokens",
}
TABLES = {
    "vision_config": frozenset(_OPENAI | {
        "image_detail", "max_images_per_batch", "controlled_tag_vocab", "min_tags", "max_tags",
        "vision_metadata_columns", "price_per_million_image_input_tokens", "price_per_million_image_output_tokens",
    }),
    "judge_config": frozenset(_OPENAI | {"max_queries_per_batch", "max_candidates"}),
    "similarity_config": frozenset({"adapter", "model", "col_name", "device", "torch_dtype", "use_safetensors"}),
}
ADAPTERS = {"vision_config": "openai", "judge_config": "openai", "similarity_config": "local_clip"}


def loader_refusal(config: dict) -> str | None:
    """Why the benchmark maker's loader refuses ``config``, in its words and its order of
    checks; None when it loads it with the local_clip similarity adapter."""
    for table, adapter in ADAPTERS.items():
        if config.get(table, {}).get("adapter") != adapter:
            return f"[{table}] adapter must be {adapter!r}, not {config.get(table, {}).get('adapter')!r}"
    for table, valid in TABLES.items():
        invalid = sorted(set(config[table]) - valid)
        if invalid:
            return f"Invalid fields in {table}: {invalid}"
    invalid = sorted(set(config) - TOP_LEVEL)
    if invalid:
        return f"Invalid fields in BenchmarkConfig: {invalid}"
    return None


MINIMAL = {
    "vision_config": {"adapter": "openai"},
    "judge_config": {"adapter": "openai"},
    "similarity_config": {"adapter": "local_clip"},
}


@pytest.mark.parametrize(
    "table, key, value, refusal",
    [
        (None, None, None, None),
        # What earlier READMEs told users to add, and what the real loader answered:
        ("similarity_config", "address", "gpu-box:50051", "Invalid fields in similarity_config: ['address']"),
        (None, "server", {"port": 50051}, "Invalid fields in BenchmarkConfig: ['server']"),
        (None, "clipserve", {"address": "gpu-box:50051"}, "Invalid fields in BenchmarkConfig: ['clipserve']"),
        (None, "clipserve_address", "gpu-box:50051", "Invalid fields in BenchmarkConfig: ['clipserve_address']"),
        ("similarity_config", "adapter", None, "[similarity_config] adapter must be 'local_clip'"),
        # The upstream example/config.toml itself, at that commit:
        ("vision_config", "max_concurrent_batches", 1, "Invalid fields in vision_config: ['max_concurrent_batches']"),
    ],
)
def test_the_rules_refuse_what_the_real_loader_refuses(table, key, value, refusal):
    config = json.loads(json.dumps(MINIMAL))
    if key is not None:
        target = config[table] if table else config
        if value is None:
            del target[key]
        else:
            target[key] = value
    if refusal is None:
        assert loader_refusal(config) is None
    else:
        assert (loader_refusal(config) or "").startswith(refusal)


# -- the README and docs/ -----------------------------------------------------------------------------

BENCHMARK_MAKERS_FILE = "# the benchmark maker's config.toml"
CLIPSERVES_FILE = "# clipserve.toml"


def readme_toml_blocks() -> list[str]:
    """The toml blocks of the README and of every page in docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [
        block
        for page in pages
        for block in re.findall(r"^```toml\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    ]


def test_every_toml_block_in_the_readme_says_which_file_it_belongs_in():
    blocks = readme_toml_blocks()
    assert blocks
    for block in blocks:
        assert block.startswith((BENCHMARK_MAKERS_FILE, CLIPSERVES_FILE)), block.splitlines()[0]


def test_what_the_readme_puts_in_the_benchmark_makers_config_is_what_its_loader_accepts():
    blocks = [b for b in readme_toml_blocks() if b.startswith(BENCHMARK_MAKERS_FILE)]
    assert blocks, "the docs show the benchmark maker's config.toml (docs/benchmark-maker.md)"
    for block in blocks:
        assert loader_refusal(tomllib.loads(block)) is None, block


def test_the_readmes_clipserve_toml_configures_the_server(tmp_path):
    blocks = [b for b in readme_toml_blocks() if b.startswith(CLIPSERVES_FILE)]
    assert blocks
    for block in blocks:
        path = tmp_path / "clipserve.toml"
        path.write_text(block, encoding="utf-8")
        config = load_config(["--config", str(path)], environ={})
        for key, value in tomllib.loads(block)["server"].items():
            assert getattr(config, key) == value


# -- end to end: the user's run ----------------------------------------------------------------------

# waggle-sensor/imsearch_benchmaker's example/config.toml (7d23bdb) with the paths, the image
# base URL and the model changed, and col_name removed (score-file must default to the
# adapter's clip_score). Its long prompts and tag vocabulary are cut short; every key and
# table is kept. It is the loadable variant: the upstream file also sets
# max_concurrent_batches in [vision_config] and [judge_config], a key its own loader has
# refused since that key was removed (commit cdc6348), so nobody can be running it as it is.
EXAMPLE_CONFIG = '''\
# Example Configuration
# This config file maps Example settings to the imsearch_benchmaker framework

# log level
log_level = "INFO"

#dataset description
benchmark_name = "Example Benchmark"
benchmark_description = "A benchmark for example image retrieval"
benchmark_author = "John Doe"
benchmark_author_email = "john.doe@example.com"
benchmark_author_affiliation = "Example Organization"
benchmark_author_orcid = "0000-0000-0000-0000"
benchmark_author_github = "john-doe"

# Column names (matching FireBenchMaker structure)
column_image = "image"
column_image_id = "image_id"
column_mime_type = "mime_type"
column_license = "license"
column_doi = "doi"
column_query = "query_text"
column_query_id = "query_id"
column_relevance = "relevance_label"
column_tags = "tags"
column_summary = "summary"
column_confidence = "confidence"

# Image URL configuration
image_base_url = "{image_base_url}"
image_url_temp_column = "image_url"

# File paths
image_root_dir = "{folder}/images"
meta_json = "{folder}/rights_map.json"
images_jsonl = "{folder}/inputs/images.jsonl"
seeds_jsonl = "{folder}/inputs/seeds.jsonl"
annotations_jsonl = "{folder}/outputs/annotations.jsonl"
query_plan_jsonl = "{folder}/outputs/query_plan.jsonl"
qrels_jsonl = "{folder}/outputs/firebench_qrels.jsonl"
qrels_with_score_jsonl = "{folder}/outputs/firebench_qrels_with_similarity_score.jsonl"
summary_output_dir = "{folder}/outputs/summary"
hf_dataset_dir = "{folder}/outputs/hf_dataset"
hf_dataset_card_path = "{folder}/dataset_card.md"

# Query planning
query_plan_num_seeds = 100  # Number of seed images to use for query generation
query_plan_neg_total = 12
query_plan_neg_hard = 4
query_plan_neg_nearmiss = 4
query_plan_neg_easy = 4
query_plan_random_seed = 42
query_plan_seed_image_ids_column = "seed_image_ids"
query_plan_candidate_image_ids_column = "candidate_image_ids"

# Hugging Face configuration (sensitive fields use _ prefix)
_hf_repo_id = "exampleorganization/NewExample"
_hf_private = false
_hf_num_proc = 4

# Boolean columns
columns_boolean = ["flame_visible"]

# Taxonomy columns (locked taxonomy for FireBench)
[columns_taxonomy]
viewpoint = ["fixed_long_range", "handheld", "aerial", "other", "unknown"]
plume_stage = ["incipient", "developing", "mature", "residual", "none", "unknown"]
lighting = ["day", "dusk", "night", "ir_nir", "unknown"]
confounder_type = ["cloud", "fog_marine_layer", "dust", "haze", "sun_glare", "none", "unknown"]
environment_type = [
    "forest", "grassland", "shrubland", "mountainous", "urban_wui", "coastal",
    "desert", "agricultural", "water", "other", "unknown"
]

# Vision adapter configuration (OpenAI)
[vision_config]
adapter = "openai"
model = "gpt-5-mini"
system_prompt = """You are labeling wildfire imagery for a fire-science retrieval benchmark.
Output MUST be valid JSON matching the schema. Do not include extra keys."""
user_prompt = """Analyze the image and output JSON with:
- summary: <= 30 words, factual, no speculation"""
max_output_tokens = 4000
reasoning_effort = "low"
image_detail = "low"  # "low" saves tokens
max_images_per_batch = 900
completion_window = "24h"  # Completion window for the batch

# Pricing configuration (required for cost calculation)
# Prices are per million tokens. All values must be explicitly set.
price_per_million_input_tokens = 0.125  # Text input tokens
price_per_million_output_tokens = 1.00  # Text output tokens
price_per_million_cached_input_tokens = 0.0125  # Text cached input tokens
price_per_million_image_input_tokens = 0.125  # Image input tokens
price_per_million_image_output_tokens = 1.00  # Image output tokens

# Controlled tag vocabulary
min_tags = 14
max_tags = 25
controlled_tag_vocab = [
    # --- Fire / smoke presence ---
    "smoke_present", "no_smoke_visible", "flame_visible", "no_flame_visible", "glow_visible", "no_glow_visible",
    # --- Quality / artifacts ---
    "low_resolution", "high_resolution", "compression_artifacts", "sensor_noise",
]

# Judge adapter configuration (OpenAI)
[judge_config]
adapter = "openai"
model = "gpt-5-mini"
system_prompt = """You are a fire scientist creating and judging an image-retrieval benchmark.
Binary relevance only: 1 relevant, 0 not relevant."""
user_prompt = """Tasks:
1) Write a realistic fire-scientist query_text describing the target phenomenon."""
max_output_tokens = 8000
reasoning_effort = "medium"
max_queries_per_batch = 600
max_candidates = 100
completion_window = "24h"  # Completion window for the batch

# Pricing configuration (required for cost calculation)
# Prices are per million tokens. All values must be explicitly set.
price_per_million_input_tokens = 0.125  # Text input tokens 
price_per_million_output_tokens = 1.00  # Text output tokens
price_per_million_cached_input_tokens = 0.0125  # Text cached input tokens

# Similarity adapter configuration (CLIP)
[similarity_config]
adapter = "local_clip"
model = "{model}"
device = "cpu"  # Device to run inference on 
use_safetensors = true  # Use safetensors format for model loading 
'''

QUERIES = ["smoke plume rising over a forested ridge", "night fire with visible flames", "fog in a valley, not smoke"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_score_file_runs_the_benchmark_makers_similarity_step_from_its_own_config(
    tmp_path, tiny_checkpoint, image_host, reference
):
    prefix = f"e2e-{tmp_path.name}-"  # the image host is shared by the whole session
    present = {f"{prefix}fire{i}.jpg": make_image(56 + 4 * i, 40 + 3 * i, seed=300 + i, fmt="JPEG") for i in range(4)}
    late = {f"{prefix}late{i}.png": make_image(48, 48, seed=400 + i) for i in range(2)}  # not uploaded yet: 404
    for name, data in present.items():
        image_host.add(name, data)
    text = EXAMPLE_CONFIG.format(folder=tmp_path, image_base_url=image_host.url("img/"), model=tiny_checkpoint)
    assert loader_refusal(tomllib.loads(text)) is None  # the benchmark maker can still load it
    config = tmp_path / "config.toml"
    config.write_text(text, encoding="utf-8")
    settings = tomllib.loads(text)

    # Its images.jsonl has no URL column: the URLs are image_base_url + "/" + image_id.
    images = [
        {"image_id": name, "mime_type": "image/jpeg", "license": "CC-BY-4.0", "doi": "10.0/fire"}
        for name in [*present, *late]
    ]
    qrels = [
        {
            "query_id": f"q{q}",
            "query_text": query,
            "image_id": row["image_id"],
            "relevance_label": (q + i) % 2,
            "tags": ["smoke_present"],
        }
        for q, query in enumerate(QUERIES)
        for i, row in enumerate(images)
    ]
    for key, rows in (("images_jsonl", images), ("qrels_jsonl", qrels)):
        Path(settings[key]).parent.mkdir(parents=True, exist_ok=True)
        Path(settings[key]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output = Path(settings["qrels_with_score_jsonl"])

    # The server takes its model from the same file; the address comes from the environment.
    server = ServerProcess(["--config", str(config), "--allow-private-networks", "--fetch-timeout-s", "5"])
    try:
        env = {**os.environ, "CLIPSERVE_ADDRESS": server.address}

        def score_file(*extra: str) -> subprocess.CompletedProcess:
            command = [
                sys.executable,
                "-m",
                "clipserve.cli",
                "score-file",
                "--config",
                str(config),
                "--no-progress",
                *extra,
            ]
            return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

        first = score_file()
        assert first.returncode == 0, first.stderr
        out = read_jsonl(output)
        assert [{k: v for k, v in row.items() if k != "clip_score"} for row in out] == qrels
        assert all(list(row)[-1] == "clip_score" for row in out)
        for row in out:
            if row["image_id"] in present:
                assert row["clip_score"] == pytest.approx(
                    reference(row["query_text"], present[row["image_id"]]), abs=reference.tolerance
                )
            else:
                assert row["clip_score"] is None
        missing = len(QUERIES) * len(late)
        first_missing = image_host.url(f"img/{next(iter(late))}")
        assert f"{missing} failed: NOT_FOUND x{missing} (e.g. {first_missing}: HTTP 404" in first.stderr

        before = output.read_text(encoding="utf-8").splitlines(keepends=True)
        for name, data in late.items():
            image_host.add(name, data)
        again = score_file("--retry-failed")
        assert again.returncode == 0, again.stderr
        assert f"{missing} without a score re-scored: {missing} scored, 0 still failed" in again.stderr
        after = output.read_text(encoding="utf-8").splitlines(keepends=True)
        assert len(after) == len(before)
        for old, new, row in zip(before, after, qrels):
            if row["image_id"] in present:
                assert new == old  # byte for byte
            else:
                rescored = json.loads(new)
                assert {k: v for k, v in rescored.items() if k != "clip_score"} == row
                assert rescored["clip_score"] == pytest.approx(
                    reference(row["query_text"], late[row["image_id"]]), abs=reference.tolerance
                )
    finally:
        assert server.terminate() == 0, "".join(server.log)
