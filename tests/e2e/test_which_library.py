"""Which library loads a model, and a dtype other than float32, through the real server.

README, "Which library, exactly": a `config.json` means transformers, even beside an
`open_clip_config.json` (repos that export one model for both libraries, such as
apple/DFN5B-CLIP-ViT-H-14-378, the benchmark maker's example); a hub id's files are looked up in
the Hugging Face cache first, so a cached model loads with no network; a hub repo that
open_clip's own pretrained list names loads through open_clip, as the `-quickgelu` architecture
where both are listed. Nothing is downloaded: the hub repos are built into a local cache.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import clipserve
from clipserve_server.models import loading, synthetic
from clipserve_server.utils.config import ModelSpec, ServerConfig

from ..conftest import ServerProcess
from ..helpers import hub_cache, make_image

pytestmark = pytest.mark.cost(10)  # its CPU cost among the files (tests/conftest.py)

DUAL_HUB_ID = "clipserve-tests/dual-export"
PAIRS = [("a dog on the beach", 1), ("A small red car", 2), ("photo of a boat", 3)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[dict[str, ServerProcess]]:
    """One server with the dual export as a folder and as a cached hub id (hub switched off),
    one with the tiny checkpoint in bfloat16; started side by side."""
    root = tmp_path_factory.mktemp("which-library")
    dual = root / "dual"
    shutil.copytree(tiny_checkpoint, dual)
    open_clip_files = synthetic.build_open_clip_checkpoint(root / "open-clip", arch="tiny", seed=3)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(open_clip_files / name, dual / name)
    cache = hub_cache(root / "hf-cache", DUAL_HUB_ID, dual)
    started = {
        "dual": ServerProcess(
            ["--model", f"folder={dual}", "--model", f"hub={DUAL_HUB_ID}"],
            {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
            wait=False,
        ),
        "bfloat16": ServerProcess(["--model", str(tiny_checkpoint), "--dtype", "bfloat16"], wait=False),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.terminate()


def scores(
    server: ServerProcess, tmp_path: Path, model: str = ""
) -> tuple[list[tuple[str, bytes]], list[float], clipserve.v1.scorer_pb2.ModelInfo]:
    pairs = [(query, make_image(48, 40, seed=seed)) for query, seed in PAIRS]
    paths = []
    for i, (_, data) in enumerate(pairs):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    with clipserve.CLIP(server.address, timeout=120, model=model) as clip:
        results = clip.score_batch([(query, str(path)) for (query, _), path in zip(pairs, paths)])
        info = clip.model_info()
    assert all(r.error is None for r in results), [r.error for r in results]
    return pairs, [r.score for r in results], info


@pytest.mark.parametrize("model", ["folder", "hub"])
def test_a_config_json_beside_an_open_clip_config_loads_through_transformers(servers, reference, tmp_path, model):
    """A config.json wins over an open_clip_config.json beside it (the DFN5B layout), as a
    folder and as a hub id loaded offline from the Hugging Face cache: transformers loads it,
    and the scores are transformers' own logits_per_image."""
    pairs, served, info = scores(servers["dual"], tmp_path, model)
    assert info.backend == "transformers"
    assert served == pytest.approx([reference(query, data) for query, data in pairs], abs=reference.tolerance)


def test_bfloat16_runs_on_the_cpu(servers, reference, tmp_path):
    """`--dtype bfloat16` serves on the CPU: the model runs in bfloat16, its scores close to
    float32's (bfloat16 keeps about 3 significant digits)."""
    pairs, served, info = scores(servers["bfloat16"], tmp_path)
    assert (info.device, info.dtype) == ("cpu", "bfloat16")
    expected = [reference(query, data) for query, data in pairs]
    scale = reference.tolerance / 1e-4  # exp(logit_scale)
    assert served == pytest.approx(expected, abs=0.05 * scale)
    # ...and not float32's: the weights really run in bfloat16 (deterministic: same weights,
    # same images; float32 would agree within the parity tolerance).
    assert max(abs(s - e) for s, e in zip(served, expected)) > reference.tolerance


@pytest.mark.parametrize(
    "repo_id, arch, tag",
    [
        # Listed both as ViT-H-14-378 and ViT-H-14-378-quickgelu: the weights need QuickGELU.
        ("apple/DFN5B-CLIP-ViT-H-14-378", "ViT-H-14-378-quickgelu", "dfn5b"),
        ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-32", "laion2b_s34b_b79k"),
    ],
)
def test_a_repo_in_open_clips_pretrained_list_loads_through_open_clip(monkeypatch, repo_id, arch, tag):
    """A hub repo with neither config file that open_clip's pretrained list names is loaded by
    open_clip, architecture and tag from that list, preferring `-quickgelu` where both are."""
    loaded: list[tuple[str, str]] = []
    monkeypatch.setattr(loading, "_hub_files", lambda _repo: set())  # no network here: the repo's files are unknown
    monkeypatch.setattr(
        loading, "_open_clip", lambda name, source, config, pretrained="": loaded.append((name, pretrained))
    )
    monkeypatch.setattr(loading, "apply_runtime", lambda model, config: None)  # nothing was loaded to convert
    loading.load_model(ModelSpec(name="m", source=repo_id), ServerConfig())
    assert loaded == [(arch, tag)]
