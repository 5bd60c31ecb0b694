"""OpenVINO on CPU gives each instance that calls a tower a stream of its own (openvino.py)."""

from __future__ import annotations

import pytest

from clipserve_server.models.runtimes import openvino

pytestmark = pytest.mark.skipif(not openvino.available(), reason="OpenVINO is not installed")


def _compiled(config: dict):
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 4], ov.Type.f32, name="x")
    model = ov.Model([ops.relu(ops.matmul(x, ops.constant(np.eye(4, dtype=np.float32)), False, False))], [x])
    return ov.Core().compile_model(model, "CPU", config)


def test_one_instance_runs_one_latency_stream_on_its_threads():
    config = openvino.compile_config("float32", threads=2, streams=1)
    assert config == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}
    assert _compiled(config).get_property("NUM_STREAMS") == 1


def test_two_instances_get_two_streams_of_their_share_each_not_one_stream_of_one_share():
    """--instances 2 on two cores: one thread an instance, two streams side by side (one stream
    of one thread ran both instances' forwards one after another on one core)."""
    config = openvino.compile_config("bfloat16", threads=1, streams=2)
    assert config["NUM_STREAMS"] == 2 and config["INFERENCE_NUM_THREADS"] == 2
    assert config["INFERENCE_PRECISION_HINT"] == "bf16"
    compiled = _compiled(config)
    assert compiled.get_property("NUM_STREAMS") == 2
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
