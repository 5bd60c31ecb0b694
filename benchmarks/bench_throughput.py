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
      decode): the best any server with that model path could do; (d0) the same in torch
      eager, whatever the runtime;
  (e) with --embed: Embed of the distinct images on a cold server through the SDK's
      embed_images, in images/s, against the image half of (d) alone;
  (f) text only: Embed of --texts distinct queries on a cold server (embed_texts), in texts/s,
      against torch eager's text tower over the same texts in batches of --max-batch-size.

Every mode is measured for the server's runtime (--runtime, default auto: what users get) and,
interleaved in the same run, for --against (default torch eager), each with its start-up time
with a cold and with a warm conversion cache and its RSS after the passes (children included).
--compile serves torch.compile's image tower instead (it implies --runtime torch). (a) is
always eager: it is the reference adapter's code.

It prints a table (best and median over --repeat runs) and writes it as JSON (--out). The
machine's load (uptime) is printed with every run: on a shared machine, say so beside the
figures.
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
WORDS = (
    "dog cat car beach mountain city street tree flower bird boat house river snow red blue green old small big".split()
)


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
        draw.ellipse(
            [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))],
            fill=tuple(int(c) for c in rng.integers(0, 255, 3)),
        )
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


def measure_bound(
    checkpoint: Path,
    corpus: dict[str, bytes],
    pairs: list[tuple[str, str]],
    args: argparse.Namespace,
    runtime: str,
    cache: Path,
    many_texts: list[str],
) -> tuple[float, float, float]:
    """(d) Batched forwards over the distinct texts and images; preprocessing done beforehand.
    Returns pairs/s, images/s of the image forwards alone (the bound of (e)), and texts/s of
    text forwards over ``many_texts`` (the bound of (f))."""
    from clipserve_server.models.clip_model import HFClipModel
    from clipserve_server.models.runtimes import apply_runtime
    from clipserve_server.utils.config import ServerConfig

    # The server's model class: the same (eager, compiled or converted) towers, dtype and
    # device. Its forward returns numpy arrays, so the timing includes waiting for the GPU.
    compile = args.compile and runtime != "torch-eager"
    model = HFClipModel(str(checkpoint), device=args.device, dtype=args.dtype, compile=compile)
    if runtime != "torch-eager":
        apply_runtime(
            model,
            ServerConfig(
                model=(str(checkpoint),),
                device=args.device,
                dtype=args.dtype,
                compile=compile,
                runtime=runtime,
                runtime_cache=str(cache),
            ),
        )
    model.warmup()
    size = args.max_batch_size
    texts_started = time.perf_counter()
    for i in range(0, len(many_texts), size):
        model.forward(many_texts[i : i + size], [])
    text_rate = len(many_texts) / (time.perf_counter() - texts_started) if many_texts else 0.0
    texts = sorted({q for q, _ in pairs})
    names = sorted({u.rsplit("/", 1)[1] for _, u in pairs})
    pixels = [model.preprocess_image(Image.open(io.BytesIO(corpus[n])).convert("RGB")) for n in names]
    started = time.perf_counter()
    for i in range(0, len(texts), size):
        model.forward(texts[i : i + size], [])
    images_started = time.perf_counter()
    for i in range(0, len(pixels), size):
        model.forward([], pixels[i : i + size])
    ended = time.perf_counter()
    return len(pairs) / (ended - started), len(pixels) / (ended - images_started), text_rate


