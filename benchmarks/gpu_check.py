"""The GPU run (started by benchmarks/gpu_check.sh, which sets up the imports): for each model,
the fp16 model-only bound, clipserve cold and warm, GPU utilisation during the cold pass and
where the server's time went in it (CPU by part, forward passes, how busy the model thread
was), the fp16-vs-fp32 score drift, the fast paths' drifts, the big model with one batch in
flight (256 pairs) instead of the default four, the event loop's own cost per image
(bench_feed.py --serial); --compile on CUDA. No network needed:
random-weight checkpoints with the real architectures, a generated corpus on loopback HTTP.

Settings come from the environment (gpu_check.sh documents them): GPU_CHECK_DEVICE (cuda; cpu
for a dry run of every step on tiny sizes), GPU_CHECK_ARCHS, GPU_CHECK_IMAGES, GPU_CHECK_QUERIES,
GPU_CHECK_PER_QUERY, GPU_CHECK_BATCH, GPU_CHECK_BUDGET_S (optional steps are skipped past it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import ROOT, make_corpus, make_workload  # noqa: E402
from corpus_host import serve_corpus  # noqa: E402
from server_probe import ServerProbe, describe, free_port  # noqa: E402

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
HALF = "float16" if ON_GPU else "bfloat16"  # the CPU's half precision, for the dry run
ARCHS = os.environ.get("GPU_CHECK_ARCHS", "vit-b-32,vit-h-14-378" if ON_GPU else "tiny:224,tiny:378").split(",")
IMAGES = int(os.environ.get("GPU_CHECK_IMAGES", "1200" if ON_GPU else "24"))
QUERIES = int(os.environ.get("GPU_CHECK_QUERIES", "40" if ON_GPU else "4"))
PER_QUERY = int(os.environ.get("GPU_CHECK_PER_QUERY", "100" if ON_GPU else "8"))
BATCH = int(os.environ.get("GPU_CHECK_BATCH", "256" if ON_GPU else "8"))
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
STARTED = time.monotonic()
REPORT: dict = {"device": DEVICE, "archs": {}}


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def time_left() -> float:
    return BUDGET_S - (time.monotonic() - STARTED)


# -- GPU utilisation ------------------------------------------------------------------------------------

class UtilisationSampler:
    """Mean GPU utilisation (%) while it runs: NVML every 50 ms, else nvidia-smi, else None."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UtilisationSampler:
        if ON_GPU:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            while not self._stop.wait(0.05):
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        except Exception:  # no NVML bindings: ask nvidia-smi
            while not self._stop.wait(0.1):
                try:
                    out = subprocess.run(
                        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    )
                    self.samples.append(float(out.stdout.split()[0]))
                except Exception:
                    return


# -- the server ----------------------------------------------------------------------------------------

class Server:
    """`clipserve serve` in a subprocess, killed if it is not ready within ``start_timeout_s``."""

    def __init__(self, checkpoint: Path, dtype: str, flags: list[str], start_timeout_s: float) -> None:
        self.metrics_port = free_port()
        command = [
            sys.executable,
            "-m",
            "clipserve.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            str(self.metrics_port),
            "--allow-private-networks",
            "--device",
            DEVICE,
            "--dtype",
            dtype,
            "--max-batch-size",
            str(BATCH),
            "--max-batch-delay-ms",
            "5",
            "--log-level",
            "WARNING",
            *flags,
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        timer = threading.Timer(start_timeout_s, self.proc.kill)
        timer.start()
        self.address = ""
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("clipserve listening on "):
                    self.address = "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
                if line.startswith("clipserve ready"):
                    return
            raise RuntimeError(f"the server exited with {self.proc.wait()} before it was ready (its log is above)")
        finally:
            timer.cancel()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def score_pass(server: Server, pairs: list[tuple[str, str]]) -> tuple[float, np.ndarray, float | None, dict]:
    """(pairs/s, scores, mean GPU utilisation, where the server's time went) of one
    score_batch over ``pairs`` by a fresh SDK client with its defaults, as a user runs it (it
    keeps outstanding what the server reads ahead)."""
    import clipserve

    inputs = [clipserve.SimilarityInput(q, u) for q, u in pairs]
    with clipserve.CLIP(server.address, timeout=600) as clip, UtilisationSampler() as gpu:
        probe = ServerProbe(server.proc.pid, server.metrics_port)
        started = time.perf_counter()
        results = clip.score_batch(inputs)
        elapsed = time.perf_counter() - started
        report = probe.report(elapsed)
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} pairs failed, e.g. {failed[0]}")
    return len(pairs) / elapsed, np.array([r.score for r in results]), gpu.mean, report


