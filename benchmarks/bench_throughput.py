"""Throughput benchmark: the reference adapter's way vs clipserve, cold and warm, vs the model bound.

One command (from the repository root, with the server extra installed):

    python benchmarks/bench_throughput.py              # Q=40 queries x K=25 images from N=200

It builds a random-weight checkpoint with the exact architecture of
openai/clip-vit-base-patch32 (same compute cost as the real model), writes N real JPEG/PNG
files of mixed sizes, serves them over loopback HTTP, draws Q queries x K images, and measures:

  (a) reference: in-process, one pair per full transformers forward, fetching each image
      (as the reference adapter's score() does), on a sample of --reference-pairs pairs;
  (b) clipserve cold: `clipserve serve` over loopback gRPC through the SDK's score_batch;
  (c) clipserve warm: the same workload again (embeddings cached);
  (d) model bound: batched get_image_features + get_text_features over the distinct images
      and texts through the server's own model class, preprocessing excluded (no I/O, no
      decode): the best any server with that model path could do;
  (e) with --embed: Embed of the distinct images on a cold server through the SDK's
      embed_images, in images/s, against the image half of (d) alone.

The server runs with --compile (the image tower through torch.compile) and (d) uses the same
compiled tower; --no-compile measures the eager path instead. (a) is always eager: it is the
reference adapter's code.

It prints a table (medians over --repeat runs) and writes it as JSON (--out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from corpus_host import serve_corpus

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(320, 240), (500, 500), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]
WORDS = "dog cat car beach mountain city street tree flower bird boat house river snow red blue green old small big".split()


# -- fixtures: images, a loopback image host, queries ---------------------------------------------

def make_photo(i: int, seed: int) -> tuple[str, bytes]:
    """Image number i of a corpus: gradients, shapes and noise; every third a PNG, the rest JPEG."""
    rng = np.random.default_rng([seed, i])
    w, h = SIZES[i % len(SIZES)]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (i % 7 + 1) / w), (y * (i % 5 + 1) / h), ((x + y) / (w + h))], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8")
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        draw.ellipse([x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    fmt = "JPEG" if i % 3 else "PNG"
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"img{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}", buffer.getvalue()


def make_corpus(n: int, seed: int, workers: int = 1) -> dict[str, bytes]:
    """N photo-like images of mixed sizes (``workers`` processes make them in parallel)."""
    if workers <= 1:
        return dict(make_photo(i, seed) for i in range(n))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.map(make_photo, range(n), [seed] * n, chunksize=8))


def make_workload(base: str, names: list[str], queries: int, per_query: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    texts = [f"a photo of a {' '.join(rng.sample(WORDS, 3))} number {q}" for q in range(queries)]
    return [(text, f"{base}/{name}") for text in texts for name in rng.sample(names, per_query)]


# -- the four measurements -------------------------------------------------------------------------

def in_fresh_process(function: Callable[..., float], *args: object) -> float:
    """Run an in-process measurement in a new interpreter, so that no run inherits another's
    model, allocator state or (compiled) OpenMP threads, and this process stays idle while the
    server is measured."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def measure_reference(checkpoint: Path, pairs: list[tuple[str, str]]) -> float:
    """(a) The reference adapter's score(): fetch, decode, one full forward per pair."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def score(query: str, url: str) -> float:
        with urllib.request.urlopen(url, timeout=30) as response:
            image = Image.open(io.BytesIO(response.read()))
        if image.mode != "RGB":
            image = image.convert("RGB")
        inputs = processor(text=[query], images=image, return_tensors="pt", padding=True)
        with torch.no_grad():
            return float(model(**inputs).logits_per_image[0][0])

    score(*pairs[0])  # warm-up, as the adapter's first call would pay it
    started = time.perf_counter()
    for query, url in pairs:
        score(query, url)
    return len(pairs) / (time.perf_counter() - started)


def measure_bound(checkpoint: Path, corpus: dict[str, bytes], pairs: list[tuple[str, str]], args: argparse.Namespace) -> tuple[float, float]:
    """(d) Batched forwards over the distinct texts and images; preprocessing done beforehand.
    Returns pairs/s, and images/s of the image forwards alone (the bound of (e))."""
    from clipserve_server.models.clip_model import HFClipModel

    # The server's model class: the same (eager or compiled) towers, dtype and device. Its
    # forward returns numpy arrays, so the timing includes waiting for the GPU.
    model = HFClipModel(str(checkpoint), device=args.device, dtype=args.dtype, compile=args.compile)
    model.warmup()
    texts = sorted({q for q, _ in pairs})
    names = sorted({u.rsplit("/", 1)[1] for _, u in pairs})
    pixels = [model.preprocess_image(Image.open(io.BytesIO(corpus[n])).convert("RGB")) for n in names]
    size = args.max_batch_size
    started = time.perf_counter()
    for i in range(0, len(texts), size):
        model.forward(texts[i : i + size], [])
    images_started = time.perf_counter()
    for i in range(0, len(pixels), size):
        model.forward([], pixels[i : i + size])
    ended = time.perf_counter()
    return len(pairs) / (ended - started), len(pixels) / (ended - images_started)


def start_server(checkpoint: Path, args: argparse.Namespace, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    return serve(
        "--model", str(checkpoint), "--allow-private-networks", "--device", args.device, "--dtype", args.dtype,
        "--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms),
        "--compile" if args.compile else "--no-compile", *extra,
    )


def serve(*flags: str) -> tuple[subprocess.Popen, str]:
    """`clipserve serve FLAGS` on a free loopback port; returns once it is ready."""
    command = [sys.executable, "-m", "clipserve.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = ""
    for line in proc.stdout:
        if line.startswith("clipserve listening on "):
            address = "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
        if line.startswith("clipserve ready"):
            return proc, address
    raise RuntimeError(f"server exited with {proc.wait()}")


def measure_clipserve(address: str, pairs: list[tuple[str, str]]) -> tuple[float, int]:
    import clipserve

    inputs = [clipserve.SimilarityInput(q, u) for q, u in pairs]
    with clipserve.CLIP(address) as clip:
        started = time.perf_counter()
        results = clip.score_batch(inputs)
        elapsed = time.perf_counter() - started
    failures = sum(1 for r in results if r.error is not None)
    return len(pairs) / elapsed, failures


def measure_embed(address: str, urls: list[str]) -> tuple[float, int]:
    """(e) Embed: every distinct image once, on a cold server (images/s)."""
    import clipserve

    with clipserve.CLIP(address) as clip:
        started = time.perf_counter()
        results = clip.embed_images(urls)
        elapsed = time.perf_counter() - started
    return len(urls) / elapsed, sum(1 for r in results if r.error is not None)


# -- main --------------------------------------------------------------------------------------------

def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload and serving settings every corpus benchmark shares."""
    parser.add_argument("--queries", "-Q", type=int, default=40)
    parser.add_argument("--per-query", "-K", type=int, default=25)
    parser.add_argument("--images", "-N", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--reference-pairs", type=int, default=100, help="pairs timed for (a); its rate is per pair")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="serve (b, c) and bound (d) with the image tower compiled")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a vit-b-32 checkpoint folder")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--embed", action="store_true", help="also (e): embed the distinct images on a cold server, against the image bound")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every mode; the median is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from clipserve_server.models.synthetic import build_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="clipserve-bench-"))
    checkpoint = args.checkpoint or build_checkpoint(scratch / "clip-vit-b-32-random", arch="vit-b-32", seed=args.seed)
    corpus = make_corpus(args.images, args.seed)
    httpd, base = serve_corpus(corpus)
    pairs = make_workload(base, sorted(corpus), args.queries, args.per_query, args.seed)
    distinct_images = len({u for _, u in pairs})
    print(f"workload: {len(pairs)} pairs, {args.queries} queries, {distinct_images} distinct images "
          f"({sum(map(len, corpus.values())) / 1e6:.1f} MB corpus); device={args.device} dtype={args.dtype} compile={args.compile}", flush=True)

    # Each mode runs --repeat times (a fresh server for every cold run); the median is reported,
    # since a shared 2-core machine drifts by 10-25% between runs.
    samples: dict[str, list[float]] = {}
    images: dict[str, list[float]] = {}  # (e) and its bound, in images/s
    failures = {"cold": 0, "warm": 0, "embed": 0}
    reference_pairs = random.Random(1).sample(pairs, min(args.reference_pairs, len(pairs)))
    for run in range(1, args.repeat + 1):
        if not args.skip_reference:
            samples.setdefault("a_reference", []).append(in_fresh_process(measure_reference, checkpoint, reference_pairs))
        proc, address = start_server(checkpoint, args)
        try:
            cold, cold_failures = measure_clipserve(address, pairs)
            warm, warm_failures = measure_clipserve(address, pairs)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        samples.setdefault("b_clipserve_cold", []).append(cold)
        samples.setdefault("c_clipserve_warm", []).append(warm)
        failures["cold"] += cold_failures
        failures["warm"] += warm_failures
        bound, image_bound = in_fresh_process(measure_bound, checkpoint, corpus, pairs, args)
        samples.setdefault("d_model_bound", []).append(bound)
        if args.embed:
            proc, address = start_server(checkpoint, args)
            try:
                embedded, embed_failures = measure_embed(address, sorted({u for _, u in pairs}))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            failures["embed"] += embed_failures
            images.setdefault("e_embed_cold", []).append(embedded)
            images.setdefault("d_image_bound", []).append(image_bound)
        print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()) + " pairs/s"
              + "".join(f", {k} {v[-1]:.1f}" for k, v in images.items()) + (" images/s" if images else ""), flush=True)
    httpd.shutdown()
    rows = {name: statistics.median(values) for name, values in samples.items()}

    reference = rows.get("a_reference")
    table = []
    for name, rate in rows.items():
        table.append({
            "mode": name,
            "pairs_per_s": round(rate, 1),
            "images_per_s": round(rate * distinct_images / len(pairs), 1) if name != "a_reference" else round(rate, 1),
            "speedup_vs_a": round(rate / reference, 1) if reference else None,
            "fraction_of_bound_d": round(rate / rows["d_model_bound"], 2),
        })
    print()
    print(f"{'mode':<20}{'pairs/s':>10}{'images/s':>10}{'x (a)':>8}{'of (d)':>8}")
    for row in table:
        speed = f"{row['speedup_vs_a']:.1f}" if row["speedup_vs_a"] else "-"
        print(f"{row['mode']:<20}{row['pairs_per_s']:>10.1f}{row['images_per_s']:>10.1f}{speed:>8}{row['fraction_of_bound_d']:>8.2f}")
    if images:
        embed = statistics.median(images["e_embed_cold"])
        image_bound = statistics.median(images["d_image_bound"])
        table.append({"mode": "e_embed_cold", "images_per_s": round(embed, 1), "fraction_of_image_bound": round(embed / image_bound, 2)})
        print(f"{'e_embed_cold':<20}{'-':>10}{embed:>10.1f}{'-':>8}{embed / image_bound:>8.2f}  (of the image-only bound, {image_bound:.1f} images/s)")
    report = {
        "workload": {"pairs": len(pairs), "queries": args.queries, "per_query": args.per_query, "images": args.images, "distinct_images": distinct_images},
        "settings": {"device": args.device, "dtype": args.dtype, "compile": args.compile, "max_batch_size": args.max_batch_size, "max_batch_delay_ms": args.max_batch_delay_ms},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "repeat": args.repeat,
        "samples_pairs_per_s": {k: [round(v, 1) for v in values] for k, values in samples.items()},
        "samples_images_per_s": {k: [round(v, 1) for v in values] for k, values in images.items()},
        "failures": failures,
        "results": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