def start_server(checkpoint: Path, args: argparse.Namespace, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    return serve(
        "--model", str(checkpoint), "--allow-private-networks", "--device", args.device, "--dtype", args.dtype,
        "--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms),
        "--compile" if args.compile else "--no-compile", *extra,
    )


def server_rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server and its children (decode worker processes), in MB."""
    import psutil

    server = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)]) / 1e6


def load_average() -> float:
    return os.getloadavg()[0]


def serve(*flags: str) -> tuple[subprocess.Popen, str]:
    """`clipserve serve FLAGS` on a free loopback port; returns once it is ready."""
    command = [
        sys.executable,
        "-m",
        "clipserve.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-level",
        "WARNING",
        *flags,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = ""
    for line in proc.stdout:
        if line.startswith("clipserve listening on "):
            address = "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
        if line.startswith("clipserve ready"):
            return proc, address
    raise RuntimeError(f"server exited with {proc.wait()}")


def measure_clipserve(
    address: str, pairs: list[tuple[str, str]], scores: list[np.ndarray] | None = None
) -> tuple[float, int]:
    """pairs/s of one score_batch of ``pairs``, and how many failed; their scores go into ``scores``."""
    import clipserve

    inputs = [clipserve.SimilarityInput(q, u) for q, u in pairs]
    with clipserve.CLIP(address) as clip:
        started = time.perf_counter()
        results = clip.score_batch(inputs)
        elapsed = time.perf_counter() - started
        if scores is not None:
            scores.append(np.array([np.nan if r.error is not None else r.score for r in results]))
            scores.append(np.array([clip.model_info().logit_scale]))
    failures = sum(1 for r in results if r.error is not None)
    return len(pairs) / elapsed, failures


def drift(
    pairs: list[tuple[str, str]], scores: np.ndarray, baseline: np.ndarray, logit_scale: float
) -> dict[str, float]:
    """How far ``scores`` are from ``baseline``'s on the same pairs: the largest |difference| in
    units of exp(logit_scale) (a cosine's), and per query whether its images keep their order
    (every one, and the first), with the mean Kendall tau of the two orders."""
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)
    same_order = same_top = 0
    taus = []
    for rows in by_query.values():
        a, b = scores[rows], baseline[rows]
        same_order += bool((np.argsort(-a, kind="stable") == np.argsort(-b, kind="stable")).all())
        same_top += int(np.argmax(a) == np.argmax(b))
        upper = np.triu_indices(len(rows), 1)
        signs = np.sign(a[:, None] - a[None, :])[upper] * np.sign(b[:, None] - b[None, :])[upper]
        taus.append(float(signs.mean()))
    return {
        "max_abs_diff_over_scale": float(np.nanmax(np.abs(scores - baseline)) / logit_scale),
        "queries_same_order": same_order / len(by_query),
        "queries_same_top1": same_top / len(by_query),
        "mean_kendall_tau": float(np.mean(taus)),
    }


def measure_embed(address: str, items: list[str], kind: str = "images") -> tuple[float, int]:
    """(e) Embed every distinct image once, or (f, kind "texts") every distinct query, on a cold
    server (items/s)."""
    import clipserve

    with clipserve.CLIP(address) as clip:
        started = time.perf_counter()
        results = getattr(clip, f"embed_{kind}")(items)
        elapsed = time.perf_counter() - started
    return len(items) / elapsed, sum(1 for r in results if r.error is not None)


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
    parser.add_argument(
        "--runtime", default="auto", help="the server's --runtime (default: auto, the server's default)"
    )
    parser.add_argument(
        "--against", default="torch", help="a second --runtime measured the same way, interleaved ('none': skip)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="serve torch.compile's image tower (with --runtime torch)",
    )
    parser.add_argument(
        "--texts", type=int, default=2000, help="(f): distinct queries embedded on a cold server (0: skip)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a vit-b-32 checkpoint folder")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--embed",
        action="store_true",
        help="also (e): embed the distinct images on a cold server, against the image bound",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of every mode, interleaved; best and median are reported"
    )
    parser.add_argument(
        "--baseline-dtype",
        default="float32",
        help="with a --dtype other than this: also a cold pass of the server "
        "at this dtype (the default runtime), interleaved, "
        "its ratio and the score drift between the two ('none': skip)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    baseline_dtype = args.baseline_dtype if args.baseline_dtype not in ("none", args.dtype) else None

    from clipserve_server.models.synthetic import build_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="clipserve-bench-"))
    checkpoint = args.checkpoint or build_checkpoint(scratch / "clip-vit-b-32-random", arch="vit-b-32", seed=args.seed)
    corpus = make_corpus(args.images, args.seed)
    httpd, base = serve_corpus(corpus)
    pairs = make_workload(base, sorted(corpus), args.queries, args.per_query, args.seed)
    distinct_images = len({u for _, u in pairs})
    rng = random.Random(args.seed + 1)
    many_texts = [f"{' '.join(rng.sample(WORDS, 4))} in scene {i}" for i in range(args.texts)]
    runtimes = [args.runtime] + ([args.against] if args.against not in ("none", "", args.runtime) else [])
    # The eager bound is torch's own forward (d0), whatever the runtimes compared.
    bounds = [*runtimes, "torch-eager"]
    print(
        f"workload: {len(pairs)} pairs, {args.queries} queries, {distinct_images} distinct images "
        f"({sum(map(len, corpus.values())) / 1e6:.1f} MB corpus), {len(many_texts)} texts; "
        f"device={args.device} dtype={args.dtype} "
        f"runtimes={','.join(runtimes)} compile={args.compile}"
        + (f"; baseline {baseline_dtype} at --runtime auto" if baseline_dtype else ""),
        flush=True,
    )

    # Every mode runs --repeat times, the runtimes interleaved within each run (a fresh server,
    # and a fresh conversion cache, for every cold run): a shared machine drifts between runs.
    samples: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    loads = []
    drifts: list[dict[str, float]] = []
    reference_pairs = random.Random(1).sample(pairs, min(args.reference_pairs, len(pairs)))

    def record(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    for run in range(1, args.repeat + 1):
        loads.append(load_average())
        if not args.skip_reference:
            record("a_reference", in_fresh_process(measure_reference, checkpoint, reference_pairs))
        if baseline_dtype:
            # The baseline dtype's server at its defaults, cold, before the others: its scores
            # are what the others' drift is measured against.
            baseline_scores: list[np.ndarray] = []
            proc, address = start_server(
                checkpoint,
                argparse.Namespace(**{**vars(args), "dtype": baseline_dtype}),
                ["--runtime-cache", str(scratch / f"cache-baseline-{run}")],
            )
            try:
                cold, cold_failures = measure_clipserve(address, pairs, baseline_scores)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            record(f"b_cold[{baseline_dtype}]", cold)
            failures[baseline_dtype] = failures.get(baseline_dtype, 0) + cold_failures
        for runtime in runtimes:
            flags = ["--runtime", runtime, "--runtime-cache", str(scratch / f"cache-{runtime}-{run}")]
            started = time.perf_counter()
            proc, address = start_server(checkpoint, args, flags)
            record(f"startup_cold_cache_s[{runtime}]", time.perf_counter() - started)
            try:
                scores: list[np.ndarray] = []
                cold, cold_failures = measure_clipserve(address, pairs, scores)
                if baseline_dtype and runtime == args.runtime:
                    drifts.append(drift(pairs, scores[0], baseline_scores[0], float(baseline_scores[1][0])))
                warm, warm_failures = measure_clipserve(address, pairs)
                record(f"rss_mb[{runtime}]", server_rss_mb(proc))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            record(f"b_cold[{runtime}]", cold)
            record(f"c_warm[{runtime}]", warm)
            failures[runtime] = failures.get(runtime, 0) + cold_failures + warm_failures
            # The same cache again: what a restart costs; then the text-only and Embed passes
            # on this server, cold for both.
            started = time.perf_counter()
            proc, address = start_server(checkpoint, args, flags)
            record(f"startup_warm_cache_s[{runtime}]", time.perf_counter() - started)
            try:
                if many_texts:
                    texts_rate, text_failures = measure_embed(address, many_texts, "texts")
                    record(f"f_texts[{runtime}]", texts_rate)
                    failures[runtime] += text_failures
                if args.embed:
                    embedded, embed_failures = measure_embed(address, sorted({u for _, u in pairs}))
                    record(f"e_embed_cold[{runtime}]", embedded)
                    failures[runtime] += embed_failures
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        for runtime in bounds:
            bound, image_bound, text_bound = in_fresh_process(
                measure_bound, checkpoint, corpus, pairs, args, runtime, scratch / f"cache-{runtime}-{run}", many_texts
            )
            record(f"d_bound[{runtime}]", bound)
            record(f"d_image_bound[{runtime}]", image_bound)
            record(f"d_text_bound[{runtime}]", text_bound)
        # Within this run: cold against the faster model-only bound, and against the baseline's cold.
        faster = max(samples[f"d_bound[{runtime}]"][-1] for runtime in bounds)
        record("cold_over_faster_bound", samples[f"b_cold[{args.runtime}]"][-1] / faster)
        if baseline_dtype:
            record(
                "cold_over_baseline_cold",
                samples[f"b_cold[{args.runtime}]"][-1] / samples[f"b_cold[{baseline_dtype}]"][-1],
            )
        print(
            f"run {run} (load {loads[-1]:.2f}): " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()),
            flush=True,
        )
    httpd.shutdown()

    # Rates: the best run (least disturbed by the machine's other work); times: the least.
    best = {k: (min if k.startswith(("startup", "rss")) else max)(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    # (label, sample, the best value it is divided by, or None: the value itself)
    rows = [
        ("cold pairs/s (b)", "b_cold", None),
        ("warm pairs/s (c)", "c_warm", None),
        ("model bound pairs/s (d)", "d_bound", None),
        ("cold x eager bound (d0)", "b_cold", "d_bound[torch-eager]"),
        ("cold x reference (a)", "b_cold", "a_reference"),
        ("text-only texts/s (f)", "f_texts", None),
        ("text x eager text bound", "f_texts", "d_text_bound[torch-eager]"),
        ("image bound images/s", "d_image_bound", None),
        ("images x eager image bound", "d_image_bound", "d_image_bound[torch-eager]"),
        ("embed images/s (e)", "e_embed_cold", None),
        ("start-up, cold cache s", "startup_cold_cache_s", None),
        ("start-up, warm cache s", "startup_warm_cache_s", None),
        ("server RSS MB", "rss_mb", None),
    ]
    print()
    print(
        f"best of {args.repeat} (median in brackets); reference (a) {best.get('a_reference', 0):.1f} pairs/s, "
        f"eager bound (d0) {best['d_bound[torch-eager]']:.1f} pairs/s; load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print(f"{'':<28}" + "".join(f"{runtime:>20}" for runtime in runtimes))
    table = []
    for label, key, by in rows:
        cells = []
        for runtime in runtimes:
            name = f"{key}[{runtime}]"
            divisor = 1.0 if by is None else best.get(by, 0.0)
            if name not in best or not divisor:
                cells.append(f"{'-':>20}")
                continue
            value, middle = best[name] / divisor, median[name] / divisor
            cells.append(f"{value:.2f} ({middle:.2f})".rjust(20))
            table.append({"row": label, "runtime": runtime, "best": round(value, 3), "median": round(middle, 3)})
        print(f"{label:<28}" + "".join(cells))
    # Ratios taken within each run (the machine drifts between runs), best (median).
    within = [("cold / faster model-only bound", "cold_over_faster_bound")] + (
        [(f"cold / {baseline_dtype} default's cold", "cold_over_baseline_cold")] if baseline_dtype else []
    )
    for label, key in within:
        print(f"{f'{args.runtime} {label}':<44}{best[key]:.2f} ({median[key]:.2f})")
        table.append(
            {"row": label, "runtime": args.runtime, "best": round(best[key], 3), "median": round(median[key], 3)}
        )
    if baseline_dtype:
        print(
            f"{baseline_dtype} default cold pairs/s: "
            f"{best[f'b_cold[{baseline_dtype}]']:.1f} ({median[f'b_cold[{baseline_dtype}]']:.1f})"
        )
        worst = {k: (max if k.startswith("max") else min)(d[k] for d in drifts) for k in drifts[0]}
        print(
            f"{args.dtype} against {baseline_dtype}, same pairs, "
            f"worst of {len(drifts)} runs: max |score difference| / exp(logit_scale) "
            f"{worst['max_abs_diff_over_scale']:.2e}; "
            f"queries ranking their images in the same order {worst['queries_same_order']:.0%}, "
            f"the same first {worst['queries_same_top1']:.0%}; mean Kendall tau {worst['mean_kendall_tau']:.3f}"
        )
    report = {
        "workload": {
            "pairs": len(pairs),
            "queries": args.queries,
            "per_query": args.per_query,
            "images": args.images,
            "distinct_images": distinct_images,
            "texts": len(many_texts),
        },
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "runtimes": runtimes,
            "compile": args.compile,
            "max_batch_size": args.max_batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_1min": loads,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "repeat": args.repeat,
        "samples": {k: [round(v, 2) for v in values] for k, values in samples.items()},
        "failures": failures,
        "results": table,
        "drift": drifts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
