"""The reference config's model on the CPU: ViT-H/14-378-shaped random weights, float32 and bfloat16.

    python benchmarks/bench_large.py                      # float32 and bfloat16, 8 images, 2 reference pairs

apple/DFN5B-CLIP-ViT-H-14-378's architecture (``synthetic.build_checkpoint(arch="vit-h-14-378")``,
~1B parameters, 4 GB in float32), served by ``clipserve serve`` at each --dtype with every other
flag at its default, one server at a time:

  start-up with a cold conversion cache (convert, cache, check) and its peak RSS (the server and
  its children, sampled every 0.2 s: conversion is where a large model's memory peaks), then
  images/s embedding --images distinct photos on that cold server (the SDK's embed_images);
  start-up with the warm cache and its peak RSS;
  the reference adapter in a fresh process in the same dtype (``AutoModel.from_pretrained`` with
  ``torch_dtype``, one full forward per pair, as its score() does): seconds per pair, peak RSS.

Memory: a guard watches the machine's available memory and kills the process it is measuring
if it falls under --min-available-gb (the machine is shared); the run then stops and says so.
Prints a table and writes JSON (--out); name the CPU and the load (printed) beside the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench_infinity import stop
from bench_throughput import ROOT, load_average, make_corpus, measure_embed
from corpus_host import serve_corpus

GB = 1e9


class MemoryGuard:
    """Samples the peak RSS of one process tree, and kills it if the machine runs short."""

    def __init__(self, pid: int, min_available_gb: float, kill: Callable[[], None]) -> None:
        self.peak_bytes = 0
        self.tripped = False
        self._stop = threading.Event()
        self._pid, self._floor, self._kill = pid, min_available_gb * GB, kill
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            root = psutil.Process(self._pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.wait(0.2):
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            if psutil.virtual_memory().available < self._floor:
                self.tripped = True
                self._kill()
                return

    def stop(self) -> float:
        """Stop watching; the peak RSS in GB."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes / GB


def start_server(
    checkpoint: Path, dtype: str, cache: Path, min_available_gb: float
) -> tuple[subprocess.Popen, str, float, float, list[str]]:
    """A server at ``dtype`` (other flags at their defaults); returns it, its address, the
    seconds to ready, the peak RSS in GB while starting, and its log lines so far."""
    command = [
        sys.executable,
        "-m",
        "clipserve.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        str(checkpoint),
        "--dtype",
        dtype,
        "--runtime-cache",
        str(cache),
        "--allow-private-networks",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    guard = MemoryGuard(proc.pid, min_available_gb, proc.kill)
    assert proc.stdout is not None
    lines: list[str] = []
    address = ""
    for line in proc.stdout:
        lines.append(line.rstrip())
        if " tower of " in line:
            print("  server: " + line.rstrip().split(": ", 1)[-1], flush=True)
        if line.startswith("clipserve listening on "):
            address = "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
        if line.startswith("clipserve ready"):
            break
    else:
        guard.stop()
        raise RuntimeError(
            (
                "killed: the machine's available memory fell under the guard's floor"
                if guard.tripped
                else f"server exited with {proc.wait()}"
            )
            + "\n"
            + "\n".join(lines[-20:])
        )
    seconds = time.perf_counter() - started
    peak = guard.stop()
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]  # keep the pipe drained
    return proc, address, seconds, peak, lines