def served(
    checkpoint: Path,
    pairs: list[tuple[str, str]],
    dtype: str,
    flags: list[str],
    *,
    warm: bool = False,
    start_timeout_s: float = 240,
) -> dict:
    started = time.monotonic()
    server = Server(checkpoint, dtype, flags, start_timeout_s)
    try:
        result = {"start_s": round(time.monotonic() - started, 1)}
        result["cold_pairs_per_s"], scores, result["gpu_util_cold_pct"], result["cold_pass"] = score_pass(server, pairs)
        say(f"  cold pass: {describe(result['cold_pass'])}")
        if warm:
            result["warm_pairs_per_s"] = score_pass(server, pairs)[0]
        result["scores"] = scores
        return result
    finally:
        server.close()


# -- in-process: the bound and the precision drift --------------------------------------------------------

def model_bound(checkpoint: Path, corpus: dict[str, bytes], pairs: list[tuple[str, str]], cache: Path) -> dict:
    """Batched fp16 forwards over the distinct images (and texts) through the server's model
    class, in the runtime the server's default picks (torch on CUDA; OpenVINO bf16 on a dry
    run's CPU), preprocessing done beforehand: the most any server could get out of this GPU."""
    from clipserve_server.models.clip_model import HFClipModel
    from clipserve_server.models.runtimes import apply_runtime
    from clipserve_server.utils.config import ServerConfig

    model = HFClipModel(str(checkpoint), device=DEVICE, dtype=HALF)
    apply_runtime(model, ServerConfig(model=(str(checkpoint),), device=DEVICE, dtype=HALF, runtime_cache=str(cache)))
    model.warmup()
    texts = sorted({q for q, _ in pairs})
    names = sorted({u.rsplit("/", 1)[1] for _, u in pairs})
    pixels = [model.preprocess_image(Image.open(_bytes_io(corpus[n])).convert("RGB")) for n in names]
    model.forward(texts[:BATCH], pixels[:BATCH])  # the first batch of each shape pays for kernel selection
    started = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        model.forward([], pixels[i : i + BATCH])
    images_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        model.forward(texts[i : i + BATCH], [])
    texts_s = time.perf_counter() - started
    del model
    _free()
    return {"images_per_s": round(len(names) / images_s, 1), "pairs_per_s": round(len(pairs) / (images_s + texts_s), 1)}


