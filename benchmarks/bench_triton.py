"""Triton-style benchmark: one image per call, as a Triton CLIP model's users embed a collection.

One command (from the repository root, with the server and dev extras installed):

    python benchmarks/bench_triton.py             # 200 photos, ViT-B/32 architecture, 16 threads

The pattern measured is the loader of waggle-sensor's sage-nrp-image-search: for every image,
one ``tritonclient`` call to the model ``clip`` with its caption (BYTES [1]) and its pixels
(FP32 [H, W, 3]), answered with both embeddings. Two ways:

- **clipserve**: ``clipserve serve`` in its own process, called through the Open Inference
  Protocol from 16 threads (one client each), so that calls from different threads share
  forward passes.
- **triton-model loop**: what that Triton python-backend model runs per request, in a fresh
  process, one request after another (``max_batch_size 0``, no batching across requests):
  ``CLIPProcessor`` on the text, ``get_text_features``; ``CLIPProcessor`` on the float array,
  ``get_image_features``. (Re-implemented here from reading it; no Triton server involved, so
  this is the model's own cost, without Triton's transport.)

Both print images/s; the passes alternate (``--repeat``), each with the load average before it,
since the machine may be shared. The weights are random (``--checkpoint`` for a real model
folder): the cost of a forward pass depends on the architecture, not the weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_throughput import in_fresh_process, make_corpus, serve  # noqa: E402  (the same photo corpus)


def captioned_images(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(caption, uint8 H x W x 3 pixels): what the loader holds once it has read an image."""
    from PIL import Image

    corpus = make_corpus(n, seed)
    return [
        (f"a photo taken by node {i % 17}, frame {i}", np.array(Image.open(io.BytesIO(data)).convert("RGB")))
        for i, data in enumerate(corpus.values())
    ]


def clip_call(client, text: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One call as the Triton CLIP user's app makes it (see tests/e2e/test_open_inference.py)."""
    import tritonclient.grpc as triton

    pixels = np.array(image).astype(np.float32)
    inputs = [triton.InferInput("text", [1], "BYTES"), triton.InferInput("image", list(pixels.shape), "FP32")]
    inputs[0].set_data_from_numpy(np.array([text.encode("utf-8")], dtype="object"))
    inputs[1].set_data_from_numpy(pixels)
    outputs = [triton.InferRequestedOutput("text_embedding"), triton.InferRequestedOutput("image_embedding")]
    result = client.infer(model_name="clip", inputs=inputs, outputs=outputs)
    return result.as_numpy("text_embedding"), result.as_numpy("image_embedding")


def measure_clipserve(address: str, items: list[tuple[str, np.ndarray]], threads: int) -> float:
    """images/s of ``threads`` callers taking the images in turn, one call each."""
    import tritonclient.grpc as triton

    next_item = iter(range(len(items)))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def caller() -> None:
        with triton.InferenceServerClient(url=address) as client:
            while True:
                with lock:
                    index = next(next_item, None)
                if index is None:
                    return
                try:
                    clip_call(client, *items[index])
                except BaseException as exc:
                    failures.append(exc)
                    return

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"a call failed: {failures[0]}")
    return len(items) / elapsed


def measure_triton_model(checkpoint: str, items: list[tuple[str, np.ndarray]], device: str) -> float:
    """images/s of the Triton model's per-request work, one request after another."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(checkpoint)
    model = CLIPModel.from_pretrained(checkpoint).to(device).eval()
    dim = model.config.projection_dim

    def execute(text: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        text_out = np.zeros((1, dim), dtype=np.float32)
        image_out = np.zeros((1, dim), dtype=np.float32)
        texts = [text.strip()]
        if any(texts):
            tokens = processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(device)
            with torch.no_grad():
                features = model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            text_out = getattr(features, "pooler_output", features).cpu().numpy().astype(np.float32)
        if np.any(pixels != 0):
            inputs = processor(images=pixels, return_tensors="pt").to(device)
            with torch.no_grad():
                features = model.get_image_features(pixel_values=inputs["pixel_values"])
            image_out = getattr(features, "pooler_output", features).cpu().numpy().astype(np.float32)
        return text_out, image_out

    execute(*items[0])  # warm-up, as the server's
    started = time.perf_counter()
    for text, image in items:
        execute(text, np.array(image).astype(np.float32))
    return len(items) / (time.perf_counter() - started)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", "-N", type=int, default=200)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument(
        "--arch", default="vit-b-32", help="synthetic checkpoint's architecture (tiny, vit-b-32, vit-h-14-378)"
    )
    parser.add_argument("--checkpoint", default="", help="a model folder instead of a synthetic one")
    parser.add_argument("--repeat", type=int, default=1, help="alternating passes of each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton.json")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint
    if not checkpoint:
        from clipserve_server.models.synthetic import build_checkpoint

        checkpoint = str(
            build_checkpoint(
                Path(tempfile.mkdtemp(prefix="clipserve-triton-")) / args.arch, arch=args.arch, seed=args.seed
            )
        )
    items = captioned_images(args.images, args.seed)
    runs: list[dict[str, object]] = []
    for round_ in range(args.repeat):
        for name in ("clipserve", "triton-model loop"):
            if name == "clipserve":
                # A fresh server per pass (its caches start empty), started before the load is read.
                proc, address = serve("--model", checkpoint, "--device", args.device)
                try:
                    before = load()
                    rate = measure_clipserve(address, items, args.threads)
                finally:
                    proc.terminate()
                    proc.wait()
            else:
                before = load()
                rate = in_fresh_process(measure_triton_model, checkpoint, items, args.device)
            runs.append({"round": round_, "pass": name, "images_per_s": rate, "load_before": before})
            print(f"round {round_}  {name:18s} {rate:8.1f} images/s   (load before: {before})", flush=True)
    summary = {
        "images": args.images,
        "threads": args.threads,
        "arch": args.checkpoint or args.arch,
        "device": args.device,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
