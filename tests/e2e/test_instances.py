"""Model instances and device lists: ``--instances N`` forward workers per model per device,
fed by the model's one batcher; ``--device cpu,cpu`` stands in for several GPUs."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

import clipserve
from clipserve_server.inference.instances import Instance, InstancePool
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.models.memory import GIB, ModelsTooLarge, check_fits, weight_bytes
from clipserve_server.config_loaders import load_config
from clipserve_server.utils.config import ServerConfig, model_specs
from clipserve_server.utils.errors import ErrorKind, ItemError

from ..conftest import ServerProcess
from ..helpers import InProcessServer, make_batcher, make_image
from .test_faults import health, wait_until

pytestmark = pytest.mark.cost(3)  # its CPU cost among the files (tests/conftest.py)


class InstanceCrash(BaseException):
    """Not an ordinary error: what a thread that cannot go on raises."""


class Side:
    """The forward of one instance: it waits at ``barrier`` (so a test knows two forwards ran at
    once) and answers each image ``n`` with the row (its own id, n)."""

    def __init__(self, ident: int, barrier: threading.Barrier | None = None, fail: BaseException | None = None) -> None:
        self.ident = ident
        self.barrier = barrier
        self.fail = fail
        self.batches: list[list[int]] = []

    def __call__(self, texts, images):
        self.batches.append(list(images))
        if self.barrier is not None:
            self.barrier.wait()
        if self.fail is not None:
            raise self.fail
        return np.zeros((0, 2), np.float32), np.array([[self.ident, n] for n in images], np.float32).reshape(
            len(images), 2
        )


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def pool_of(sides: list[Side], devices: list[str]) -> InstancePool:
    return InstancePool([Instance(device, i, side) for i, (device, side) in enumerate(zip(devices, sides))])


def test_two_instances_run_two_batches_at_once_each_whole_and_answer_each_item_from_its_own():
    """8 items, batches of 4, two instances whose forwards only return once both are running:
    they must overlap (one at a time would break the barrier), each batch goes whole to one
    instance, and each item's row comes back from the instance that encoded it."""
    barrier = threading.Barrier(2, timeout=20)
    sides = [Side(1, barrier), Side(2, barrier)]

    async def main():
        batcher = make_batcher(pool_of(sides, ["cpu", "cpu"]), max_batch_size=4, max_delay_s=0.05, max_queue_size=100)
        batcher.start()
        rows = await asyncio.gather(*(batcher.encode_image(n, wait=True) for n in range(8)))
        await batcher.stop()
        return rows

    rows = run(main())
    assert [len(side.batches) for side in sides] == [1, 1]
    assert sorted(n for side in sides for n in side.batches[0]) == list(range(8))
    assert all(len(side.batches[0]) == 4 for side in sides)
    owner = {n: side.ident for side in sides for n in side.batches[0]}
    assert [tuple(row) for row in rows] == [(owner[n], n) for n in range(8)]


def test_two_devices_share_the_work_before_either_runs_two_forwards():
    """Two devices with two instances each: the first two batches go one to each device."""
    barrier = threading.Barrier(2, timeout=20)
    sides = [Side(i, barrier) for i in range(4)]
    devices = ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]

    async def main():
        batcher = make_batcher(pool_of(sides, devices), max_batch_size=2, max_delay_s=0.05, max_queue_size=100)
        batcher.start()
        await asyncio.gather(*(batcher.encode_image(n, wait=True) for n in range(4)))
        await batcher.stop()

    run(main())
    assert sorted(devices[side.ident] for side in sides if side.batches) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("how", ["forward raises", "thread never starts"])
def test_a_dying_instance_fails_its_batch_and_what_waits_and_reports_itself(how):
    """An instance that cannot go on (its forward raises what is not an ordinary error, or its
    thread cannot start) fails its batch, the batcher then refuses work (UNAVAILABLE) and tells
    on_dead once: no caller hangs."""
    deaths: list[BaseException] = []

    def broken_setup():
        raise RuntimeError("no thread for you")

    if how == "forward raises":
        instances = [Instance("cpu", 0, Side(0, fail=InstanceCrash("gone"))), Instance("cpu", 1, Side(1))]
    else:
        instances = [Instance("cpu", 0, Side(0), thread_setup=broken_setup), Instance("cpu", 1, Side(1))]

    async def main():
        batcher = make_batcher(
            InstancePool(instances), max_batch_size=4, max_delay_s=0.0, max_queue_size=100, on_dead=deaths.append
        )
        batcher.start()
        with pytest.raises(ItemError) as first:
            await batcher.encode_image(1, wait=True)
        with pytest.raises(ItemError) as later:
            await batcher.encode_image(2, wait=True)
        alive = batcher.alive
        stats = batcher.instances.stats()
        await batcher.stop()
        return first.value, later.value, alive, stats

    first, later, alive, stats = run(main())
    assert first.kind is ErrorKind.INTERNAL and "instance failed" in first.message
    assert later.kind is ErrorKind.UNAVAILABLE and "instance" in later.message
    assert not alive and len(deaths) == 1
    assert [s.alive for s in stats] == [False, True]


