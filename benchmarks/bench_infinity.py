"""clipserve against infinity-emb on the same CLIP checkpoint: cold pairs/s, interleaved (#22).

One command (from the repository root, with the server extra installed here and infinity-emb
in a virtual environment of its own, see below):

    python benchmarks/bench_infinity.py --infinity-python /path/to/infinity-venv/bin/python
    # 1000 pairs = 40 queries x 25 of 200 images, ViT-B/32 architecture, best of 3

It builds (or, with --checkpoint, reuses) a random-weight checkpoint with the architecture of
openai/clip-vit-base-patch32, writes the photo corpus of bench_throughput.py, serves it over
loopback HTTP from a process of its own, draws the same Q x K pairs, and for every run, the two
servers in alternating order (a shared machine drifts between runs):

- **clipserve**: a fresh ``clipserve serve --model CKPT --allow-private-networks --dtype DTYPE``
  (every other setting at its default), one cold pass through the SDK's ``score_batch``.
- **infinity**: a fresh ``infinity_emb v2`` on the same weights (engine torch, device cpu,
  --dtype DTYPE, --batch-size 32: the only engine infinity has for image models; its README's CPU
  advice, the optimum/ONNX engine, serves text models only), driven as its REST API is meant to
  be used to score these pairs: the distinct queries and the distinct image URLs are embedded
  through ``POST /embeddings`` (``modality`` text or image, ``encoding_format`` base64 as the
  OpenAI client asks for), --request-size inputs a request (32: its limit for image URLs),
  --concurrency requests in flight; then every pair's score is computed here as the model's
  ``logits_per_image``: ``exp(logit_scale) * cos(text, image) + logit_bias``, with the
  checkpoint's own logit_scale (and logit_bias, if it has one). Nothing is cached between runs:
  each server is new, and infinity's disk cache is off by default.

Both passes are timed from the first request to the last score. Every run checks that neither
side failed a pair and that, on --check-pairs pairs, infinity's score equals clipserve's within
--tolerance (the same checkpoint must give the same logits; in bfloat16, two bf16
implementations, the same logits within bf16's rounding). --dtype bfloat16 runs both sides
in bfloat16 (clipserve: OpenVINO at bf16 on the CPU; infinity: torch bfloat16).

infinity-emb 0.0.78 runs on transformers < 5 (its ``vision`` extra pins colpali-engine 0.3.8,
which pins transformers 4.47), so it gets a view of the checkpoint that such a transformers
reads, as a hub checkpoint would give it: the same weight and tokenizer files (links), a
``preprocessor_config.json`` (transformers 5 writes the image processor inside
``processor_config.json`` instead), and ``max_length`` in ``config.json`` set to the text
tower's context (77). Without it, transformers 4's ``PretrainedConfig`` answers ``max_length``
with its generation default, 20, and infinity truncates every query to 20 tokens; the random
checkpoint's byte-level tokenizer spends about one token a character, so the queries here would
be cut where a real CLIP tokenizer (about one token a word) would not. loopback is on
infinity's list of forbidden image hosts by default; ``INFINITY_MEDIA_URL_BLACKLIST`` lifts it
for 127.0.0.0/8 and localhost only (clipserve's --allow-private-networks does the same for it).

Setting up infinity (python 3.11; the torch of this environment, from its wheel):

    python -m venv /work/infinity-venv
    /work/infinity-venv/bin/pip install "infinity-emb[server,vision,torch]==0.0.78" \\
        torch==2.14.1 torchvision==0.29.1 aiohttp   # aiohttp: image URLs (not in 0.0.78's extras)

``--http`` compares the HTTP faces instead (#35): every distinct image embedded once, by the
same aiohttp client with the same requests (--request-size image URLs, ``encoding_format``
base64, --concurrency in flight), through clipserve's ``POST /v1/embeddings`` (a fresh server
with ``--http-port``) and infinity's ``POST /embeddings``: images/s, and the unit vectors of a
sample of images must agree within --tolerance.

It prints pairs/s per run with the load average before it, best and median of each side and
their ratio, both sides' versions and settings, and writes the table as JSON (--out). Smoke
test (a second, a few images): ``--arch tiny --images 4 --queries 2 --per-query 3 --repeat 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_throughput import in_fresh_process, make_corpus, make_workload, measure_clipserve, serve  # noqa: E402
from corpus_host import serve_corpus  # noqa: E402

INFINITY_PACKAGES = (
    "infinity-emb",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "sentence-transformers",
    "colpali-engine",
    "numpy",
    "pillow",
    "fastapi",
    "uvicorn",
    "aiohttp",
)
CLIPSERVE_PACKAGES = ("clipserve", "torch", "transformers", "openvino", "numpy", "pillow", "grpcio")
# infinity 0.0.78's default INFINITY_MEDIA_URL_BLACKLIST without localhost and 127.0.0.0/8.
MEDIA_BLACKLIST = (
    "0.0.0.0/8;10.0.0.0/8;100.64.0.0/10;169.254.0.0/16;172.16.0.0/12;192.168.0.0/16;224.0.0.0/4;"
    "::/128;fc00::/7;fe80::/10;ff00::/8"
)
SERVED_NAME = "clip"
OUT = ROOT / "benchmarks" / "results" / "infinity.json"


# -- the checkpoint, and infinity's view of it ---------------------------------------------------

def build(folder: str, arch: str, seed: int) -> str:
    """Build the random checkpoint into ``folder`` (in a fresh process: no torch threads stay
    behind in this one), through a temporary folder so that a half-written one is never reused."""
    from clipserve_server.models.synthetic import build_checkpoint

    target = Path(folder)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    build_checkpoint(partial, arch=arch, seed=seed)
    partial.rename(target)
    return str(target)


def ensure_checkpoint(folder: Path | None, arch: str, seed: int) -> Path:
    folder = folder or Path(tempfile.gettempdir()) / "clipserve-bench" / f"{arch}-seed{seed}"
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"building the {arch} checkpoint in {folder}", flush=True)
        in_fresh_process(build, str(folder), arch, seed)
    return folder


def infinity_view(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as transformers 4 reads it (see the module's docstring): links to its
    files, an image processor in preprocessor_config.json, max_length in config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.name not in ("config.json", "processor_config.json") and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config.setdefault("max_length", int(config.get("text_config", {}).get("max_position_embeddings", 77)))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor = checkpoint / "processor_config.json"
    if not (folder / "preprocessor_config.json").exists() and processor.exists():
        image_processor = json.loads(processor.read_text()).get("image_processor")
        if image_processor:
            (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    return folder


def logit_parameters(checkpoint: Path) -> tuple[float, float]:
    """exp(logit_scale) and logit_bias (0 without one) from the checkpoint's safetensors."""
    from safetensors import safe_open

    index = checkpoint / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
    values = {}
    for name in ("logit_scale", "logit_bias"):
        file = checkpoint / weight_map.get(name, "model.safetensors")
        with safe_open(str(file), "np") as tensors:
            if name in tensors.keys():
                values[name] = float(np.asarray(tensors.get_tensor(name), dtype=np.float64).reshape(-1)[0])
    if "logit_scale" not in values:
        raise ValueError(f"{checkpoint} has no logit_scale")
    return float(np.exp(values["logit_scale"])), values.get("logit_bias", 0.0)


