"""Upload benchmark: what crosses the network when the images are local files.

One command (from the repository root, with the server extra installed):

    python benchmarks/bench_uploads.py        # 40 queries x 25 of 200 local files (87 MB)

The benchmark maker's shape of run, from a laptop against a remote server: 1000 pairs over
200 local JPEG/PNG files, each file in ~5 pairs. It runs the same pairs twice, each time with
a fresh client (as two runs of a script would): cold (the server holds none of the images)
and warm (it holds all). The server serves the stand-in model (`--model fake`): what is
measured is the traffic, not the model. It prints the image bytes the SDK sent per pair
against the files' size, and the time spent hashing against the time of the cold run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_throughput import make_corpus, serve  # noqa: E402  (the same 200-image corpus)


def run(address: str, inputs: list) -> dict[str, float]:
    import clipserve

    with clipserve.CLIP(address) as clip:
        started = time.perf_counter()
        results = clip.score_batch(inputs)
        elapsed = time.perf_counter() - started
        stats = clip.stats()
    failed = sum(1 for r in results if r.error is not None)
    if failed:
        raise RuntimeError(f"{failed} pairs failed, e.g. {next(r.error for r in results if r.error)}")
    return {
        "seconds": elapsed,
        "upload_bytes": stats.upload_bytes,
        "hash_seconds": stats.hash_seconds,
        "resends": stats.resends,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", "-Q", type=int, default=40)
    parser.add_argument("--per-query", "-K", type=int, default=25)
    parser.add_argument("--images", "-N", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "uploads.json")
    args = parser.parse_args(argv)

    import clipserve

    folder = Path(tempfile.mkdtemp(prefix="clipserve-uploads-"))
    for name, data in make_corpus(args.images, args.seed).items():
        (folder / name).write_bytes(data)
    files = sorted(folder.iterdir())
    rng = random.Random(args.seed)
    inputs = [
        clipserve.SimilarityInput(f"query {q}", str(path))
        for q in range(args.queries)
        for path in rng.sample(files, args.per_query)
    ]
    used = {x.image_url for x in inputs}
    size = sum(Path(p).stat().st_size for p in used)
    pairs = len(inputs)
    per_pair_naive = sum(Path(x.image_url).stat().st_size for x in inputs) / pairs
    print(
        f"{pairs} pairs over {len(used)} local files ({size / 1e6:.1f} MB); "
        f"uploading every pair would send {per_pair_naive / 1e3:.0f} kB/pair"
    )

    proc, address = serve("--model", "fake")
    try:
        cold = run(address, inputs)
        warm = run(address, inputs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = {"cold": cold, "warm": warm}
    print(f"\n{'run':<6}{'kB/pair':>10}{'of files':>10}{'seconds':>10}{'hashing s':>11}{'resends':>9}")
    for name, row in rows.items():
        row["bytes_per_pair"] = row["upload_bytes"] / pairs
        row["of_files"] = row["upload_bytes"] / size
        print(
            f"{name:<6}{row['bytes_per_pair'] / 1e3:>10.1f}{row['of_files']:>10.3f}{row['seconds']:>10.2f}"
            f"{row['hash_seconds']:>11.3f}{row['resends']:>9}"
        )
    # The cold run sends every file once: hashing (once per file) must cost less than that.
    print(
        f"\nhashing {size / 1e6:.0f} MB took {cold['hash_seconds']:.2f}s; "
        f"the cold run, which uploads them, {cold['seconds']:.2f}s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "pairs": pairs,
                "files": len(used),
                "files_bytes": size,
                "naive_bytes_per_pair": per_pair_naive,
                "runs": rows,
            },
            indent=2,
        )
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
