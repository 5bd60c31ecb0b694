"""Feed benchmark: the server's CPU per image against decoding + preprocessing alone.

    python benchmarks/bench_feed.py                    # 3 interleaved rounds, best of each
    python benchmarks/bench_feed.py --decode-pool processes --jpeg-draft

The throughput benchmark's corpus and workload (40 queries x 25 of 200 JPEG/PNG photos, 320x240
to 1600x1200, over loopback HTTP), served with the 2-layer `tiny` random CLIP at the real input
size 224, so that the model costs almost nothing and the CPU that decides how many images a
second reach an accelerator is what is left: fetch, decode, preprocess, gRPC, asyncio. Each
round measures, one after the other:

  stock:  decode (PIL open + load + convert) and decode + the model's AutoProcessor on the PIL
          image, one image at a time on one thread, CPU seconds per distinct image;
  server: a cold pass through a fresh `clipserve serve` (the SDK over loopback gRPC): the
          server's CPU (its threads and its decode worker processes) per distinct image, its
          event-loop thread's CPU per pair and per image, and wall pairs/s;
          then the same pairs again, warm, for the loop's CPU per cached pair and pairs/s.

It prints the best of the rounds and the ratios: server CPU / stock CPU (the goal is <= 0.9),
and wall pairs/s against the stock bound (every core doing nothing but the stock decode +
preprocess of the distinct images), how the pass's CPU split between the server's event loop,
its model and decode threads, its other threads, its decode processes and the benchmark process
(SDK and corpus server), and its forward passes: how many, their mean size, and how busy they
kept the model thread (server_probe.py). With
--profile (py-spy on PATH) it also samples the server during the first pass and prints the
functions its event loop spent its time in. With --drift it also scores the pass with each inexact
fast path (--jpeg-draft; --gpu-decode with --device cuda) and prints the largest score
difference from the exact path, plus the largest pixel difference in pixel_values.

--serial measures the serial part where it is the only cost: 2000 distinct tiny JPEGs (decoding
costs next to nothing) for the deterministic fake model (so does its forward), decoded and
downloaded by worker processes as on a GPU box, at 1 and at 5 pairs per image; it prints the
event loop's CPU per image and per pair, what one loop could answer per second at that cost,
and the split into a per-image and a per-pair part (best of --rounds fresh servers each).
--serial-model fake:forward_ms=20,image_ms=2.5 serves instead a simulated accelerator (each
forward sleeps 20 ms + 2.5 ms per image: ~390 images/s in batches of 256, ViT-H/14-378's rate
on an H200): then images/s, the mean batch and how busy the model thread was say whether the
server keeps such a model fed.

--scaling measures the decode pools alone, driven from an event loop as the server drives them:
images/s with 1 and 2 threads and 1 and 2 worker processes, this process's CPU per image (the
part that does not scale), both with an idle loop and with one that spends --loop-us of pure
Python per image, as a busy server's loop does.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_throughput import ROOT, add_workload_arguments, make_corpus, make_workload, serve, start_server  # noqa: E402
from corpus_host import serve_corpus  # noqa: E402
from server_probe import BENCHMARK_PART, ServerProbe, describe, free_port  # noqa: E402


# -- stock: decoding and preprocessing the way the reference adapter does ----------------------------

def stock_cpu(checkpoint: Path, images: list[bytes]) -> tuple[float, float]:
    """CPU seconds per image: (decode alone, decode + the stock processor on the PIL image)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint).image_processor

    def decode(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        return image if image.mode == "RGB" else image.convert("RGB")

    started = time.thread_time()
    for data in images:
        decode(data).load()
    decode_s = time.thread_time() - started
    started = time.thread_time()
    for data in images:
        processor(images=[decode(data)], return_tensors="pt")
    return decode_s / len(images), (time.thread_time() - started) / len(images)


# -- the server ---------------------------------------------------------------------------------------

def start_profile(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling every thread of the server, if py-spy is installed (``--profile``)."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("--profile: py-spy is not on PATH; no profile", flush=True)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--threads",
            "--format",
            "raw",
            "--rate",
            "100",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def print_profile(raw: Path, top: int = 25) -> None:
    """The event-loop thread's busiest functions (inclusive share of its samples)."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        total += int(count)
        for frame in {re.sub(r":\d+\)", ")", f) for f in frames[1:]}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    print(f"event-loop profile ({total} samples), inclusive, below the loop itself:")
    below = [
        kv
        for kv in inclusive.items()
        if "_run_once" not in kv[0] and kv[1] < inclusive.get("BaseEventLoop._run_once (asyncio/base_events.py)", total)
    ]
    for frame, count in sorted(below, key=lambda kv: -kv[1])[:top]:
        print(f"  {count / max(total, 1) * 100:5.1f}%  {frame}")


def measured_batch(clip, pid: int, metrics_port: int | None, inputs: list) -> tuple[list, float, dict]:
    """One ``score_batch``: its results (every pair scored, else RuntimeError), wall seconds and
    the server's report for it (server_probe)."""
    probe = ServerProbe(pid, metrics_port)
    started = time.perf_counter()
    results = clip.score_batch(inputs)
    wall = time.perf_counter() - started
    failures = [r.error for r in results if r.error is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} pairs failed, e.g. {failures[0]}")
    return results, wall, probe.report(wall)


def server_pass(
    checkpoint: Path,
    pairs: list[tuple[str, str]],
    args: argparse.Namespace,
    extra: list[str],
    *,
    profile: Path | None = None,
) -> dict:
    """One cold pass through a fresh server; its CPU, its loop's CPU, each part's CPU, wall
    time and the scores (and a py-spy profile of the pass into ``profile``)."""
    import clipserve

    metrics_port = free_port()
    proc, address = start_server(checkpoint, args, [*extra, "--metrics-port", str(metrics_port)])
    spy = None
    try:
        inputs = [clipserve.SimilarityInput(q, u) for q, u in pairs]
        with clipserve.CLIP(address) as clip:
            spy = start_profile(proc.pid, profile) if profile else None
            results, wall, report = measured_batch(clip, proc.pid, metrics_port, inputs)
            _, warm_wall, warm = measured_batch(
                clip, proc.pid, None, inputs
            )  # the same pairs again: every embedding cached
            warm_loop_s = warm["cpu_s"]["event loop"]
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        proc.terminate()
        proc.wait(timeout=60)
    parts = report["cpu_s"]
    server_cpu = sum(v for k, v in parts.items() if k != BENCHMARK_PART)
    return {
        "cpu_s": server_cpu,
        "loop_s": parts["event loop"],
        "wall_s": wall,
        "parts": parts,
        "report": report,
        "scores": np.array([r.score for r in results]),
        "warm_loop_s": warm_loop_s,
        "warm_wall_s": warm_wall,
    }


# -- drift: how far an inexact fast path moves the scores and pixels ---------------------------------

def pixel_drift(checkpoint: Path, images: list[bytes], draft_size: tuple[int, int] | None) -> float:
    """Largest |pixel_values difference| between the exact decode and --jpeg-draft's."""
    from transformers import AutoProcessor

    from clipserve_server.images.decode import decode_image
    from clipserve_server.images.preprocess import build_pipeline

    pipeline = build_pipeline(AutoProcessor.from_pretrained(checkpoint).image_processor)
    worst = 0.0
    for data in images:
        exact, fast = (
            pipeline.normalize(
                torch.from_numpy(pipeline(decode_image(data, max_pixels=10**9, name="x", draft_size=size))).unsqueeze(0)
            )
            for size in (None, draft_size)
        )
        worst = max(worst, float((exact - fast).abs().max()))
    return worst


# -- scaling: the decode pools alone ------------------------------------------------------------------

def scaling(checkpoint: Path, images: list[bytes], loop_us: float) -> list[dict]:
    from transformers import AutoProcessor

    from clipserve_server.images.decode_pool import ProcessDecoder, ThreadDecoder
    from clipserve_server.images.decode_protocol import DecodeJob
    from clipserve_server.images.fetch import FetchSettings
    from clipserve_server.images.fetch_events import FetchTally
    from clipserve_server.utils.config import ServerConfig
    from clipserve_server.images.preprocess import build_pipeline

    job = DecodeJob(build_pipeline(AutoProcessor.from_pretrained(checkpoint).image_processor), max_pixels=10**9)

    def busy(seconds: float) -> None:  # pure Python, holding the GIL, as a loaded loop does
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def drive(decoder, spin_s: float) -> tuple[float, float]:
        await decoder.start()
        in_flight = asyncio.Semaphore(16)

        async def one(data: bytes) -> None:
            async with in_flight:
                busy(spin_s)
                await decoder.decode(data, "x")

        await asyncio.gather(*(one(d) for d in images[:8]))  # warm
        loop_before, started = time.thread_time(), time.perf_counter()
        await asyncio.gather(*(one(d) for d in images))
        wall, loop = time.perf_counter() - started, time.thread_time() - loop_before
        await decoder.close()
        return len(images) / wall, (loop - spin_s * len(images)) / len(images)

    rows = []
    for spin_us in (0.0, loop_us):
        for kind, workers in (("threads", 1), ("threads", 2), ("processes", 1), ("processes", 2)):
            fetch = FetchSettings.of(ServerConfig(max_image_bytes=64 << 20))
            decoder = (
                ThreadDecoder([job], workers)
                if kind == "threads"
                else ProcessDecoder([job], workers, max_image_bytes=64 << 20, fetch=fetch, events=FetchTally())
            )
            rate, loop_cpu = asyncio.run(drive(decoder, spin_us / 1e6))
            rows.append(
                {
                    "pool": kind,
                    "workers": workers,
                    "loop_busy_us_per_image": spin_us,
                    "images_per_s": round(rate, 1),
                    "loop_cpu_us_per_image": round(loop_cpu * 1e6),
                }
            )
            print(
                f"  {kind:<9} x{workers}  loop +{spin_us:>4.0f} us/image: "
                f"{rate:6.1f} images/s, this process's loop {loop_cpu * 1e6:5.0f} us/image",
                flush=True,
            )
    return rows


# -- serial: the event loop's own cost per image and per pair ----------------------------------------

def tiny_jpeg(i: int) -> tuple[str, bytes]:
    pixels = np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return f"tiny{i:05d}.jpg", buffer.getvalue()


def serial_pass(pairs: list[tuple[str, str]], window: int, model: str = "fake") -> dict:
    import clipserve

    metrics_port = free_port()
    proc, address = serve(
        "--model",
        model,
        "--allow-private-networks",
        "--decode-pool",
        "processes",
        "--max-batch-size",
        "256",
        "--stream-max-in-flight",
        str(window),
        "--metrics-port",
        str(metrics_port),
    )
    try:
        with clipserve.CLIP(address) as clip:  # keeps outstanding what the server reads ahead
            _, wall, report = measured_batch(
                clip, proc.pid, metrics_port, [clipserve.SimilarityInput(q, u) for q, u in pairs]
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"wall_s": wall, "loop_s": report["cpu_s"]["event loop"], "report": report}


def serial(rounds: int, images: int, window: int, seed: int, model: str = "fake") -> dict:
    """Loop CPU per image at 1 and 5 pairs per image (best of ``rounds`` passes, interleaved).
    ``window``: the server's --stream-max-in-flight (0: its default), which the SDK follows.
    ``model``: the fake model as it is, or with simulated accelerator time (``fake:forward_ms=…``)."""
    corpus = dict(tiny_jpeg(i) for i in range(images))
    host, base = serve_corpus(corpus)
    names = sorted(corpus)
    # 1 pair per image: one query, every image once. 5: 40 queries x images/8, drawn at random,
    # so that an image's pairs arrive spread over the pass as in a benchmark file.
    workloads = {1: make_workload(base, names, 1, images, seed), 5: make_workload(base, names, 40, images // 8, seed)}
    best: dict[int, dict] = {}
    try:
        for round_ in range(1, rounds + 1):
            for per_image, pairs in workloads.items():
                run = serial_pass(pairs, window, model)
                distinct = len({u for _, u in pairs})
                row = {
                    "pairs": len(pairs),
                    "images": distinct,
                    "loop_us_per_image": run["loop_s"] / distinct * 1e6,
                    "loop_us_per_pair": run["loop_s"] / len(pairs) * 1e6,
                    "images_per_s": distinct / run["wall_s"],
                    "loop_busy": run["loop_s"] / run["wall_s"],
                }
                print(
                    f"  round {round_}, {per_image} pair(s)/image: "
                    f"{row['images']} images in {run['wall_s']:.2f} s ({row['images_per_s']:.0f} images/s), "
                    f"event loop {row['loop_us_per_image']:.0f} us/image = {row['loop_us_per_pair']:.0f} us/pair, "
                    f"busy {row['loop_busy']:.0%}; {describe(run['report'])}",
                    flush=True,
                )
                if per_image not in best or row["loop_us_per_image"] < best[per_image]["loop_us_per_image"]:
                    best[per_image] = row
    finally:
        host.shutdown()
    per_pair = (best[5]["loop_us_per_image"] - best[1]["loop_us_per_image"]) / (
        best[5]["pairs"] / best[5]["images"] - 1
    )
    per_image = best[1]["loop_us_per_image"] - per_pair
    for n, row in best.items():
        print(
            f"serial part, {n} pair(s)/image: {row['loop_us_per_image']:.0f} us of event loop "
            f"per image -> one loop answers at most {1e6 / row['loop_us_per_image']:.0f} images/s"
        )
    print(f"  split: {per_image:.0f} us per distinct image + {per_pair:.0f} us per pair")
    return {
        "best": {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in best.items()},
        "us_per_image": round(per_image, 1),
        "us_per_pair": round(per_pair, 1),
    }


# -- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; the best of each measurement is reported"
    )
    parser.add_argument("--decode-pool", default="auto", choices=("auto", "threads", "processes"))
    parser.add_argument("--decode-workers", type=int, default=0)
    parser.add_argument("--jpeg-draft", action="store_true", help="serve the measured passes with --jpeg-draft")
    parser.add_argument(
        "--drift", action="store_true", help="also measure the fast paths' score drift against the exact path"
    )
    parser.add_argument("--scaling", action="store_true", help="also measure the decode pools alone at 1 and 2 workers")
    parser.add_argument(
        "--serial", action="store_true", help="measure only the serial part: tiny images, the fake model (see above)"
    )
    parser.add_argument("--serial-images", type=int, default=2000, help="--serial: distinct images")
    parser.add_argument(
        "--serial-in-flight",
        type=int,
        default=256,
        help="--serial: pairs in flight (the server's --stream-max-in-flight, which the SDK follows)",
    )
    parser.add_argument(
        "--serial-model",
        default="fake",
        help=(
            "--serial: the model served; "
            "fake:forward_ms=20,image_ms=2.5 simulates an accelerator of ViT-H/14-378's rate"
        ),
    )
    parser.add_argument(
        "--loop-us", type=float, default=300.0, help="--scaling: pure-Python loop work per image for the busy-loop rows"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help=(
            "py-spy the server during the first round's pass into this raw file, "
            "and print its event loop's busiest functions"
        ),
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="a checkpoint folder (default: a tiny random CLIP at 224)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "feed.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.compile = False

    if args.serial:
        print(
            f"serial part: {args.serial_images} tiny JPEGs, model {args.serial_model}, "
            f"decode worker processes, {args.serial_in_flight} pairs in flight; {os.cpu_count()} cores",
            flush=True,
        )
        report = {
            "serial": serial(args.rounds, args.serial_images, args.serial_in_flight, args.seed, args.serial_model),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {args.out}")
        return 0

    from clipserve_server.models.synthetic import build_checkpoint

    torch.set_num_threads(1)  # the stock measurement: one image at a time, one thread, like a decode worker
    checkpoint = args.checkpoint or build_checkpoint(
        Path(tempfile.mkdtemp(prefix="clipserve-feed-")) / "tiny-224", arch="tiny", image_size=224, seed=args.seed
    )
    corpus = make_corpus(args.images, args.seed, workers=min(16, os.cpu_count() or 1))
    httpd, base = serve_corpus(corpus)
    pairs = make_workload(base, sorted(corpus), args.queries, args.per_query, args.seed)
    names = sorted({u.rsplit("/", 1)[1] for _, u in pairs})
    distinct = [corpus[n] for n in names]
    cores = os.cpu_count() or 1
    extra = (
        ["--decode-workers", str(args.decode_workers)]
        + (["--decode-pool", args.decode_pool] if args.decode_pool != "auto" else [])
        + (["--jpeg-draft"] if args.jpeg_draft else [])
    )
    print(
        f"workload: {len(pairs)} pairs, {len(names)} distinct images; {cores} cores; server {' '.join(extra)}",
        flush=True,
    )

    samples: dict[str, list[float]] = {}
    parts_by_round: list[dict[str, float]] = []
    for round_ in range(1, args.rounds + 1):
        decode_s, stock_s = stock_cpu(checkpoint, distinct)
        run = server_pass(checkpoint, pairs, args, extra, profile=args.profile if round_ == 1 else None)
        print(f"round {round_} pass ({run['wall_s']:.2f} s wall): {describe(run['report'])}", flush=True)
        parts_by_round.append(run["report"])
        for key, value in {
            "decode_cpu_ms_per_image": decode_s * 1e3,
            "stock_cpu_ms_per_image": stock_s * 1e3,
            "server_cpu_ms_per_image": run["cpu_s"] / len(names) * 1e3,
            "loop_cpu_us_per_pair": run["loop_s"] / len(pairs) * 1e6,
            "loop_cpu_us_per_image": run["loop_s"] / len(names) * 1e6,
            "wall_pairs_per_s": len(pairs) / run["wall_s"],
            "warm_loop_cpu_us_per_pair": run["warm_loop_s"] / len(pairs) * 1e6,
            "warm_pairs_per_s": len(pairs) / run["warm_wall_s"],
        }.items():
            samples.setdefault(key, []).append(value)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items()), flush=True)

    best = {k: (max(v) if k.endswith("pairs_per_s") else min(v)) for k, v in samples.items()}
    stock_bound = len(pairs) / (best["stock_cpu_ms_per_image"] / 1e3 * len(names) / cores)
    ratio = best["server_cpu_ms_per_image"] / best["stock_cpu_ms_per_image"]
    print()
    print(f"decode alone                 {best['decode_cpu_ms_per_image']:7.2f} ms CPU/image")
    print(f"decode + stock preprocess    {best['stock_cpu_ms_per_image']:7.2f} ms CPU/image")
    print(
        f"server, cold pass            {best['server_cpu_ms_per_image']:7.2f} ms CPU/image   = "
        f"{ratio:.2f} x stock (goal <= 0.9)"
    )
    print(
        f"server event loop            {best['loop_cpu_us_per_pair']:7.0f} us/pair, "
        f"{best['loop_cpu_us_per_image']:.0f} us/distinct image"
        "   (at this pass's load: --serial measures what one loop can answer)"
    )
    print(
        f"wall                         {best['wall_pairs_per_s']:7.1f} pairs/s = "
        f"{best['wall_pairs_per_s'] / stock_bound:.2f} of the stock bound ({stock_bound:.1f} pairs/s on {cores} cores)"
    )
    print(
        f"warm pass (all cached)       {best['warm_pairs_per_s']:7.0f} pairs/s, "
        f"event loop {best['warm_loop_cpu_us_per_pair']:.0f} us/pair"
    )
    if args.profile is not None and args.profile.exists():
        print()
        print_profile(args.profile)

    report = {
        "workload": {
            "pairs": len(pairs),
            "distinct_images": len(names),
            "queries": args.queries,
            "per_query": args.per_query,
        },
        "server_flags": extra,
        "machine": {"cpus": cores, "platform": platform.platform(), "torch": torch.__version__},
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "best": {k: round(v, 3) for k, v in best.items()},
        "server_over_stock": round(ratio, 3),
        "stock_bound_pairs_per_s": round(stock_bound, 1),
        "medians": {k: round(statistics.median(v), 3) for k, v in samples.items()},
        "passes": parts_by_round,
    }
    if args.drift:
        from clipserve_server.models.clip_model import HFClipModel

        draft_size = HFClipModel(str(checkpoint), device="cpu").decode_size
        exact = server_pass(checkpoint, pairs, args, ["--decode-pool", args.decode_pool])["scores"]
        report["drift"] = {}
        paths = {"jpeg_draft": ["--jpeg-draft"]} | (
            {"gpu_decode": ["--gpu-decode"]} if args.device.startswith("cuda") else {}
        )
        for name, flags in paths.items():
            fast = server_pass(checkpoint, pairs, args, ["--decode-pool", args.decode_pool, *flags])["scores"]
            report["drift"][name] = {
                "max_abs_score_diff": float(np.abs(fast - exact).max()),
                "mean_abs_score_diff": float(np.abs(fast - exact).mean()),
                "score_range": [float(exact.min()), float(exact.max())],
            }
        report["drift"]["jpeg_draft"]["max_abs_pixel_values_diff"] = pixel_drift(checkpoint, distinct, draft_size)
        for name, drift in report["drift"].items():
            print(
                (
                    f"drift {name:<10}: max |score diff| {drift['max_abs_score_diff']:.4f} "
                    f"(mean {drift['mean_abs_score_diff']:.4f}; "
                    f"scores span {drift['score_range'][0]:.2f}..{drift['score_range'][1]:.2f})"
                )
                + (
                    f", max |pixel_values diff| {drift['max_abs_pixel_values_diff']:.3f}"
                    if "max_abs_pixel_values_diff" in drift
                    else ""
                )
            )
    if args.scaling:
        print("\ndecode pools alone (decode + preprocess of the distinct images, 16 in flight):")
        report["scaling"] = scaling(checkpoint, distinct, args.loop_us)
    httpd.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