# -- infinity ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_infinity(python: str, model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """A fresh ``infinity_emb v2`` on a free loopback port; returns once /health answers (the
    model is loaded and warmed up by then: infinity starts its engines before it serves)."""
    port = free_port()
    command = [
        python, "-m", "infinity_emb.cli", "v2", "--model-id", str(model), "--served-model-name", SERVED_NAME,
        "--engine", "torch", "--device", "cpu", "--dtype", args.dtype, "--batch-size", str(args.batch_size),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-compile",
    ]
    env = {
        **os.environ,
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "HF_HUB_OFFLINE": "1",
        "INFINITY_MEDIA_URL_BLACKLIST": MEDIA_BLACKLIST,
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"infinity exited with {proc.returncode}; its log ({log}) ends:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"infinity did not answer /health within {args.startup_timeout} s; its log: {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def embeddings_pass(
    url: str, model: str, batches: list[tuple[str, list[str]]], concurrency: int
) -> tuple[float, dict[tuple[str, str], np.ndarray], list[str]]:
    """POST each (modality, inputs) batch to an OpenAI-style embeddings ``url`` (``modality``
    as infinity takes it, ``encoding_format`` base64 as the OpenAI client asks for),
    ``concurrency`` requests in flight. Returns the seconds from the first request to the last
    answer, the vectors by (modality, input) and the errors."""
    import aiohttp

    vectors: dict[tuple[str, str], np.ndarray] = {}
    errors: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def embed(session: aiohttp.ClientSession, modality: str, inputs: list[str]) -> None:
        body = {"model": model, "input": inputs, "modality": modality, "encoding_format": "base64"}
        async with gate:
            try:
                async with session.post(url, json=body) as response:
                    if response.status != 200:
                        errors.append(f"{modality} request: HTTP {response.status} {(await response.text())[:300]}")
                        return
                    answer = await response.json()
            except aiohttp.ClientError as e:
                errors.append(f"{modality} request: {e!r}")
                return
        for item in answer["data"]:
            vectors[modality, inputs[item["index"]]] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(embed(session, modality, inputs) for modality, inputs in batches))
        return time.perf_counter() - started, vectors, errors


def batched(modality: str, inputs: list[str], size: int) -> list[tuple[str, list[str]]]:
    return [(modality, inputs[i : i + size]) for i in range(0, len(inputs), size)]


async def infinity_pass(
    base: str, pairs: list[tuple[str, str]], scale: float, bias: float, request_size: int, concurrency: int
) -> tuple[float, np.ndarray, int, str | None]:
    """Embed the distinct queries and image URLs (requests of ``request_size`` inputs,
    ``concurrency`` in flight), then score every pair here. Returns pairs/s, the scores (NaN
    where a pair failed), the number of failed pairs and the first error."""
    texts = list(dict.fromkeys(q for q, _ in pairs))
    urls = list(dict.fromkeys(u for _, u in pairs))
    started = time.perf_counter()
    _, vectors, errors = await embeddings_pass(
        f"{base}/embeddings",
        SERVED_NAME,
        batched("text", texts, request_size) + batched("image", urls, request_size),
        concurrency,
    )
    scores = score_pairs(pairs, vectors, scale, bias)
    elapsed = time.perf_counter() - started
    failed = int(np.isnan(scores).sum())
    return len(pairs) / elapsed, scores, failed, (errors[0] if errors else None)


def measure_images_http(
    url: str, model: str, urls: list[str], sample: list[str], args: argparse.Namespace
) -> tuple[float, np.ndarray, int, str | None]:
    """--http: every distinct image embedded once through ``url`` (either side's OpenAI-style
    endpoint, the same client): images/s, the sample's unit vectors, failed images, first error."""
    seconds, vectors, errors = asyncio.run(
        embeddings_pass(url, model, batched("image", urls, args.request_size), args.concurrency)
    )
    dim = len(next(iter(vectors.values()))) if vectors else 1
    chosen = np.stack(
        [vectors.get(("image", u), np.full(dim, np.nan, dtype=np.float32)).astype(np.float64) for u in sample]
    )
    with np.errstate(invalid="ignore"):
        chosen /= np.linalg.norm(chosen, axis=1, keepdims=True)
    return (
        len(urls) / seconds,
        chosen,
        len(urls) - sum(1 for u in urls if ("image", u) in vectors),
        (errors[0] if errors else None),
    )


