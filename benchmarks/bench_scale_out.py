"""Scale-out benchmark: pairs/s from one fresh client against 1, 2 and 3 replicas.

One command (from the repository root, with the server extra installed):

    python benchmarks/bench_scale_out.py            # 2000 pairs, replicas 1,2,3, best of 3

Accelerator time is simulated: every replica serves the stand-in model (`--model
fake:forward_ms=N`), whose forward pass sleeps N ms per batch of up to --batch items, so that
replicas do not fight over this machine's cores and the figure measures the work
distribution, not the CPU. Every pair has its own query (one text encode each), and all pairs
share one local image (uploaded once per replica). Each run starts fresh replicas and a fresh
client with no warm-up call, as a user's run would.

It prints pairs/s and the speed-up over one replica, the share of pairs each replica
answered, and writes the table as JSON (--out).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_throughput import serve  # noqa: E402  (one way to start a server, for every benchmark)


def start_replica(forward_ms: float, batch: int) -> tuple[subprocess.Popen, str]:
    return serve(
        "--model", f"fake:forward_ms={forward_ms}", "--max-batch-size", str(batch), "--max-batch-delay-ms", "2"
    )


def one_run(replicas: int, pairs: int, image: Path, args: argparse.Namespace) -> tuple[float, list[int]]:
    import clipserve

    started = [start_replica(args.forward_ms, args.batch) for _ in range(replicas)]
    try:
        inputs = [clipserve.SimilarityInput(f"query number {i}", str(image)) for i in range(pairs)]
        with clipserve.CLIP([address for _, address in started]) as clip:
            begin = time.perf_counter()
            results = clip.score_batch(inputs)
            elapsed = time.perf_counter() - begin
            shares = [clip.stats().items_by_replica.get(address, 0) for _, address in started]
        failed = sum(1 for r in results if r.error is not None)
        if failed:
            raise RuntimeError(f"{failed} pairs failed, e.g. {next(r.error for r in results if r.error)}")
        return pairs / elapsed, shares
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--forward-ms", type=float, default=200.0, help="simulated accelerator time per forward pass")
    parser.add_argument("--batch", type=int, default=32, help="the replicas' --max-batch-size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per replica count; the best is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_out.json")
    args = parser.parse_args(argv)

    from PIL import Image

    image = Path(tempfile.mkdtemp(prefix="clipserve-scale-")) / "image.png"
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (40, 120, 200)).save(buffer, format="PNG")
    image.write_bytes(buffer.getvalue())
    capacity = args.batch / (args.forward_ms / 1000.0)
    print(
        f"{args.pairs} pairs; each replica: "
        f"batches of {args.batch} at {args.forward_ms:g} ms -> at most {capacity:.0f} pairs/s",
        flush=True,
    )

    table = []
    for count in [int(c) for c in args.replicas.split(",")]:
        samples = [one_run(count, args.pairs, image, args) for _ in range(args.repeat)]
        rates = [rate for rate, _ in samples]
        best_rate, best_shares = max(samples, key=lambda s: s[0])
        table.append({
            "replicas": count,
            "pairs_per_s": round(best_rate, 1),
            "median_pairs_per_s": round(statistics.median(rates), 1),
            "runs": [round(r, 1) for r in rates],
            "of_ideal": round(best_rate / (count * capacity), 2),
            "shares": [round(s / args.pairs, 2) for s in best_shares],
        })
        print(
            f"{count} replica(s): {best_rate:.1f} pairs/s (runs "
            f"{', '.join(f'{r:.1f}' for r in rates)}), shares {table[-1]['shares']}",
            flush=True,
        )
    base = table[0]["pairs_per_s"]
    print(f"\n{'replicas':>8}{'pairs/s':>10}{'speed-up':>10}{'of ideal':>10}  shares")
    for row in table:
        row["speedup"] = round(row["pairs_per_s"] / base, 2)
        print(
            f"{row['replicas']:>8}{row['pairs_per_s']:>10.1f}{row['speedup']:>10.2f}"
            f"{row['of_ideal']:>10.2f}  {row['shares']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": table}, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
