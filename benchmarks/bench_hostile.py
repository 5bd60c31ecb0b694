"""Hostile inputs, before and after (issue #32): for each, the server's peak-RSS growth, another
caller's worst latency while it is answered, health afterwards, and the error returned.

    python benchmarks/bench_hostile.py [--server-path DIR]   # DIR: another checkout's server/ and client/

Sizes are scaled down from the issue's (noted per row) so that the old code's worst cases
stay within a few GB on a shared box. The server runs the tiny random-weight checkpoint on CPU
(--runtime torch, --decode-pool processes with 2 workers, --no-cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clipserve.v1 import scorer_pb2, scorer_pb2_grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench_throughput import serve  # noqa: E402  (one way to start a server, for every benchmark)
from tests.helpers import make_image  # noqa: E402
from tests.hostile import empty_items_chunk, ico_with_png, malformed_request, many_scans_jpeg, thin_png  # noqa: E402

_BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _tree(pid: int) -> list[int]:
    """The server and its decode worker processes."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def peak_rss_mb(pid: int) -> float:
    """The peak RSS of the server and its decode workers, summed."""
    total = 0.0
    for member in _tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:  # a worker killed meanwhile
            pass
    return total


def reset_peak(pid: int) -> None:
    for member in _tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")  # the peak starts again from the current RSS
        except FileNotFoundError:
            pass


def health(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"


def error_of(call) -> str:
    try:
        result = call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()[:90]}"
    return result


def hostile_requests(address: str):
    def score(query: str, image: bytes):
        def call() -> str:
            with grpc.insecure_channel(address, options=_BIG) as channel:
                scorer_pb2_grpc.ScorerStub(channel).Score(
                    scorer_pb2.ScoreRequest(query=query, image_bytes=image), timeout=300
                )
            return "OK (scored)"
        return call

    def chunk(items: int):
        def call() -> str:
            with grpc.insecure_channel(address, options=_BIG) as channel:
                errors = sum(
                    r.HasField("error")
                    for c in scorer_pb2_grpc.ScorerStub(channel).ScoreChunks(
                        iter([scorer_pb2.ScoreRequestChunk.FromString(empty_items_chunk(items))]), timeout=300
                    )
                    for r in c.items
                )
            return f"OK, {errors} per-item errors streamed back"
        return call

    def raw_score(data: bytes):
        def call() -> str:
            with grpc.insecure_channel(address, options=_BIG) as channel:
                method = channel.unary_unary(
                    "/clipserve.v1.Scorer/Score", request_serializer=None, response_deserializer=None
                )
                method(data, timeout=300)
            return "OK"
        return call

    def model_infer(pairs: int):
        def call() -> str:
            sys.path.insert(0, str(ROOT / "client"))
            from clipserve.oip import open_inference_pb2 as oip, open_inference_pb2_grpc as oip_grpc

            request = oip.ModelInferRequest(model_name="default")
            for name in ("text", "image_bytes"):
                request.inputs.add(name=name, datatype="BYTES", shape=[pairs])
                request.raw_input_contents.append(b"\x01\x00\x00\x00a" * pairs)
            with grpc.insecure_channel(address, options=_BIG) as channel:
                oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)
            return "OK"
        return call

    return [
        ("thin PNG 150000x1 (issue: 600000x1)", score("q", thin_png(150_000))),
        ("ICO holding an 8000x8000 PNG", score("q", ico_with_png(8000, 8000))),
        ("progressive JPEG, 2000 empty scans", score("q", many_scans_jpeg(2000))),
        ("ScoreChunks of 300k empty items (issue: millions)", chunk(300_000)),
        ("malformed ScoreRequest, 10 MB (issue: 40 MB)", raw_score(malformed_request(5_000_000))),
        ("ModelInfer of 100k pairs (issue: 1M)", model_infer(100_000)),
        ("4 MB query (issue: 10 MB)", score("a photo of a cat " * 250_000, make_image(seed=1))),
    ]


def another_caller(address: str, image: bytes, done: threading.Event, latencies: list[float]) -> None:
    """Score an ordinary pair every 50 ms until ``done``, noting each call's latency."""
    with grpc.insecure_channel(address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)
        while not done.is_set():
            started = time.monotonic()
            try:
                stub.Score(scorer_pb2.ScoreRequest(query="a photo of a cat", image_bytes=image), timeout=120)
            except grpc.RpcError:
                pass
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-path", default=str(ROOT), help="the checkout whose server runs")
    args = parser.parse_args()
    from clipserve_server.models.synthetic import build_checkpoint

    checkpoint = build_checkpoint(Path(tempfile.mkdtemp()) / "tiny", arch="tiny", seed=1234)
    path = Path(args.server_path)
    # Inherited by the server: that checkout's code; a flag old code also has, as an environment variable.
    os.environ.update(PYTHONPATH=f"{path / 'server'}:{path / 'client'}", CLIPSERVE_FORWARD_TIMEOUT_S="5")
    proc, address = serve(
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--runtime",
        "torch",
        "--decode-pool",
        "processes",
        "--decode-workers",
        "2",
        "--no-cache",
    )
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    print(f"server: {path}; load: {os.getloadavg()}")
    print("| hostile request | peak RSS growth | other caller's worst latency | health after | answer |")
    print("|---|---|---|---|---|")
    image = make_image(40, 40, seed=3)
    for name, call in hostile_requests(address):
        if proc.poll() is not None:
            print(f"| {name} | - | - | server exited ({proc.returncode}) | - |")
            continue
        reset_peak(proc.pid)
        before = peak_rss_mb(proc.pid)
        latencies: list[float] = []
        done = threading.Event()
        thread = threading.Thread(target=another_caller, args=(address, image, done, latencies))
        thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        answer = error_of(call)
        seconds = time.monotonic() - started
        done.set()
        thread.join()
        growth = peak_rss_mb(proc.pid) - before if proc.poll() is None else float("nan")
        worst = max(latencies) if latencies else float("nan")
        print(
            f"| {name} | {growth:+.0f} MB | {worst:.2f} s (median {statistics.median(latencies):.3f} s; "
            f"answered in {seconds:.1f} s) | {health(address)} | {answer} |",
            flush=True,
        )
        time.sleep(6)  # a wedged forward may come back (new code), before the next row
    proc.terminate()
    proc.wait(60)


if __name__ == "__main__":
    main()