def score_pairs(
    pairs: list[tuple[str, str]], vectors: dict[tuple[str, str], np.ndarray], scale: float, bias: float
) -> np.ndarray:
    """logits_per_image of every pair: exp(logit_scale) * cos(text, image) + logit_bias."""
    dim = len(next(iter(vectors.values()))) if vectors else 1
    missing = np.full(dim, np.nan, dtype=np.float32)

    def unit(key: tuple[str, str]) -> np.ndarray:
        v = vectors.get(key, missing).astype(np.float64)
        with np.errstate(invalid="ignore"):
            return v / np.linalg.norm(v)

    texts = {q: unit(("text", q)) for q in dict.fromkeys(q for q, _ in pairs)}
    images = {u: unit(("image", u)) for u in dict.fromkeys(u for _, u in pairs)}
    t = np.stack([texts[q] for q, _ in pairs])
    i = np.stack([images[u] for _, u in pairs])
    return scale * np.einsum("nd,nd->n", t, i) + bias


def measure_infinity(
    base: str, pairs: list[tuple[str, str]], scale: float, bias: float, args: argparse.Namespace
) -> tuple[float, np.ndarray, int, str | None]:
    return asyncio.run(infinity_pass(base, pairs, scale, bias, args.request_size, args.concurrency))


# -- clipserve -----------------------------------------------------------------------------------

