"""OpenVINO's threads against the decode workers: does the forward's thread pool fight decoding?

    python benchmarks/bench_threads.py            # --repeat 2, ~5 min on 2 cores

The cold pass of bench_throughput.py (1000 pairs: 40 queries x 25 of 200 photo-like images over
loopback HTTP, ViT-B/32-shaped random weights, --runtime openvino) on a fresh server for each
combination of the forward's threads (OpenVINO's INFERENCE_NUM_THREADS, which the server sets
to torch's intra-op threads: OMP_NUM_THREADS here) and --decode-workers (decode/preprocess
threads), interleaved --repeat times. The server's default on this box is the cores for both.
Prints pairs/s per combination (best and median) and the machine's load before each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import load_average, make_corpus, make_workload, measure_clipserve, serve  # noqa: E402
from corpus_host import serve_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="forward threads to try (comma-separated)")
    parser.add_argument("--decode-workers", default="1,2", help="decode workers to try (comma-separated)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a vit-b-32 checkpoint folder")
    args = parser.parse_args(argv)

    from clipserve_server.models.synthetic import build_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="clipserve-threads-"))
    checkpoint = args.checkpoint or build_checkpoint(scratch / "clip-vit-b-32-random", arch="vit-b-32", seed=0)
    corpus = make_corpus(200, 0)
    httpd, base = serve_corpus(corpus)
    pairs = make_workload(base, sorted(corpus), 40, 25, 0)
    combos = [(int(t), int(w)) for t in args.threads.split(",") for w in args.decode_workers.split(",")]
    cache = scratch / "runtime-cache"  # converted once (the first start), then shared: start-up is not measured here
    rates: dict[tuple[int, int], list[float]] = {}
    for run in range(1, args.repeat + 1):
        for threads, workers in combos:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            load = load_average()
            proc, address = serve("--model", str(checkpoint), "--allow-private-networks", "--runtime", "openvino",
                                  "--runtime-cache", str(cache), "--decode-workers", str(workers))
            try:
                rate, failures = measure_clipserve(address, pairs)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            assert failures == 0, f"{failures} pairs failed"
            rates.setdefault((threads, workers), []).append(rate)
            print(
                f"run {run}: forward threads {threads}, decode workers {workers}: {rate:.1f} pairs/s (load {load:.2f})",
                flush=True,
            )
            time.sleep(1)
    httpd.shutdown()
    print("\n| forward threads | decode workers | cold pairs/s best | median |\n|---:|---:|---:|---:|")
    for (threads, workers), values in rates.items():
        print(f"| {threads} | {workers} | {max(values):.1f} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
