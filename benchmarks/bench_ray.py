"""Ray benchmark: rows/s of a Ray Data score job over 1, 2 and 4 fleet replicas, and what the
Ray path costs against the plain SDK on one replica.

One command (from the repository root, with the server and ray extras installed):

    python benchmarks/bench_ray.py            # 3000 rows per run, best of 3, interleaved

A local Ray (``--ray-cpus``, 2 by default) runs one ``Fleet`` of 4 replicas of the simulated
accelerator (``--model fake:forward_ms=30,image_ms=2``, at most ``--batch`` items per forward
pass: ``batch / forward_ms`` new items a second per replica), reserving no CPU; the 1- and
2-replica figures use the first one or two addresses of that fleet. Every row is a new query
(one text encode each; the runs' queries never repeat, so no run is served from an earlier
one's cache) over 20 local images. Each Ray run is a whole job as ``--engine ray`` runs a
chunk: a fresh actor pool of ``--actors`` SDK clients, blocks of ``--batch-size`` rows, the
results collected in input order (``RayEngine.score_batch``). The plain-SDK run is one
``CLIP(address).score_batch`` in this process against the first replica alone.

Prints rows/s (best of ``--repeat``, and each run), the machine's CPU use during the runs
(busy share of all cores) and the load average, and writes the table as JSON (--out).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _images(count: int) -> list[str]:
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="clipserve-bench-ray-"))
    paths = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (64 + i, 48 + i), (10 * i % 255, 120, 200)).save(buffer, format="PNG")
        (folder / f"image{i}.png").write_bytes(buffer.getvalue())
        paths.append(str(folder / f"image{i}.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--replicas", default="1,2,4", help="replica counts to measure (the fleet has the largest)")
    parser.add_argument("--forward-ms", type=float, default=30.0, help="simulated accelerator time per forward pass")
    parser.add_argument("--image-ms", type=float, default=2.0, help="... and per image in it")
    parser.add_argument("--batch", type=int, default=8, help="the replicas' --max-batch-size")
    parser.add_argument("--actors", type=int, default=2, help="client actors of each Ray job")
    parser.add_argument("--batch-size", type=int, default=250, help="rows per map_batches batch")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray.json")
    args = parser.parse_args(argv)

    import psutil
    import ray

    import clipserve
    from clipserve.ray import Fleet
    from clipserve.ray.engine import RayEngine, quiet_ray_data

    counts = [int(c) for c in args.replicas.split(",")]
    model = f"fake:forward_ms={args.forward_ms:g},image_ms={args.image_ms:g}"
    capacity = args.batch / (args.forward_ms / 1000.0)
    print(
        f"{args.rows} rows per run, each a new query; "
        f"each replica {model}, batches of {args.batch}: at most {capacity:.0f} new queries/s",
        flush=True,
    )
    ray.init(
        num_cpus=args.ray_cpus,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    quiet_ray_data()
    images = _images(20)
    fresh = itertools.count()

    def pairs() -> list[tuple[str, str]]:
        run = next(fresh)
        return [(f"run {run} query {i}", images[i % len(images)]) for i in range(args.rows)]

    def timed(score) -> tuple[float, float]:
        """(rows/s, busy share of all cores) of one run."""
        inputs = pairs()
        cpu_before = psutil.cpu_times()
        started = time.perf_counter()
        results = score(inputs)
        elapsed = time.perf_counter() - started
        cpu_after = psutil.cpu_times()
        failed = sum(1 for r in results if r.error is not None)
        if failed or len(results) != len(inputs):
            raise RuntimeError(
                f"{failed} of {len(results)} failed, e.g. {next((r.error for r in results if r.error), None)}"
            )
        busy = sum(cpu_after) - sum(cpu_before) - (cpu_after.idle - cpu_before.idle)
        return len(inputs) / elapsed, busy / (sum(cpu_after) - sum(cpu_before))

    results: dict[str, list[tuple[float, float]]] = {}
    loads = []
    with Fleet(
        model,
        replicas=max(counts),
        num_cpus=0,
        flags=["--max-batch-size", str(args.batch), "--max-batch-delay-ms", "2", "--log-level", "WARNING"],
    ) as address:
        addresses = address.split(",")
        # The first job starts Ray Data's own actors and warms the replicas' image caches.
        RayEngine(addresses[0], batch_size=args.batch_size, concurrency=args.actors, num_cpus=0.5).score_batch(
            pairs()[:200]
        )
        with clipserve.CLIP(address) as warm:
            warm.score_batch([("warm-up", image) for image in images])
        for _ in range(args.repeat):  # interleaved: each repetition measures every case once
            with clipserve.CLIP(addresses[0]) as clip:
                results.setdefault("sdk, 1 replica", []).append(timed(clip.score_batch))
            for count in counts:
                engine = RayEngine(
                    ",".join(addresses[:count]), batch_size=args.batch_size, concurrency=args.actors, num_cpus=0.5
                )
                results.setdefault(f"ray, {count} replica(s)", []).append(timed(engine.score_batch))
                engine.close()
            loads.append(os.getloadavg()[0])
            print(
                f"  round {len(loads)}: "
                + ", ".join(f"{name} {runs[-1][0]:.0f}" for name, runs in results.items())
                + f" rows/s; load {loads[-1]:.1f}",
                flush=True,
            )
        tiny = RayEngine(addresses[0], batch_size=args.batch_size, concurrency=args.actors, num_cpus=0.5)
        started = time.perf_counter()
        tiny.score_batch([("start-up", images[0])] * 8)
        job_start_s = time.perf_counter() - started
    ray.shutdown()

    sdk = max(rate for rate, _ in results["sdk, 1 replica"])
    ray_one = max(rate for rate, _ in results[f"ray, {counts[0]} replica(s)"])
    table = []
    print(f"\n{'case':<18}{'rows/s':>9}{'runs':>22}{'x sdk':>8}{'of ideal':>10}{'cpu busy':>10}")
    for name, runs in results.items():
        best_rate, best_busy = max(runs)
        replicas = int(name.split(", ")[1].split(" ")[0])
        row = {
            "case": name,
            "rows_per_s": round(best_rate, 1),
            "runs": [round(r, 1) for r, _ in runs],
            "vs_sdk": round(best_rate / sdk, 2),
            "of_ideal": round(best_rate / (replicas * capacity), 2),
            "cpu_busy": round(best_busy, 2),
        }
        table.append(row)
        print(
            f"{name:<18}{best_rate:>9.1f}{', '.join(f'{r:.0f}' for r, _ in runs):>22}"
            f"{row['vs_sdk']:>8.2f}{row['of_ideal']:>10.2f}{best_busy:>10.2f}"
        )
    print(
        f"\nthe Ray path on one replica: {ray_one / sdk:.2f} x the plain SDK's rows/s "
        f"({100 * (1 - ray_one / sdk):.0f}% less); "
        f"a job of 8 rows takes {job_start_s:.2f} s (its actor pool's start); "
        f"load average {min(loads):.1f}-{max(loads):.1f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out), "model": model}
    args.out.write_text(
        json.dumps(
            {"settings": settings, "results": table, "job_start_s": round(job_start_s, 2), "load": loads}, indent=2
        )
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
