"""Instances benchmark: texts/s from one fresh client against --instances 1, 2 and 4.

One command (from the repository root, with the server extra installed):

    python benchmarks/bench_instances.py          # 4000 texts, instances 1,2,4, best of 3

Accelerator time is simulated: the server holds the stand-in model (`--model
fake:forward_ms=N`), whose forward pass sleeps N ms per batch with the GIL let go, as a GPU's
forward lets the model thread wait, so that several instances overlap their forwards without
fighting over this machine's cores. A fresh client embeds that many distinct texts (Embed, one
text encode each), then the same texts again: the second pass must come from the model's one
cache (no forward pass runs), and every pass's vectors must equal those of one instance. Runs
are interleaved (1, 2, 4, 1, 2, 4, ...), each on a fresh server; the load average is recorded
beside each run, as the machine may be shared.

It prints texts/s and the speed-up over one instance, and writes the table as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_throughput import serve  # noqa: E402  (one way to start a server, for every benchmark)


def one_run(instances: int, texts: list[str], args: argparse.Namespace) -> dict:
    import clipserve

    flags = [
        "--model",
        args.model or f"fake:forward_ms={args.forward_ms}",
        "--instances",
        str(instances),
        "--max-batch-size",
        str(args.batch),
    ]
    proc, address = serve(*flags, *(["--device", args.device] if args.device else []))
    try:
        with clipserve.CLIP(address) as clip:
            load = os.getloadavg()[0]
            started = time.perf_counter()
            first = clip.embed_texts(texts, progress=False)
            elapsed = time.perf_counter() - started
            before = clip.model_info()
            started = time.perf_counter()
            second = clip.embed_texts(texts, progress=False)
            warm_elapsed = time.perf_counter() - started
            after = clip.model_info()
        failed = [r.error for r in first + second if r.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} texts failed, e.g. {failed[0]}")
        vectors = np.array([r.embedding for r in first], dtype=np.float32)
        return {
            "texts_per_s": len(texts) / elapsed,
            "warm_texts_per_s": len(texts) / warm_elapsed,
            "load": load,
            "vectors": vectors,
            "second_pass_identical": bool(
                np.array_equal(vectors, np.array([r.embedding for r in second], dtype=np.float32))
            ),
            "second_pass_forwards": sum(i.forwards for i in after.instances)
            - sum(i.forwards for i in before.instances),
            "second_pass_cache_hits": after.text_cache.hits - before.text_cache.hits,
            "forwards": sum(i.forwards for i in before.instances),
            "instances_busy": [round(i.busy_seconds / elapsed, 2) for i in before.instances],
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="1,2,4", help="instance counts to measure")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--forward-ms", type=float, default=50.0, help="simulated accelerator time per forward pass")
    parser.add_argument("--batch", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument(
        "--model",
        default="",
        help="serve this model instead of the simulated accelerator (a checkpoint folder: the CPU's own figure)",
    )
    parser.add_argument("--device", default="", help="the server's --device (e.g. cpu,cpu: two simulated devices)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per instance count, interleaved; the best is reported"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "instances.json")
    args = parser.parse_args(argv)

    counts = [int(c) for c in args.instances.split(",")]
    texts = [f"a distinct text, number {i}" for i in range(args.texts)]
    capacity = args.batch / (args.forward_ms / 1000.0)
    model = (
        args.model
        or f"batches of {args.batch} at {args.forward_ms:g} ms -> at most {capacity:.0f} texts/s per instance"
    )
    print(f"{args.texts} distinct texts; {model}; {os.cpu_count()} cores", flush=True)

    runs: dict[int, list[dict]] = {count: [] for count in counts}
    for _ in range(args.repeat):
        for count in counts:
            run = one_run(count, texts, args)
            runs[count].append(run)
            print(
                f"  {count} instance(s): {run['texts_per_s']:.0f} texts/s (load {run['load']:.2f}), "
                f"second pass {run['warm_texts_per_s']:.0f} texts/s "
                f"with {run['second_pass_forwards']} forwards, busy {run['instances_busy']}",
                flush=True,
            )

    reference = runs[counts[0]][0]["vectors"]
    table = []
    for count in counts:
        rates = [run["texts_per_s"] for run in runs[count]]
        best = max(runs[count], key=lambda run: run["texts_per_s"])
        table.append(
            {
                "instances": count,
                "texts_per_s": round(best["texts_per_s"], 1),
                "median_texts_per_s": round(statistics.median(rates), 1),
                "runs": [round(r, 1) for r in rates],
                "loads": [round(run["load"], 2) for run in runs[count]],
                "of_ideal": None if args.model else round(best["texts_per_s"] / (count * capacity), 2),
                "identical_vectors": all(np.array_equal(run["vectors"], reference) for run in runs[count]),
                "second_pass_from_cache": all(
                    run["second_pass_forwards"] == 0
                    and run["second_pass_cache_hits"] == len(texts)
                    and run["second_pass_identical"]
                    for run in runs[count]
                ),
                "warm_texts_per_s": round(best["warm_texts_per_s"], 1),
            }
        )
    base = table[0]["texts_per_s"]
    print(
        f"\n{'instances':>9}{'texts/s':>10}{'speed-up':>10}{'of ideal':>10}"
        f"{'same vectors':>14}{'2nd from cache':>16}  runs (load)"
    )
    for row in table:
        row["speedup"] = round(row["texts_per_s"] / base, 2)
        runs_text = ", ".join(f"{r:.0f} ({load:.1f})" for r, load in zip(row["runs"], row["loads"]))
        print(
            f"{row['instances']:>9}{row['texts_per_s']:>10.1f}{row['speedup']:>10.2f}"
            f"{row['of_ideal'] or float('nan'):>10.2f}"
            f"{str(row['identical_vectors']):>14}{str(row['second_pass_from_cache']):>16}  {runs_text}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"settings": vars(args) | {"out": str(args.out)}, "cores": os.cpu_count(), "results": table}, indent=2
        )
    )
    print(f"\nwritten to {args.out}")
    return 0 if all(row["identical_vectors"] and row["second_pass_from_cache"] for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