def test_a_server_on_two_cpu_devices_loads_each_model_once_per_device_and_reports_every_instance():
    """``--device cpu,cpu --instances 2``: the model is loaded once per device, GetModelInfo and
    the metrics list four instances by device, and every text is encoded exactly once."""
    loaded: list[str] = []

    def factory(spec, config):
        loaded.append(config.device)
        return FakeModel(forward_delay_s=0.01)

    server = InProcessServer(
        ServerConfig(device="cpu,cpu", instances=2, max_batch_size=4, max_batch_delay_ms=1), factory
    )
    try:
        texts = [f"text {i}" for i in range(40)]
        with clipserve.CLIP(server.address) as clip:
            assert all(r.error is None for r in clip.embed_texts(texts, progress=False))
            info = clip.model_info()
        assert loaded == ["cpu", "cpu"]
        assert info.device == "cpu,cpu#2"
        assert [(i.device, i.index) for i in info.instances] == [("cpu", 0), ("cpu", 1), ("cpu#2", 0), ("cpu#2", 1)]
        assert all(i.alive for i in info.instances)
        assert sum(i.items for i in info.instances) == len(texts)
        assert sum(i.forwards for i in info.instances) >= len(texts) // 4
        exposed = generate_latest(server.server.metrics.registry).decode()
        assert 'clipserve_instance_items_total{device="cpu#2",instance="1",model="default"}' in exposed
        assert 'clipserve_instance_up{device="cpu",instance="0",model="default"} 1.0' in exposed
    finally:
        server.stop()


def test_vectors_are_the_same_whatever_the_instances_and_a_second_pass_comes_from_the_one_cache():
    """One instance, or three on each of two devices: the same vectors; the second pass of the
    same texts runs no forward pass (the model's one cache answers it, whatever the instances)."""
    texts = [f"query number {i}" for i in range(300)]
    vectors = {}
    for config in (ServerConfig(), ServerConfig(device="cpu,cpu", instances=3, max_batch_size=8)):
        server = InProcessServer(config, FakeModel(forward_delay_s=0.005))
        try:
            with clipserve.CLIP(server.address) as clip:
                vectors[config.instances] = np.array([r.embedding for r in clip.embed_texts(texts, progress=False)])
                before = clip.model_info()
                again = np.array([r.embedding for r in clip.embed_texts(texts, progress=False)])
                after = clip.model_info()
        finally:
            server.stop()
        assert np.array_equal(again, vectors[config.instances])
        assert [i.forwards for i in after.instances] == [i.forwards for i in before.instances]
        assert after.text_cache.hits - before.text_cache.hits == len(texts)
        assert sum(i.items for i in after.instances) == len(texts)
    assert np.array_equal(vectors[1], vectors[3])


def test_a_failing_instance_turns_the_server_not_serving_instead_of_hanging(tmp_path):
    """One of two instances dies: its items fail INTERNAL, health turns NOT_SERVING (and the Open
    Inference Protocol's ServerReady and ModelReady say not ready, as KServe's probes read them),
    and later calls are refused UNAVAILABLE at once (clients retry elsewhere)."""
    import tritonclient.grpc as triton
    model = FakeModel()
    server = InProcessServer(ServerConfig(instances=2), model)
    path = tmp_path / "x.png"
    path.write_bytes(make_image(seed=3))
    try:
        assert health(server.address) == "SERVING"
        model.fail_with = InstanceCrash("the device fell off the bus")
        with clipserve.CLIP(server.address, retry=clipserve.RetryPolicy(max_attempts=1)) as clip:
            with pytest.raises(clipserve.ClipServeError) as failed:
                clip.score("first", str(path))
            wait_until(lambda: health(server.address) == "NOT_SERVING", timeout=10)
            with pytest.raises(clipserve.ClipServeError) as refused:
                clip.score("second", str(path))
        assert failed.value.code == grpc.StatusCode.INTERNAL and "fell off the bus" in failed.value.details
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        with triton.InferenceServerClient(url=server.address) as v2:
            assert v2.is_server_live() and not v2.is_server_ready() and not v2.is_model_ready("default")
    finally:
        server.stop()


