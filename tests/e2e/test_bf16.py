"""bfloat16 on the CPU (--dtype bfloat16): the towers run in OpenVINO at bf16 precision, checked
against torch in bfloat16 (1e-2 relative), falling back to torch bfloat16 with one log line.

Scores through the server stay within the bf16 tolerance (1e-2 * exp(logit_scale)) of torch's
own bfloat16 forward in-process; on a CPU without native bf16 one log line says what bfloat16
runs as there. float32 is untouched (test_runtimes.py, test_families.py).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest

import clipserve
from clipserve_server.models.clip_model import HFClipModel
from clipserve_server.models.runtimes import apply_runtime, choose, openvino, parity
from clipserve_server.models.runtimes.cache import entry_key
from clipserve_server.utils.config import ServerConfig

from ..conftest import ServerProcess
from ..helpers import InProcessServer
from .test_runtimes import runtime_lines, scored

pytestmark = pytest.mark.cost(15.5)  # its CPU cost among the files (tests/conftest.py)

BF16_TOLERANCE = parity.TOLERANCES["bfloat16"]  # relative, in units of exp(logit_scale)
RUNTIMES_LOGGER = "clipserve_server.models.runtimes"


def torch_scores(checkpoint: Path, folder: Path, dtype: str) -> list[float]:
    """``scored``'s pairs through torch's own towers in ``dtype``, served in-process."""
    model = HFClipModel(str(checkpoint), device="cpu", dtype=dtype)
    server = InProcessServer(ServerConfig(model=(str(checkpoint),), dtype=dtype, runtime="torch"), model)
    try:
        return [score for _, _, score in scored(server.address, folder)]
    finally:
        server.stop()


def runtime_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith(RUNTIMES_LOGGER)]


def test_auto_picks_openvino_for_bfloat16_on_the_cpu_and_torch_for_float16():
    assert choose("auto", "cpu", "bfloat16", compile=False) == "openvino"
    assert choose("auto", "cpu", "float16", compile=False) == "torch"
    assert choose("auto", "cuda", "bfloat16", compile=False) == "torch"
    assert choose("auto", "cpu", "bfloat16", compile=True) == "torch"


def test_the_conversion_cache_keeps_a_precision_apart(tiny_checkpoint):
    tower = HFClipModel(str(tiny_checkpoint), device="cpu").towers()["image"]
    keys = {entry_key(tower, "openvino", "v", "weights", precision) for precision in ("f32", "bf16")}
    assert len(keys) == 2


def test_a_bfloat16_server_runs_its_towers_in_openvino_within_the_bf16_tolerance_of_torch_bfloat16(
    tiny_checkpoint, tmp_path
):
    # A cache of its own: the conversion runs here, and its tracing noise must not reach the log.
    server = ServerProcess(
        ["--model", str(tiny_checkpoint), "--dtype", "bfloat16", "--runtime-cache", str(tmp_path / "cache")]
    )
    try:
        with clipserve.CLIP(server.address) as clip:
            info = clip.model_info()
        assert info.dtype == "bfloat16"
        assert info.image_runtime == "openvino"  # the tower the time goes to; text: what the check allowed
        lines = runtime_lines(server)
        assert len(lines) == 2, lines
        for tower, runtime in (("image", info.image_runtime), ("text", info.text_runtime)):
            assert sum(f"{tower} tower of {tiny_checkpoint} runs in {runtime}" in line for line in lines) == 1, lines
        log = "".join(server.log)
        assert "TracerWarning" not in log and "torch.jit.trace" not in log and "Warning:" not in log, log
        served = [score for _, _, score in scored(server.address, tmp_path)]
    finally:
        assert server.terminate() == 0, "".join(server.log)
    assert served == pytest.approx(
        torch_scores(tiny_checkpoint, tmp_path, "bfloat16"), abs=BF16_TOLERANCE * info.logit_scale
    )
    # bfloat16 it is, not float32 in disguise: the scores moved off float32's.
    assert served != pytest.approx(torch_scores(tiny_checkpoint, tmp_path, "float32"), abs=1e-6)


def test_bfloat16_towers_that_fail_the_check_run_in_torch_bfloat16_and_say_why(
    tiny_checkpoint, tmp_path, caplog, monkeypatch
):
    monkeypatch.setitem(parity.TOLERANCES, "bfloat16", 1e-9)  # no bf16 runtime is that close to torch's
    model = HFClipModel(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger=RUNTIMES_LOGGER):
        apply_runtime(
            model, ServerConfig(model=(str(tiny_checkpoint),), dtype="bfloat16", runtime_cache=str(tmp_path / "cache"))
        )
    assert (model.description.image_runtime, model.description.text_runtime) == ("torch", "torch")
    lines = [line for line in runtime_messages(caplog) if " tower of " in line]
    assert len(lines) == 2, lines
    for line, tower in zip(lines, ("image", "text")):
        assert line.startswith(
            f"{tower} tower of {tiny_checkpoint} runs in torch: in openvino its features differ from torch's by "
        ), line
        assert line.endswith("more than 1e-09"), line
    assert not any(parameter.is_meta for parameter in model._model.parameters())  # torch still runs them
    server = InProcessServer(ServerConfig(model=(str(tiny_checkpoint),), dtype="bfloat16"), model)
    try:
        fallen_back = [score for _, _, score in scored(server.address, tmp_path)]
    finally:
        server.stop()
    assert fallen_back == torch_scores(tiny_checkpoint, tmp_path, "bfloat16")  # torch bfloat16 itself, exactly


def test_a_cpu_without_native_bf16_is_told_what_bfloat16_runs_as(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(openvino, "native_bf16", lambda: False)
    model = HFClipModel(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger=RUNTIMES_LOGGER):
        apply_runtime(
            model, ServerConfig(model=(str(tiny_checkpoint),), dtype="bfloat16", runtime_cache=str(tmp_path / "cache"))
        )
    said = [line for line in runtime_messages(caplog) if "native bfloat16" in line]
    assert len(said) == 1, runtime_messages(caplog)
    assert "runs the bfloat16 towers at float32 precision" in said[0] and "no gain over --dtype float32" in said[0]


def test_a_cpu_with_native_bf16_is_not_told_anything_more(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(openvino, "native_bf16", lambda: True)
    model = HFClipModel(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger=RUNTIMES_LOGGER):
        apply_runtime(
            model, ServerConfig(model=(str(tiny_checkpoint),), dtype="bfloat16", runtime_cache=str(tmp_path / "cache"))
        )
    assert not [line for line in runtime_messages(caplog) if "native bfloat16" in line]
    assert model.description.image_runtime == "openvino"


def test_a_long_conversion_says_each_stage_it_finishes(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    """ViT-H's image tower takes minutes: once 15 s have gone by (here: at once), each stage says so."""
    from clipserve_server.models.runtimes import select

    monkeypatch.setattr(select, "_progress", functools.partial(select._progress, first_s=0.0))
    model = HFClipModel(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger=RUNTIMES_LOGGER):
        apply_runtime(
            model, ServerConfig(model=(str(tiny_checkpoint),), dtype="bfloat16", runtime_cache=str(tmp_path / "cache"))
        )
    for tower in ("image", "text"):
        doing = f"{tower} tower of {tiny_checkpoint} for openvino (bf16): "
        stages = [
            line[len(doing) :].split(",")[0]
            for line in runtime_messages(caplog)
            if line.startswith(doing) and "still working" not in line
        ]
        assert stages == ["traced", "converted", "compiled", "checking against torch"], runtime_messages(caplog)