def clipserve_check(address: str, sample: list[tuple[str, str]]) -> tuple[np.ndarray, dict]:
    """After the timed cold pass: the sample's scores (from its caches now, the same values) and
    what the server says it runs."""
    import clipserve

    with clipserve.CLIP(address) as clip:
        results = clip.score_batch([clipserve.SimilarityInput(q, u) for q, u in sample])
        info = clip.model_info()
    scores = np.array([np.nan if r.score is None else r.score for r in results], dtype=np.float64)
    settings = {
        "image_runtime": info.image_runtime,
        "text_runtime": info.text_runtime,
        "device": info.device,
        "dtype": info.dtype,
        "max_batch_size": info.max_batch_size,
        "max_batch_delay_ms": info.max_batch_delay_ms,
        "logit_scale": info.logit_scale,
        "logit_bias": info.logit_bias,
        "max_text_tokens": info.max_text_tokens,
        "instances": len(info.instances),
    }
    return scores, settings


# -- versions ----------------------------------------------------------------------------------------

VERSIONS = """\
import importlib.metadata as m, json, sys, torch
v = {}
for p in sys.argv[1:]:
    try: v[p] = m.version(p)
    except m.PackageNotFoundError: pass
v["torch_threads"] = torch.get_num_threads()
print(json.dumps(v))
"""