def reference_per_pair(checkpoint: Path, dtype: str, pairs: list[tuple[str, bytes]]) -> float:
    """The reference adapter's score() in ``dtype``: one full forward per pair (seconds per pair)."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def score(query: str, data: bytes) -> float:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(text=[query], images=image, return_tensors="pt", padding=True)
        with torch.no_grad():
            return float(model(**inputs).logits_per_image[0][0])

    score(*pairs[0])  # its first call's warm-up
    started = time.perf_counter()
    for query, data in pairs:
        score(query, data)
    return (time.perf_counter() - started) / len(pairs)


def in_fresh_process(min_available_gb: float, function: Callable[..., float], *args: object) -> tuple[float, float]:
    """``function(*args)`` in a new interpreter under the memory guard: its result, peak RSS (GB)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int, 0).result()  # the worker is up: guard its pid
        (worker,) = pool._processes.values()  # type: ignore[attr-defined]
        guard = MemoryGuard(worker.pid, min_available_gb, worker.kill)
        try:
            result = pool.submit(function, *args).result()
        finally:
            peak = guard.stop()
    if guard.tripped:
        raise RuntimeError("killed: the machine's available memory fell under the guard's floor")
    return result, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--images", type=int, default=8, help="distinct photos embedded on the cold server")
    parser.add_argument(
        "--reference-pairs", type=int, default=2, help="pairs timed for the reference adapter (after one warm-up)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a vit-h-14-378 checkpoint folder")
    parser.add_argument(
        "--min-available-gb",
        type=float,
        default=3.0,
        help="kill the measured process when the machine's available memory falls under this",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "large.json")
    args = parser.parse_args(argv)

    from clipserve_server.models.synthetic import build_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="clipserve-large-"))
    if args.checkpoint is None:
        print("building the ViT-H/14-378-shaped random checkpoint (minutes on a few cores)...", flush=True)
    checkpoint = args.checkpoint or build_checkpoint(scratch / "vit-h-14-378-random", arch="vit-h-14-378")
    corpus = make_corpus(args.images, seed=0)
    httpd, base = serve_corpus(corpus)
    urls = [f"{base}/{name}" for name in sorted(corpus)]
    pairs = [
        (f"a photo of a dog number {i}", data)
        for i, data in enumerate(list(corpus.values())[: args.reference_pairs + 1])
    ]
    results: dict[str, dict[str, float]] = {}
    for dtype in args.dtypes.split(","):
        row = results[dtype] = {"load_average_1min": load_average()}
        cache = scratch / f"cache-{dtype}"
        print(f"{dtype}: cold conversion cache (load {row['load_average_1min']:.2f})", flush=True)
        proc, address, row["startup_cold_cache_s"], row["peak_rss_cold_cache_gb"], lines = start_server(
            checkpoint, dtype, cache, args.min_available_gb
        )
        try:
            row["images_per_s"], failures = measure_embed(address, urls)
            assert not failures, f"{failures} images failed"
        finally:
            stop(proc)
        row["runtimes"] = "; ".join(
            line.split(": ", 1)[-1] for line in lines if " tower of " in line and " runs in " in line
        )  # type: ignore[assignment]
        print(f"{dtype}: warm conversion cache", flush=True)
        proc, _, row["startup_warm_cache_s"], row["peak_rss_warm_cache_gb"], _ = start_server(
            checkpoint, dtype, cache, args.min_available_gb
        )
        stop(proc)
        print(f"{dtype}: the reference adapter", flush=True)
        row["reference_s_per_pair"], row["reference_peak_rss_gb"] = in_fresh_process(
            args.min_available_gb, reference_per_pair, checkpoint, dtype, pairs
        )
        row["images_per_s_x_reference_pairs_per_s"] = row["images_per_s"] * row["reference_s_per_pair"]
        print(
            f"{dtype}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
    httpd.shutdown()

    print(f"\n{'':<34}" + "".join(f"{dtype:>12}" for dtype in results))
    for key in (
        "startup_cold_cache_s",
        "peak_rss_cold_cache_gb",
        "startup_warm_cache_s",
        "peak_rss_warm_cache_gb",
        "images_per_s",
        "reference_s_per_pair",
        "reference_peak_rss_gb",
        "images_per_s_x_reference_pairs_per_s",
        "load_average_1min",
    ):
        print(f"{key:<34}" + "".join(f"{results[dtype][key]:>12.2f}" for dtype in results))
    for dtype, row in results.items():
        print(f"{dtype}: {row['runtimes']}")
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "memory_gb": psutil.virtual_memory().total / GB,
        },
        "images": args.images,
        "reference_pairs": args.reference_pairs,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
