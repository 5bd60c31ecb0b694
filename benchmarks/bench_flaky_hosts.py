"""Fetching from hosts that misbehave: what a fresh client gets, and how long a dead host takes.

    python benchmarks/bench_flaky_hosts.py                   # server at its defaults
    python benchmarks/bench_flaky_hosts.py --fetch-attempts 1  # as before retries: each URL once

flaky: 600 pairs over 200 loopback URLs whose first request fails (503; 429 with Retry-After: 1;
       a reset before any answer; a reset halfway through the body), scored by a fresh SDK client
       against a fresh `clipserve serve --model fake`: pairs failed, wall seconds, and the most
       requests the host held at once (from arrival to the start of its answer).
dead:  20 items each on a port that refuses connections and on one that accepts them and never
       answers, scored one per thread with unary Score calls beside 20 items of a good host: how
       long each dead item took to fail (min/median/max), against --fetch-timeout-s, and whether
       the good host's items all scored.
Extra arguments go to the server. Prints one JSON line per scenario.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clipserve  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402
from tests.flaky_host import MODES, FlakyHost  # noqa: E402
from tests.helpers import make_image  # noqa: E402


def flaky(server_args: list[str]) -> dict:
    host = FlakyHost("127.0.0.1")
    host.hold_s = 0.02
    urls = [host.add(f"p{i}.png", make_image(16, 16, seed=i), MODES[i % len(MODES)]) for i in range(200)]
    server = ServerProcess(["--model", "fake", "--allow-private-networks", *server_args])
    try:
        with clipserve.CLIP(server.address) as clip:
            started = time.monotonic()
            results = clip.score_batch([(f"query {q}", url) for q in range(3) for url in urls])
            took = time.monotonic() - started
    finally:
        server.terminate()
        host.close()
    errors = [r.error for r in results if r.error]
    return {
        "scenario": "flaky",
        "pairs": len(results),
        "failed": len(errors),
        "example_error": errors[0] if errors else None,
        "wall_s": round(took, 2),
        "host_most_active": host.most_active,
    }


def dead(server_args: list[str]) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.3", 0))
        closed = probe.getsockname()[1]
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.4", 0))
    blackhole.listen(256)
    good_host = FlakyHost("127.0.0.2")
    refused = [f"http://127.0.0.3:{closed}/x{i}.png" for i in range(20)]
    silent = [f"http://127.0.0.4:{blackhole.getsockname()[1]}/x{i}.png" for i in range(20)]
    good = [good_host.add(f"g{i}.png", make_image(16, 16, seed=i)) for i in range(20)]
    server = ServerProcess(["--model", "fake", "--allow-private-networks", *server_args])
    try:
        with clipserve.CLIP(server.address, timeout=120) as clip:

            def timed(url: str) -> tuple[str, float, str | None]:
                started = time.monotonic()
                try:
                    clip.score("q", url)
                    return url, time.monotonic() - started, None
                except clipserve.ClipServeError as exc:
                    return url, time.monotonic() - started, str(exc)

            with ThreadPoolExecutor(len(refused + silent + good)) as pool:
                outcomes = list(pool.map(timed, refused + silent + good))
    finally:
        server.terminate()
        blackhole.close()
        good_host.close()
    by_kind: dict = {}
    for kind, urls in (("refused", refused), ("silent", silent)):
        took = [t for url, t, _ in outcomes if url in urls]
        example = next(error for url, _, error in outcomes if url in urls)
        by_kind[kind] = {
            "min_s": round(min(took), 2),
            "median_s": round(statistics.median(took), 2),
            "max_s": round(max(took), 2),
            "example_error": example,
        }
    return {"scenario": "dead", **by_kind, "good_failed": sum(1 for url, _, error in outcomes if url in good and error)}


if __name__ == "__main__":
    args = sys.argv[1:]
    for scenario in (flaky, dead):
        print(json.dumps({**scenario(args), "server_args": args}), flush=True)