def versions(python: str, packages: tuple[str, ...]) -> dict:
    out = subprocess.run([python, "-c", VERSIONS, *packages], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# -- main --------------------------------------------------------------------------------------------

# What each comparison was asked to reach (issues #22, #33, #35), by (--http, --dtype).
_GOAL = {
    (False, "float32"): "issue #22 asks >= 1.3x",
    (False, "bfloat16"): "issue #33 asks >= 3x",
    (True, "float32"): "issue #35 asks >= 1.3x",
    (True, "bfloat16"): "no goal set at bfloat16 over HTTP",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--infinity-python",
        default="/work/infinity-venv/bin/python",
        help="the python of infinity-emb's virtual environment",
    )
    parser.add_argument("--arch", default="vit-b-32", help="the random checkpoint's architecture (tiny: smoke tests)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=(
            "the checkpoint folder: reused if it holds one, "
            "built there if not (default: TMPDIR/clipserve-bench/ARCH-seedSEED)"
        ),
    )
    parser.add_argument("--queries", "-Q", type=int, default=40)
    parser.add_argument("--per-query", "-K", type=int, default=25)
    parser.add_argument("--images", "-N", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="infinity's --batch-size")
    parser.add_argument(
        "--request-size", type=int, default=32, help="inputs per infinity request (at most 32 image URLs)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="infinity requests in flight")
    parser.add_argument("--check-pairs", type=int, default=25, help="pairs whose scores must agree, every run")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="both sides' --dtype (clipserve's other flags at their defaults)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest score difference allowed between the two (default: 1e-3 in float32; "
        "in bfloat16 2e-2 x exp(logit_scale): two bf16 implementations, each ~1e-2 relative off float32)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of both servers, interleaved; best and median are reported"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--http",
        action="store_true",
        help="compare image embeddings over HTTP instead: clipserve's POST /v1/embeddings against "
        "infinity's POST /embeddings, every distinct image once, the same client for both (images/s; "
        "the sample's unit vectors must agree within --tolerance)",
    )
    args = parser.parse_args(argv)
    if args.http and args.out == OUT:
        args.out = OUT.with_name("infinity-http.json")

    checkpoint = ensure_checkpoint(args.checkpoint, args.arch, args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="clipserve-bench-infinity-"))
    view = infinity_view(checkpoint, scratch / checkpoint.name)
    scale, bias = logit_parameters(checkpoint)
    if args.tolerance is None:
        args.tolerance = 1e-3 if args.dtype == "float32" else 2e-2 * scale
    infinity_versions = versions(args.infinity_python, INFINITY_PACKAGES)
    clipserve_versions = versions(sys.executable, CLIPSERVE_PACKAGES)
    corpus = make_corpus(args.images, args.seed)
    host, base = serve_corpus(corpus)
    pairs = make_workload(base, sorted(corpus), args.queries, args.per_query, args.seed)
    check = sorted(random.Random(args.seed + 2).sample(range(len(pairs)), min(args.check_pairs, len(pairs))))
    sample = [pairs[i] for i in check]
    urls = list(dict.fromkeys(u for _, u in pairs))
    image_sample = sorted(random.Random(args.seed + 3).sample(urls, min(args.check_pairs, len(urls))))
    unit = "images/s" if args.http else "pairs/s"
    print(
        f"workload: {len(pairs)} pairs, {len({q for q, _ in pairs})} queries, "
        f"{len({u for _, u in pairs})} distinct images "
        f"({sum(map(len, corpus.values())) / 1e6:.1f} MB corpus); "
        f"checkpoint {checkpoint} (exp(logit_scale) {scale:.4f}, bias {bias})\n"
        f"infinity {infinity_versions}\nclipserve {clipserve_versions}\n"
        f"infinity: engine torch, cpu, {args.dtype}, batch size {args.batch_size}; "
        f"{args.request_size} inputs a request, {args.concurrency} in flight",
        flush=True,
    )

    samples: dict[str, list[float]] = {"clipserve": [], "infinity": []}
    startup: dict[str, list[float]] = {"clipserve": [], "infinity": []}
    loads: dict[str, list[float]] = {"clipserve": [], "infinity": []}
    failures = {"clipserve": 0, "infinity": 0}
    first_error: dict[str, str] = {}
    max_diff = 0.0
    clipserve_settings: dict = {}
    log = scratch / "infinity.log"
    try:
        for run in range(1, args.repeat + 1):
            order = ["clipserve", "infinity"] if run % 2 else ["infinity", "clipserve"]
            scores: dict[str, np.ndarray] = {}
            for side in order:
                started = time.perf_counter()
                if side == "clipserve":
                    http_port = free_port()
                    proc, address = serve(
                        "--model",
                        str(checkpoint),
                        "--allow-private-networks",
                        "--http-port",
                        str(http_port),
                        "--dtype",
                        args.dtype,
                    )
                else:
                    proc, address = start_infinity(args.infinity_python, view, args, log)
                startup[side].append(time.perf_counter() - started)
                try:
                    loads[side].append(os.getloadavg()[0])
                    if args.http:
                        url, model = (
                            (f"http://127.0.0.1:{http_port}/v1/embeddings", "default")
                            if side == "clipserve"
                            else (f"{address}/embeddings", SERVED_NAME)
                        )
                        rate, scores[side], failed, error = measure_images_http(url, model, urls, image_sample, args)
                    elif side == "clipserve":
                        rate, failed = measure_clipserve(address, pairs)
                        scores[side], clipserve_settings = clipserve_check(address, sample)
                        error = None if not failed else f"{failed} pairs failed in score_batch"
                    else:
                        rate, all_scores, failed, error = measure_infinity(address, pairs, scale, bias, args)
                        scores[side] = all_scores[check]
                finally:
                    stop(proc)
                samples[side].append(rate)
                failures[side] += failed
                if error:
                    first_error.setdefault(side, error)
            # --http: the sample images' unit vectors; else the sample pairs' scores.
            diff = float(np.nanmax(np.abs(scores["clipserve"] - scores["infinity"]))) if check else 0.0
            if np.isnan(scores["clipserve"]).any() or np.isnan(scores["infinity"]).any():
                diff = float("inf")
            max_diff = max(max_diff, diff)
            print(
                f"run {run}: "
                + ", ".join(
                    (
                        f"{side} {samples[side][-1]:.1f} {unit} (load {loads[side][-1]:.2f}, "
                        f"start-up {startup[side][-1]:.1f} s)"
                    )
                    for side in order
                )
                + (
                    f"; max |{'vector' if args.http else 'score'} difference| on "
                    f"{len(scores['clipserve'])} {'images' if args.http else 'pairs'} {diff:.2e}"
                ),
                flush=True,
            )
    finally:
        host.shutdown()

    best = {side: max(v) for side, v in samples.items()}
    median = {side: statistics.median(v) for side, v in samples.items()}
    all_loads = loads["clipserve"] + loads["infinity"]
    agree = max_diff <= args.tolerance
    print()
    print(
        f"best of {args.repeat} (median in brackets), "
        f"cold {unit}{' over HTTP (clipserve /v1/embeddings, infinity /embeddings)' if args.http else ''}; "
        f"load average {min(all_loads):.2f}-{max(all_loads):.2f} on {os.cpu_count()} CPUs"
    )
    for side in ("clipserve", "infinity"):
        print(
            f"  {side:<10} {best[side]:9.1f} ({median[side]:.1f})   runs: "
            f"{', '.join(f'{v:.1f}' for v in samples[side])}; "
            f"start-up {min(startup[side]):.1f} s; failed {'images' if args.http else 'pairs'} {failures[side]}"
        )
    print(
        f"  clipserve / infinity: {best['clipserve'] / best['infinity']:.2f}x best, "
        f"{median['clipserve'] / median['infinity']:.2f}x median "
        f"({_GOAL[(args.http, args.dtype)]})"
    )
    print(
        f"  {'vectors' if args.http else 'scores'} agree within {args.tolerance:g} on {len(scores['clipserve'])} "
        f"{'images' if args.http else 'pairs'} every run: {'yes' if agree else 'NO'} (max difference {max_diff:.2e})"
    )
    print(f"  clipserve ran: {clipserve_settings}")
    for side, error in first_error.items():
        print(f"  {side} first error: {error}")
    report = {
        "mode": "http image embeddings (images/s)" if args.http else "score pairs (pairs/s)",
        "workload": {
            "pairs": len(pairs),
            "queries": args.queries,
            "per_query": args.per_query,
            "images": args.images,
            "arch": args.arch,
            "checkpoint": str(checkpoint),
            "seed": args.seed,
        },
        "infinity": {
            "versions": infinity_versions,
            "engine": "torch",
            "device": "cpu",
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "request_size": args.request_size,
            "concurrency": args.concurrency,
        },
        "clipserve": {
            "versions": clipserve_versions,
            "flags": ["--model", "CKPT", "--allow-private-networks", "--dtype", args.dtype]
            + (["--http-port", "PORT"] if args.http else []),
            "server": clipserve_settings,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1min": loads},
        "repeat": args.repeat,
        ("images_per_s" if args.http else "pairs_per_s"): {
            side: [round(v, 2) for v in values] for side, values in samples.items()
        },
        "startup_s": {side: [round(v, 2) for v in values] for side, values in startup.items()},
        "best": best,
        "median": median,
        "ratio_best": best["clipserve"] / best["infinity"],
        "ratio_median": median["clipserve"] / median["infinity"],
        "failures": failures,
        "errors": first_error,
        "score_check": {
            "pairs": len(check),
            "max_abs_difference": max_diff,
            "tolerance": args.tolerance,
            "agree": agree,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if agree and not any(failures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
