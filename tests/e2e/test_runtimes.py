"""Runtimes (--runtime): the towers converted at start-up, checked against torch, cached on disk.

The default (auto) runs the towers of a float32 model on the CPU in OpenVINO; scores through the
server stay within 1e-4 * exp(logit_scale) of the reference adapter's. A tower that does not
convert, or converts inexactly, runs in torch and one log line says why. Converted towers are
kept on disk by the model's weights: a restart reuses them, changed weights convert again.
(Each family's runtime is asserted in test_families.py, through its server.)
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

import clipserve
from clipserve_server.models import synthetic
from clipserve_server.models.clip_model import HFClipModel
from clipserve_server.models.runtimes import apply_runtime, choose
from clipserve_server.utils.config import ServerConfig

from ..conftest import ServerProcess
from ..helpers import InProcessServer, make_image

pytestmark = pytest.mark.cost(16)  # its CPU cost among the files (tests/conftest.py)

QUERIES = ["a dog on the beach", "a red car", "x"]


def scored(address: str, folder: Path) -> list[tuple[str, bytes, float]]:
    """Every query against three local images, scored through the server at ``address``."""
    images = []
    for i, (width, height) in enumerate([(64, 48), (33, 77), (200, 120)]):
        images.append(folder / f"runtime{i}.png")
        images[-1].write_bytes(make_image(width, height, seed=900 + i))
    pairs = [(query, path) for query in QUERIES for path in images]
    with clipserve.CLIP(address, timeout=120) as clip:
        results = clip.score_batch([(query, str(path)) for query, path in pairs])
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return [(query, path.read_bytes(), r.score) for (query, path), r in zip(pairs, results)]


def assert_scores_like_the_reference(model, checkpoint: Path, reference, folder: Path) -> None:
    """``model`` served in-process scores every pair of ``scored`` as the reference adapter does."""
    server = InProcessServer(ServerConfig(model=(str(checkpoint),)), model)
    try:
        for query, image, score in scored(server.address, folder):
            assert score == pytest.approx(reference(query, image), abs=reference.tolerance)
    finally:
        server.stop()


def runtime_lines(server: ServerProcess) -> list[str]:
    return [line.strip() for line in server.log if " tower of " in line]


def test_auto_picks_openvino_for_float32_on_the_cpu_and_torch_elsewhere():
    assert choose("auto", "cpu", "float32", compile=False) == "openvino"
    # --compile is torch.compile of torch's image tower; CUDA stays on torch until measured;
    # OpenVINO runs float32 and bfloat16 (test_bf16.py), not float16.
    assert choose("auto", "cpu", "float32", compile=True) == "torch"
    assert choose("auto", "cuda", "float16", compile=False) == "torch"
    assert choose("auto", "cpu", "float16", compile=False) == "torch"
    assert choose("torch", "cpu", "float32", compile=False) == "torch"


def test_the_default_server_runs_both_towers_in_openvino_with_the_reference_scores(real_server, reference, tmp_path):
    with clipserve.CLIP(real_server.address) as clip:
        info = clip.model_info()
    assert (info.image_runtime, info.text_runtime) == ("openvino", "openvino")
    for query, image, score in scored(real_server.address, tmp_path):
        assert score == pytest.approx(reference(query, image), abs=reference.tolerance)


def test_runtime_torch_keeps_torch_eager(tiny_checkpoint, reference, tmp_path):
    server = ServerProcess(["--model", str(tiny_checkpoint), "--runtime", "torch"])
    try:
        with clipserve.CLIP(server.address) as clip:
            info = clip.model_info()
        assert (info.image_runtime, info.text_runtime) == ("torch", "torch")
        assert runtime_lines(server) == []
        for query, image, score in scored(server.address, tmp_path):
            assert score == pytest.approx(reference(query, image), abs=reference.tolerance)
    finally:
        assert server.terminate() == 0, "".join(server.log)


class TextUntraceable(HFClipModel):
    """The tiny CLIP whose text tower refuses to be traced: it stays in torch, the image tower converts."""

    def _eager_text_features(self, **tokens):
        import torch

        if torch.jit.is_tracing():
            raise RuntimeError("this tower cannot be traced")
        return super()._eager_text_features(**tokens)


class Unconvertible(TextUntraceable):
    """The tiny CLIP with towers that torch runs exactly and a converter cannot: the image
    tower takes a Python float from its own output (a tracer freezes it to the traced batch's,
    so every other batch comes out wrong), the text tower refuses to be traced."""

    def _eager_image_features(self, **inputs):
        features = super()._eager_image_features(**inputs)
        return features - float(features.mean()) + features.mean()


def test_towers_that_do_not_convert_exactly_run_in_torch_and_say_why(tiny_checkpoint, reference, tmp_path, caplog):
    model = Unconvertible(str(tiny_checkpoint), device="cpu")
    with caplog.at_level(logging.INFO, logger="clipserve_server.models.runtimes"):
        apply_runtime(
            model,
            ServerConfig(model=(str(tiny_checkpoint),), runtime="openvino", runtime_cache=str(tmp_path / "cache")),
        )
    assert (model.description.image_runtime, model.description.text_runtime) == ("torch", "torch")
    lines = [
        record.getMessage() for record in caplog.records if record.name.startswith("clipserve_server.models.runtimes")
    ]
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"image tower of {tiny_checkpoint} runs in torch: in openvino its features differ from torch's by "
    ), lines
    assert lines[1].startswith(f"text tower of {tiny_checkpoint} runs in torch: openvino could not convert it ("), lines
    assert_scores_like_the_reference(model, tiny_checkpoint, reference, tmp_path)


def test_torch_weights_go_once_both_towers_run_in_openvino_and_stay_while_either_runs_in_torch(
    tiny_checkpoint, reference, tmp_path
):
    """docs/runtimes.md: torch's copy of the weights is released once both towers run in
    OpenVINO (the server's RSS with OpenVINO within 1.5x torch's), kept while a tower needs it."""
    config = ServerConfig(model=(str(tiny_checkpoint),), runtime="openvino", runtime_cache=str(tmp_path / "cache"))
    converted, from_cache = (
        HFClipModel(str(tiny_checkpoint), device="cpu"),
        HFClipModel(str(tiny_checkpoint), device="cpu"),
    )
    for model in (converted, from_cache):
        apply_runtime(model, config)
        assert (model.description.image_runtime, model.description.text_runtime) == ("openvino", "openvino")
        assert all(parameter.is_meta for parameter in model._model.parameters())
    one = TextUntraceable(str(tiny_checkpoint), device="cpu")
    apply_runtime(one, dataclasses.replace(config, runtime_cache="off"))
    assert (one.description.image_runtime, one.description.text_runtime) == ("openvino", "torch")
    assert not any(parameter.is_meta for parameter in one._model.parameters())
    for model in (converted, from_cache, one):
        assert_scores_like_the_reference(model, tiny_checkpoint, reference, tmp_path)


def resident_kb(folder: Path) -> dict[str, int]:
    """Resident kB of each file under ``folder`` that this process has mapped (/proc/self/smaps)."""
    resident: dict[str, int] = {}
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):  # a mapping: address range, ..., path (if any)
            current = fields[5] if len(fields) >= 6 and fields[5].startswith(str(folder.resolve())) else None
        elif current is not None and fields[:1] == ["Rss:"]:
            resident[current] = resident.get(current, 0) + int(fields[1])
    return resident


def test_a_converted_tower_keeps_no_page_of_its_cached_weights_file_in_memory(tiny_checkpoint, reference, tmp_path):
    """docs/runtimes.md (memory): the compiled towers run on their own copy of the weights;
    the cache entry's file stays mapped (OpenVINO keeps the model it compiled), but its pages
    are dropped once the towers are checked, converted or read from the cache. Forwards may
    read back the few constants used in place (clean file pages: the same bytes), so scores
    do not change."""
    cache = tmp_path / "cache"
    for how in ("converted", "from the cache"):
        model = HFClipModel(str(tiny_checkpoint), device="cpu")
        apply_runtime(model, ServerConfig(model=(str(tiny_checkpoint),), runtime_cache=str(cache)))
        mapped = resident_kb(cache)
        assert mapped and all(name.endswith(".bin") for name in mapped), (
            how,
            mapped,
        )  # the weights files are mapped ...
        assert sum(mapped.values()) == 0, (how, mapped)  # ... and none of their pages are resident
        assert_scores_like_the_reference(model, tiny_checkpoint, reference, tmp_path)


def test_a_restart_reuses_the_conversion_and_changed_weights_convert_again(tmp_path, caplog):
    folder = synthetic.build_checkpoint(tmp_path / "model", arch="tiny", seed=11)
    cache = tmp_path / "cache"

    def start() -> tuple[list[str], float]:
        server = ServerProcess(["--model", str(folder), "--runtime-cache", str(cache)])
        try:
            [(_, _, score)] = scored(server.address, tmp_path)[:1]
            return runtime_lines(server), score
        finally:
            assert server.terminate() == 0, "".join(server.log)

    first, score = start()
    assert len(first) == 2 and all("runs in openvino (converted, cached" in line for line in first), first
    entries = sorted(path.name for path in cache.glob("*.xml"))
    assert len(entries) == 2
    again, score_again = start()
    assert len(again) == 2 and all("runs in openvino (from the cache" in line for line in again), again
    assert score_again == score
    assert sorted(path.name for path in cache.glob("*.xml")) == entries, "a restart adds nothing"
    # Other weights in the same folder: new entries, not the old model's towers (in this
    # process: what a start does with the cache is apply_runtime, and a third server start
    # would cost this busy 2-core machine ~8 s of CPU to show the same).
    synthetic.build_checkpoint(folder, arch="tiny", seed=12)
    changed = HFClipModel(str(folder), device="cpu")
    with caplog.at_level(logging.INFO, logger="clipserve_server.models.runtimes"):
        apply_runtime(changed, ServerConfig(model=(str(folder),), runtime_cache=str(cache)))
    lines = [record.getMessage() for record in caplog.records if " tower of " in record.getMessage()]
    assert len(lines) == 2 and all("runs in openvino (converted, cached" in line for line in lines), lines
    assert len(list(cache.glob("*.xml"))) == 4


def test_runtime_cache_off_converts_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # where the default cache would be
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # and a folder named "off"
    model = HFClipModel(str(tiny_checkpoint), device="cpu")
    apply_runtime(model, ServerConfig(model=(str(tiny_checkpoint),), runtime_cache="off"))
    assert (model.description.image_runtime, model.description.text_runtime) == ("openvino", "openvino")
    assert not any(tmp_path.rglob("*.xml"))


def test_a_tower_that_failed_its_check_is_not_converted_again_at_the_next_start(tiny_checkpoint, tmp_path, caplog):
    """The check is the same at every start of the same weights: a refused tower leaves a note in
    the cache instead of its converted files, and the next start runs it in torch at once, saying
    so and where the note is (a ViT-H tower spent ~85 s of a warm start failing again)."""
    cache = tmp_path / "cache"
    config = ServerConfig(model=(str(tiny_checkpoint),), runtime="openvino", runtime_cache=str(cache))
    apply_runtime(Unconvertible(str(tiny_checkpoint), device="cpu"), config)
    [note] = cache.glob("*.refused.json")
    assert not list(cache.glob(note.name.split(".")[0] + ".xml")), "the refused conversion is not kept"
    again = Unconvertible(str(tiny_checkpoint), device="cpu")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipserve_server.models.runtimes"):
        apply_runtime(again, config)
    assert again.description.image_runtime == "torch"
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("image tower of")]
    assert "more than 0.0001 (checked at an earlier start: " in line and str(note) in line, line
    assert "converted" not in line