def precision_drift(
    checkpoint: Path, corpus: dict[str, bytes], pairs: list[tuple[str, str]], sample: int = 64
) -> float:
    """Max |score(half) - score(float32)| over a sample of the pairs, same preprocessing."""
    from clipserve_server.models.clip_model import HFClipModel
    from clipserve_server.models.model import Embedding

    chosen = pairs[:: max(1, len(pairs) // sample)][:sample]
    names = sorted({u.rsplit("/", 1)[1] for _, u in chosen})
    texts = sorted({q for q, _ in chosen})
    scores = []
    for dtype in (HALF, "float32"):
        model = HFClipModel(str(checkpoint), device=DEVICE, dtype=dtype)
        pixels = [model.preprocess_image(Image.open(_bytes_io(corpus[n])).convert("RGB")) for n in names]
        text_emb, image_emb = model.forward(texts, pixels)
        by_name = {name: Embedding.of(row) for name, row in zip(names, image_emb)}
        by_text = {text: Embedding.of(row) for text, row in zip(texts, text_emb)}
        scores.append(np.array([model.score(by_text[q], by_name[u.rsplit("/", 1)[1]]) for q, u in chosen]))
        del model
        _free()
    return float(np.abs(scores[0] - scores[1]).max())


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def _free() -> None:
    import gc

    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


# -- one architecture ------------------------------------------------------------------------------------

def check(arch_spec: str, corpus: dict[str, bytes], base: str, scratch: Path, *, fast_paths: bool) -> tuple[dict, dict]:
    from clipserve_server.models.synthetic import build_checkpoint

    arch, _, size = arch_spec.partition(":")
    out: dict = {}
    started = time.monotonic()
    checkpoint = build_checkpoint(
        scratch / arch_spec.replace(":", "-"),
        arch=arch,
        image_size=int(size) if size else None,
        device=DEVICE,
        dtype=HALF,
    )
    say(f"{arch_spec}: random-weight checkpoint built in {time.monotonic() - started:.1f}s")
    pairs = make_workload(base, sorted(corpus), QUERIES, PER_QUERY, 0)
    out["workload"] = {"pairs": len(pairs), "distinct_images": len({u for _, u in pairs}), "batch": BATCH}

    out["bound"] = model_bound(checkpoint, corpus, pairs, scratch / "bound-runtime-cache")
    say(
        f"{arch_spec}: model-only bound {out['bound']['images_per_s']} images/s "
        f"({out['bound']['pairs_per_s']} pairs/s on this workload)"
    )

    exact = served(checkpoint, pairs, HALF, [], warm=True)
    exact_scores = exact.pop("scores")
    cold_images_per_s = exact["cold_pairs_per_s"] * out["workload"]["distinct_images"] / len(pairs)
    out["clipserve"] = exact | {
        "cold_fraction_of_bound": round(exact["cold_pairs_per_s"] / out["bound"]["pairs_per_s"], 2),
        "cold_images_per_s": round(cold_images_per_s, 1),
        "cold_fraction_of_image_bound": round(cold_images_per_s / out["bound"]["images_per_s"], 2),
    }
    say(
        f"{arch_spec}: clipserve cold {exact['cold_pairs_per_s']:.1f} pairs/s = "
        f"{out['clipserve']['cold_fraction_of_bound']} of the bound "
        f"({cold_images_per_s:.0f} distinct images/s = "
        f"{out['clipserve']['cold_fraction_of_image_bound']} of the images/s bound), "
        f"GPU {exact['gpu_util_cold_pct']}% busy; "
        f"warm {exact['warm_pairs_per_s']:.1f} pairs/s (server start {exact['start_s']}s)"
    )

    out["fp16_vs_fp32_max_abs_score_diff"] = precision_drift(checkpoint, corpus, pairs)
    say(f"{arch_spec}: {HALF} vs float32: max |score diff| {out['fp16_vs_fp32_max_abs_score_diff']:.4f} "
        f"(scores span {exact_scores.min():.2f}..{exact_scores.max():.2f})")

    if fast_paths:
        for name, flags in {"jpeg_draft": ["--jpeg-draft"], "gpu_decode": ["--gpu-decode"]}.items():
            out[name] = variant(arch_spec, name, flags, checkpoint, pairs, exact_scores, needs_s=40)
    else:
        # The server reads four batches ahead by default (1024 pairs here), so that decoding
        # overlaps a big model's long forward: against one batch (256, the default before).
        out["in_flight_256"] = variant(
            arch_spec, "in_flight_256", ["--stream-max-in-flight", "256"], checkpoint, pairs, exact_scores, needs_s=60
        )
    return out, {"arch": arch_spec, "checkpoint": checkpoint, "pairs": pairs, "exact_scores": exact_scores}


def variant(
    arch_spec: str,
    name: str,
    flags: list[str],
    checkpoint: Path,
    pairs: list[tuple[str, str]],
    exact_scores: np.ndarray,
    *,
    needs_s: float,
) -> dict:
    """A server with ``flags``: its cold speed and how far its scores are from the exact path's."""
    if time_left() < needs_s:
        say(f"{arch_spec}: {name} skipped: {time_left():.0f}s of the budget left")
        return {"skipped": f"{time_left():.0f}s of the budget left"}
    try:
        fast = served(checkpoint, pairs, HALF, flags, start_timeout_s=max(30.0, min(300.0, time_left() - 20)))
    except Exception as exc:  # e.g. --gpu-decode on a CPU dry run: refused, as it should be
        say(f"{arch_spec}: {name} did not run: {exc}")
        return {"failed": str(exc)[:300]}
    diff = np.abs(fast.pop("scores") - exact_scores)
    say(f"{arch_spec}: {name}: cold {fast['cold_pairs_per_s']:.1f} pairs/s, GPU {fast['gpu_util_cold_pct']}%, "
        f"max |score diff| vs exact {diff.max():.4f} (mean {diff.mean():.4f}), start {fast['start_s']}s")
    return fast | {"max_abs_score_diff": float(diff.max()), "mean_abs_score_diff": float(diff.mean())}


def runtime_step(first: dict, corpus: dict[str, bytes], scratch: Path, needs_s: float = 120) -> dict:
    """--runtime on this device against torch eager, in-process, on the first model: which towers
    pass the parity check at load, how far their features are from eager's (max L2 relative),
    and images/s and texts/s in batches of BATCH (a second pass: CUDA graphs are captured per
    shape in the first). On CUDA: cuda-graphs, and tensorrt where torch-tensorrt is installed,
    on the half-precision towers; the dry run runs the same code with OpenVINO on the CPU."""
    import importlib.util

    from clipserve_server.models.clip_model import HFClipModel
    from clipserve_server.models.runtimes import apply_runtime
    from clipserve_server.utils.config import ServerConfig

    if ON_GPU:
        runtimes, dtype = ["cuda-graphs"] + (["tensorrt"] if importlib.util.find_spec("torch_tensorrt") else []), HALF
    else:
        runtimes, dtype = ["openvino"], "float32"
    pairs, checkpoint = first["pairs"], first["checkpoint"]
    texts = sorted({q for q, _ in pairs})
    names = sorted({u.rsplit("/", 1)[1] for _, u in pairs})

    def measure(runtime: str) -> tuple[dict, np.ndarray, np.ndarray]:
        model = HFClipModel(str(checkpoint), device=DEVICE, dtype=dtype)
        started = time.perf_counter()
        if runtime != "torch":
            apply_runtime(
                model,
                ServerConfig(
                    model=(str(checkpoint),),
                    device=DEVICE,
                    dtype=dtype,
                    runtime=runtime,
                    runtime_cache=str(scratch / "runtime-cache"),
                ),
            )
        load_s = time.perf_counter() - started
        pixels = [model.preprocess_image(Image.open(_bytes_io(corpus[n])).convert("RGB")) for n in names]
        for _ in range(2):  # the second pass is timed
            started = time.perf_counter()
            image_out = np.concatenate(
                [model.forward([], pixels[i : i + BATCH])[1] for i in range(0, len(pixels), BATCH)]
            )
            images_s = time.perf_counter() - started
            started = time.perf_counter()
            text_out = np.concatenate([model.forward(texts[i : i + BATCH], [])[0] for i in range(0, len(texts), BATCH)])
            texts_s = time.perf_counter() - started
        d = model.description
        result = {"image_runtime": d.image_runtime, "text_runtime": d.text_runtime, "load_s": round(load_s, 1),
                  "images_per_s": round(len(pixels) / images_s, 1), "texts_per_s": round(len(texts) / texts_s, 1)}
        del model
        _free()
        return result, image_out, text_out

    if time_left() < needs_s:
        say(f"runtimes skipped: {time_left():.0f}s of the budget left")
        return {"skipped": f"{time_left():.0f}s of the budget left"}
    out: dict = {}
    out["torch"], eager_images, eager_texts = measure("torch")
    say(
        f"{first['arch']}: runtime torch ({dtype}): "
        f"{out['torch']['images_per_s']} images/s, {out['torch']['texts_per_s']} texts/s"
    )
    for runtime in runtimes:
        if time_left() < needs_s:
            out[runtime] = {"skipped": f"{time_left():.0f}s of the budget left"}
            continue
        try:
            result, images, texts_out = measure(runtime)
        except Exception as exc:
            say(f"{first['arch']}: runtime {runtime} failed: {exc}")
            out[runtime] = {"failed": str(exc)[:300]}
            continue
        relative = lambda got, want: float((np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max())  # noqa: E731
        result |= {
            "image_max_rel_diff": relative(images, eager_images),
            "text_max_rel_diff": relative(texts_out, eager_texts),
            "images_speedup": round(result["images_per_s"] / out["torch"]["images_per_s"], 2),
            "texts_speedup": round(result["texts_per_s"] / out["torch"]["texts_per_s"], 2),
        }
        out[runtime] = result
        say(
            f"{first['arch']}: runtime {runtime}: image tower in {result['image_runtime']}, "
            f"text in {result['text_runtime']} (load {result['load_s']}s); "
            f"{result['images_per_s']} images/s (x{result['images_speedup']}), "
            f"{result['texts_per_s']} texts/s (x{result['texts_speedup']}); "
            "max relative feature diff vs eager: "
            f"images {result['image_max_rel_diff']:.1e}, texts {result['text_max_rel_diff']:.1e}"
        )
    return out


def instances_and_devices(kept: dict) -> dict:
    """On the first (small) model, what issue 23 added: --instances 2 against the default one
    (forwards side by side on one GPU), the batched nvJPEG decode (--gpu-decode) with one and
    two instances, and a device list (cuda:all with several GPUs; else cuda:0 listed twice,
    two copies of the weights on one GPU). Each: cold pairs/s, distinct images/s, GPU busy %,
    the score drift from the exact path."""
    arch, pairs, exact = kept["arch"], kept["pairs"], kept["exact_scores"]
    several = ON_GPU and torch.cuda.device_count() > 1
    devices = "cuda:all" if several else (f"{DEVICE},{DEVICE}" if ON_GPU else "cpu,cpu")
    steps = {
        "instances_2": ["--instances", "2"],
        "gpu_decode_batched": ["--gpu-decode"],
        "gpu_decode_instances_2": ["--gpu-decode", "--instances", "2"],
        "devices": ["--device", devices],
    }
    distinct = len({u for _, u in pairs})
    out: dict = {"devices_flag": devices}
    for name, flags in steps.items():
        out[name] = variant(arch, name, flags, kept["checkpoint"], pairs, exact, needs_s=40)
        if "cold_pairs_per_s" in out[name]:
            out[name]["cold_images_per_s"] = round(out[name]["cold_pairs_per_s"] * distinct / len(pairs), 1)
            say(f"{arch}: {name}: {out[name]['cold_images_per_s']:.0f} distinct images/s cold")
    return out


def serial_part(needs_s: float = 40) -> dict:
    """The event loop's CPU per image and per pair where nothing else costs anything (tiny
    JPEGs, the fake model; bench_feed.py --serial, one round): on this many cores the loop has
    a core of its own, which the 2-core development machine cannot give it."""
    if time_left() < needs_s:
        say(f"serial part skipped: {time_left():.0f}s of the budget left")
        return {"skipped": f"{time_left():.0f}s of the budget left"}
    from bench_feed import serial

    say("serial part (bench_feed.py --serial --rounds 1):")
    return serial(rounds=1, images=2000 if ON_GPU else 200, window=256, seed=0)


def main() -> int:
    if ON_GPU and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (GPU_CHECK_DEVICE=cpu runs the dry run)", file=sys.stderr)
        return 2
    REPORT["machine"] = {
        "gpu": torch.cuda.get_device_name(0) if ON_GPU else None, "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    say(f"device {DEVICE} ({REPORT['machine']['gpu'] or 'dry run'}), {os.cpu_count()} cores, archs {ARCHS}, "
        f"{IMAGES} images, {QUERIES}x{PER_QUERY} pairs, batch {BATCH}, budget {BUDGET_S:.0f}s")
    corpus = make_corpus(IMAGES, 0, workers=min(16, os.cpu_count() or 1))
    httpd, base = serve_corpus(corpus)
    say(f"corpus: {len(corpus)} images, {sum(map(len, corpus.values())) / 1e6:.0f} MB on {base}")
    scratch = Path(tempfile.mkdtemp(prefix="clipserve-gpu-"))
    try:
        first = None
        for i, arch in enumerate(ARCHS):
            # The fast paths on the first (cheap) model; the big one gets the time.
            REPORT["archs"][arch], kept = check(arch, corpus, base, scratch, fast_paths=i == 0)
            first = first or kept
        if first is not None:
            REPORT["instances"] = instances_and_devices(first)
        REPORT["serial"] = serial_part()
        if first is not None:
            REPORT["archs"][first["arch"]]["runtimes"] = runtime_step(first, corpus, scratch)
        if ON_GPU and first is not None:  # last: compiling takes a minute or two, the rest comes first
            REPORT["archs"][first["arch"]]["compile"] = variant(
                first["arch"],
                "compile",
                ["--compile"],
                first["checkpoint"],
                first["pairs"],
                first["exact_scores"],
                needs_s=150,
            )
    finally:
        httpd.shutdown()
        out = ROOT / "benchmarks" / "results" / "gpu_check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(REPORT, indent=2, default=float))
        say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