def test_instances_and_device_lists_are_read_from_flags_environment_and_files(tmp_path):
    """``--instances`` / ``CLIPSERVE_INSTANCES`` / ``instances`` in clipserve.toml, and a
    device list; nonsense is refused before anything loads."""
    toml = tmp_path / "clipserve.toml"
    toml.write_text('[server]\ninstances = 3\ndevice = "cuda:0,cuda:1"\n')
    assert load_config(["--config", str(toml)], environ={}).instances == 3
    assert load_config([], environ={"CLIPSERVE_INSTANCES": "2", "CLIPSERVE_DEVICE": "cpu,cpu"}).device == "cpu,cpu"
    assert (
        load_config(["--instances", "4", "--device", "cuda:all"], environ={"CLIPSERVE_INSTANCES": "2"}).instances == 4
    )
    with pytest.raises(ValueError, match="instances must be at least 1"):
        ServerConfig(instances=0)
    with pytest.raises(ValueError, match="empty entry"):
        ServerConfig(device="cuda:0,,cuda:1")
    with pytest.raises(ValueError, match="gpu_decode"):
        ServerConfig(device="cuda:0,cpu", gpu_decode=True)


def test_the_memory_check_counts_each_device_on_its_own(tiny_checkpoint):
    """Each device of the list holds the weights once and is checked on its own against the
    budget per device; a device listed twice (``cpu,cpu``) holds two copies in the same memory,
    so it needs room for both, and a refusal names the device and the copies."""
    size = weight_bytes(str(tiny_checkpoint), "float32")
    assert size
    specs = model_specs([str(tiny_checkpoint)])
    check_fits(specs, ServerConfig(device="cpu", memory_budget_gb=1.5 * size / GIB))
    check_fits(specs, ServerConfig(device="cpu,cpu", memory_budget_gb=2.5 * size / GIB))
    with pytest.raises(ModelsTooLarge, match="on cpu .*2 copies.*per device"):
        check_fits(specs, ServerConfig(device="cpu,cpu", memory_budget_gb=1.5 * size / GIB))
    with pytest.raises(ModelsTooLarge, match="on cpu .*per device"):
        check_fits(specs, ServerConfig(device="cpu", memory_budget_gb=0.5 * size / GIB))


def test_instances_on_the_cpu_split_its_threads_between_them():
    """N model threads on the CPU each get 1/N of the process's intra-op threads (at least
    one): together they use the cores once, not N times over."""
    import torch

    from clipserve_server.utils.threads import model_thread_setup

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        counts = {}
        for share in (1, 2, 4, 8):
            setup = model_thread_setup(share=share)

            def probe(setup=setup, share=share):
                setup()
                counts[share] = torch.get_num_threads()

            thread = threading.Thread(target=probe)
            thread.start()
            thread.join()
    finally:
        torch.set_num_threads(before)
    assert counts == {1: 4, 2: 2, 4: 1, 8: 1}


def test_a_real_model_on_two_cpu_devices_with_two_instances_each_scores_as_the_reference(
    tiny_checkpoint, reference, image_host
):
    """`clipserve serve --device cpu,cpu --instances 2` on the tiny checkpoint: loaded twice,
    four model threads with a core share each, and every score is the model's own
    logits_per_image (within 1e-4 x exp(logit_scale)), each pair encoded once."""
    server = ServerProcess(
        [
            "--model",
            str(tiny_checkpoint),
            "--device",
            "cpu,cpu",
            "--instances",
            "2",
            "--allow-private-networks",
            "--max-batch-size",
            "4",
        ]
    )
    try:
        names = [f"photo{i}.{ext}" for i in range(6) for ext in ("png", "jpg")]
        pairs = [
            clipserve.SimilarityInput(f"query {i} about a photo", f"{image_host.base}/img/{name}")
            for i, name in enumerate(names)
        ]
        with clipserve.CLIP(server.address) as clip:
            results = clip.score_batch(pairs)
            info = clip.model_info()
        for pair, result in zip(pairs, results):
            expected = reference(pair.query, image_host.images[pair.image_url.rsplit("/", 1)[1]])
            assert result.score == pytest.approx(expected, abs=reference.tolerance)
        assert info.device == "cpu,cpu#2" and len(info.instances) == 4
        assert sum(i.items for i in info.instances) == 2 * len(pairs)
    finally:
        assert server.terminate() == 0, "".join(server.log)


def test_a_device_list_names_each_device_once_and_cuda_all_needs_cuda():
    """Each entry is a device of its own; one listed again is told apart by #2, #3; ``cuda:all``
    on a machine without CUDA is refused with a reason, not read as no device at all."""
    import torch

    from clipserve_server.models.devices import resolve_devices

    assert [(d.name, d.torch) for d in resolve_devices("cpu, cpu,cpu")] == [
        ("cpu", "cpu"),
        ("cpu#2", "cpu"),
        ("cpu#3", "cpu"),
    ]
    assert [d.name for d in resolve_devices("cuda:0,cuda:1")] == ["cuda:0", "cuda:1"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda:all .* CUDA is not available"):
            resolve_devices("cuda:all")
