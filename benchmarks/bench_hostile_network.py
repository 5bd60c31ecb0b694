"""A hostile caller against the server's network edge, before and after #32: what got through.

One command (from the repository root, with the server and dev extras installed):

    python benchmarks/bench_hostile_network.py                    # starts its own servers
    python benchmarks/bench_hostile_network.py --address HOST:PORT --log server.log

On its own it starts `clipserve serve --model fake` at its defaults (plus a metrics port), and
for the upload part a second one with `--no-cache`, capturing their logs. Given `--address`, it
probes that server (on this machine: the "internal" image host listens on its loopback), and
reads its log from `--log` if given. It counts:

- ssrf: requests that reached a loopback image host, for each way of spelling 127.0.0.1
  (Unicode digits and dots, integer and short forms, IPv6 that carries it), through Score,
  ScoreBatch, Embed and ModelInfer; and the codes the caller got;
- poisoning: honest uploads (bytes + their true sha256) that failed while a liar streamed junk
  under the same hash, and how many of their errors told the liar's upload size;
- malformed: malformed URLs (bad brackets, a 300-character label, bad ports...) answered INTERNAL;
- log forging: lines of the server's text log that a request_id holding a newline and tabs made;
- metrics: the host label values the metrics port shows after callers fetched (own server only).

Run it on two checkouts (b1688e1 and after) for the before/after; docs/operations.md has both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import ImageHost, error_codes, make_image  # noqa: E402  (the tests' loopback image host and probes)

SPELLINGS = {
    "unicode": ["１２７.０.０.１", "127。0。0。1", "１２７．０．０．１", "①②⑦.0.0.①"],
    "integer": ["2130706433", "0x7f.1", "017700000001", "127.1", "0x7f000001"],
    "ipv6": ["[::ffff:127.0.0.1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[64:ff9b:1::7f00:1]", "[2002:7f00:1::]"],
}
MALFORMED = [
    "http://[::1/x.png", "http://[]/x.png", "http://" + "a" * 300 + ".example.com/x.png", "http://example.com:99999/x.png",
    "http://example.com:port/x.png", "http://exa mple.com/x.png",
]
FORGED = "x\n2026-12-06\t20:00:00,000\tERROR\tclipserve:\tforged"


def serve(*flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`clipserve serve --model fake FLAGS` on a free port, its log lines collected."""
    command = [
        sys.executable,
        "-m",
        "clipserve.cli",
        "serve",
        "--model",
        "fake",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *flags,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log: list[str] = []
    address = ""
    for line in proc.stdout:
        log.append(line)
        if line.startswith("clipserve listening on "):
            address = "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
        if line.startswith("clipserve ready"):
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
            return proc, address, log
    raise RuntimeError(f"server exited with {proc.wait()}:\n" + "".join(log))


def codes_on_paths(address: str, urls: list[str]) -> dict[str, list[str]]:
    return {path: [code or "OK" for code in codes] for path, codes in error_codes(address, urls).items()}


def ssrf(address: str) -> dict[str, object]:
    internal = ImageHost()  # 127.0.0.1: loopback, which the server must never fetch from
    internal.add("secret.png", make_image(seed=1))
    port = internal.base.rsplit(":", 1)[1]
    out: dict[str, object] = {}
    try:
        for name, spellings in SPELLINGS.items():
            before = sum(internal.hits.values())
            codes = codes_on_paths(address, [f"http://{s}:{port}/img/secret.png" for s in spellings])
            out[name] = {
                "sent": sum(map(len, codes.values())),
                "reached_internal_host": sum(internal.hits.values()) - before,
                "codes": dict(Counter(c for path in codes.values() for c in path)),
            }
    finally:
        internal.close()
    return out


def malformed(address: str) -> dict[str, object]:
    codes = codes_on_paths(address, MALFORMED)
    return {"sent": sum(map(len, codes.values())), "internal": sum(c == "INTERNAL" for p in codes.values() for c in p),
            "codes": dict(Counter(c for path in codes.values() for c in path))}


def poisoning(address: str, honest_uploads: int = 53) -> dict[str, object]:
    import grpc
    from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

    image = make_image(96, 72, seed=7)
    sha = hashlib.sha256(image).hexdigest()
    junk = b"junk under another image's hash" * 3
    stop = threading.Event()

    def lies() -> Iterator[scorer_pb2.ScoreRequestChunk]:
        while not stop.wait(0.002):
            yield scorer_pb2.ScoreRequestChunk(
                items=[scorer_pb2.ScoreRequest(query="q", image_bytes=junk, image_sha256=sha)] * 20
            )

    def liar() -> None:
        with grpc.insecure_channel(address) as channel:
            for _ in scorer_pb2_grpc.ScorerStub(channel).ScoreChunks(lies(), timeout=300):
                pass

    attacker = threading.Thread(target=liar, daemon=True)
    attacker.start()
    time.sleep(0.5)  # the lies are flowing
    errors: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        for index in range(honest_uploads):
            try:
                stub.Score(
                    scorer_pb2.ScoreRequest(query=f"honest {index}", image_bytes=image, image_sha256=sha), timeout=60
                )
            except grpc.RpcError as exc:
                errors.append(exc.details() or "")
    stop.set()
    attacker.join(30)
    return {
        "honest_uploads": honest_uploads,
        "honest_failed": len(errors),
        "errors_naming_the_liars_upload": sum(f"<{len(junk)} uploaded bytes>" in e for e in errors),
    }


def log_forging(address: str, log: list[str] | None, log_path: Path | None) -> dict[str, object]:
    import grpc
    from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:  # an empty query: refused, and logged with its request_id
            scorer_pb2_grpc.ScorerStub(channel).Score(
                scorer_pb2.ScoreRequest(query="", image_url="http://x/", request_id=FORGED), timeout=30
            )
        except grpc.RpcError:
            pass
    time.sleep(0.5)
    lines = log if log is not None else (log_path.read_text().splitlines(keepends=True) if log_path else None)
    if lines is None:
        return {"forged_lines": None, "note": "no log to read: pass --log"}
    return {"forged_lines": sum(line.startswith("2026-12-06\t20:00:00,000\tERROR") for line in lines)}


def metrics_hosts(metrics_port: int) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sorted(
        {
            line.split('host="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("clipserve_fetch") and 'host="' in line
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--address",
        help=(
            "probe this running server instead of starting one (poisoning "
            "needs it run with --no-cache to show the worst case)"
        ),
    )
    parser.add_argument("--log", type=Path, help="the running server's text log, for the log-forging count")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile_network.json")
    args = parser.parse_args(argv)

    report: dict[str, object] = {"load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.address:
        report.update(ssrf=ssrf(args.address), malformed=malformed(args.address), poisoning=poisoning(args.address),
                      log_forging=log_forging(args.address, None, args.log))
    else:
        metrics_port = 19090 + (int(time.time()) % 500)
        proc, address, log = serve("--metrics-port", str(metrics_port))
        try:
            report.update(ssrf=ssrf(address), malformed=malformed(address), log_forging=log_forging(address, log, None))
            report["metrics_host_labels"] = metrics_hosts(metrics_port)
        finally:
            proc.terminate()
            proc.wait(60)
        proc, address, _ = serve("--no-cache")
        try:
            report["poisoning_no_cache"] = poisoning(address)
        finally:
            proc.terminate()
            proc.wait(60)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
