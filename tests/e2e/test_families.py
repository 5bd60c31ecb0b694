"""Model families through the real server: open_clip, a separate text tower, SigLIP and SigLIP2.

Each family's model is built offline with random weights, in the layout its hub checkpoints
have, and served by `clipserve serve`; its scores must match the family's own library run in
this process (open_clip's forward, sentence-transformers' encode, transformers' logits_per_image)
within 1e-4 * exp(logit_scale). The servers of this module start side by side.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipserve
from clipserve_server.models import synthetic
from clipserve_server.images.preprocess import SplitTransformPipeline, build_transform_pipeline

from ..conftest import ServerProcess
from ..helpers import hub_cache, make_image

pytestmark = pytest.mark.cost(20)  # its CPU cost among the files (tests/conftest.py)

QUERIES = ["a dog on the beach", "A small red car", "photo of a boat, in the sun", "ünïcode and 🚗"]
# The issue asks for a random-weight ViT-B-32. Measured here, it added ~23 s to this module (it is
# built, loaded three times in the server and once in the test, and run on 2 busy cores), so the
# folder and hub-id forms serve a tiny model_cfg in the same hub layout, which goes through the
# very same loading path; the built-in-architecture form needs one of open_clip's own
# architectures, and serves the smallest, ViT-S-32-alt (43M parameters, ~2 s in all).
OPEN_CLIP_ARCH = "ViT-S-32-alt"
HUB_ID = "clipserve-tests/tiny-open-clip"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("family-images")
    sizes = [(64, 48, "PNG"), (40, 90, "JPEG"), (300, 200, "JPEG"), (17, 17, "PNG")]
    paths = []
    for i, (width, height, fmt) in enumerate(sizes):
        paths.append(folder / f"im{i}.{fmt.lower()}")
        paths[-1].write_bytes(make_image(width, height, seed=500 + i, fmt=fmt))
    return paths


def rgb(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(path.read_bytes())).convert("RGB")


def st_clip_folder(out: Path, clip_checkpoint: Path) -> Path:
    """A sentence-transformers CLIP model as sentence-transformers/clip-ViT-B-32 is on the hub:
    the transformers CLIP model in 0_CLIPModel/, and modules.json naming it."""
    shutil.copytree(clip_checkpoint, out / "0_CLIPModel")
    module = {"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}
    (out / "modules.json").write_text(json.dumps([module]))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    open_clip_folder = synthetic.build_open_clip_checkpoint(root / "open-clip", arch="tiny", seed=7)
    built = {
        "open_clip": open_clip_folder,
        "open_clip_arch": synthetic.build_open_clip_checkpoint(root / "open-clip-arch", arch=OPEN_CLIP_ARCH, seed=7),
        "hub_cache": hub_cache(root / "hf-cache", HUB_ID, open_clip_folder),
        "text_tower": synthetic.build_text_tower(root / "text-tower", dim=16, seed=8),
        "st_clip": st_clip_folder(root / "st-clip", tiny_checkpoint),
    }
    for variant in synthetic.SIGLIP_VARIANTS:
        built[variant] = synthetic.build_siglip_checkpoint(root / variant, variant=variant, seed=9)
    return built


@pytest.fixture(scope="module")
def servers(checkpoints: dict[str, Path], tiny_checkpoint: Path) -> Iterator[dict[str, ServerProcess]]:
    weights = checkpoints["open_clip_arch"] / "open_clip_model.safetensors"
    # Images are preprocessed in a decode worker process here: each backend's preprocessing
    # must reach it pickled.
    in_a_worker = ["--decode-pool", "processes", "--decode-workers", "1"]
    args = {
        # A folder, the same files as a hub id found in the cache with the hub switched off, and
        # a built-in architecture with a weights file.
        "open_clip": (
            ["--model", f"folder={checkpoints['open_clip']}", "--model", f"hub={HUB_ID}"]
            + ["--model", f"arch=open_clip:{OPEN_CLIP_ARCH}", "--pretrained", f"arch={weights}", *in_a_worker],
            {"HF_HUB_CACHE": str(checkpoints["hub_cache"]), "HF_HUB_OFFLINE": "1"},
        ),
        # One text tower paired with the same CLIP image tower two ways: a transformers folder,
        # and a sentence-transformers CLIP folder.
        "text_tower": (
            ["--model", f"clip={tiny_checkpoint}", "--text-model", f"clip={checkpoints['text_tower']}"]
            + ["--model", f"st={checkpoints['st_clip']}", "--text-model", f"st={checkpoints['text_tower']}"],
            {},
        ),
        "siglip": (
            [arg for variant in synthetic.SIGLIP_VARIANTS for arg in ("--model", f"{variant}={checkpoints[variant]}")]
            + in_a_worker,
            {},
        ),
    }
    started = {name: ServerProcess(flags, env, wait=False) for name, (flags, env) in args.items()}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():  # all at once: each takes a moment to shut down
            server.proc.send_signal(signal.SIGTERM)
        for server in started.values():
            server.proc.wait(timeout=60)
        codes = {name: server.terminate() for name, server in started.items()}
    assert all(code == 0 for code in codes.values()), {
        name: "".join(server.log) for name, server in started.items() if codes[name]
    }


def served_scores(
    server: ServerProcess, model: str, images: list[Path]
) -> tuple[np.ndarray, clipserve.v1.scorer_pb2.ModelInfo]:
    """Every query against every image, scored by ``model`` on ``server``: (queries, images).

    Served at the default runtime (auto): every family's towers convert to OpenVINO on the CPU
    and pass the parity check at load (models/runtimes/), so both run there."""
    with clipserve.CLIP(server.address, timeout=120, model=model) as clip:
        results = clip.score_batch([(query, str(image)) for query in QUERIES for image in images])
        info = clip.model_info()
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    assert (info.image_runtime, info.text_runtime) == ("openvino", "openvino"), (model, "".join(server.log))
    return np.array([r.score for r in results]).reshape(len(QUERIES), len(images)), info


@pytest.mark.parametrize(
    "served, checkpoint, dim",
    [("folder", "open_clip", 16), ("hub", "open_clip", 16), ("arch", "open_clip_arch", 256)],
)
def test_open_clip_scores_are_open_clips_own_forward(servers, checkpoints, images, served, checkpoint, dim):
    import open_clip
    import torch

    source = f"local-dir:{checkpoints[checkpoint]}"
    model, _, preprocess = open_clip.create_model_and_transforms(source)
    with torch.no_grad():
        image_features, text_features, scale = model.eval()(
            torch.stack([preprocess(rgb(p)) for p in images]), open_clip.get_tokenizer(source)(QUERIES)
        )[:3]
    expected = (scale * text_features @ image_features.T).numpy()
    # The server resizes and crops each image to uint8 and normalises per batch: bit for bit
    # what open_clip's transform gives.
    pipeline = build_transform_pipeline(preprocess, tuple(model.visual.image_size))
    assert isinstance(pipeline, SplitTransformPipeline)
    for path in images:
        assert torch.equal(
            pipeline.normalize(torch.from_numpy(pipeline(rgb(path)).copy()).unsqueeze(0))[0], preprocess(rgb(path))
        )
    got, info = served_scores(servers["open_clip"], served, images)
    assert np.abs(got - expected).max() <= 1e-4 * float(scale), (got, expected)
    assert (info.backend, info.embedding_dim, info.logit_bias, info.max_text_tokens) == ("open_clip", dim, 0.0, 77)
    assert info.logit_scale == pytest.approx(float(scale), rel=1e-6)


def test_a_text_tower_scores_with_the_clip_models_image_tower(servers, checkpoints, tiny_checkpoint, images):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    # The model card's way: the multilingual text model for texts, the CLIP model for images.
    text_model = SentenceTransformer(str(checkpoints["text_tower"]), device="cpu")
    image_model = SentenceTransformer(str(checkpoints["st_clip"]), device="cpu")
    texts = text_model.encode(QUERIES)
    pictures = image_model.encode([rgb(p) for p in images])
    scale = float(AutoModel.from_pretrained(tiny_checkpoint).logit_scale.detach().exp())
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    expected = scale * unit(texts) @ unit(pictures).T
    for name in ("clip", "st"):
        got, info = served_scores(servers["text_tower"], name, images)
        assert np.abs(got - expected).max() <= 1e-4 * scale, (name, got, expected)
        assert (info.backend, info.text_model_id, info.max_text_tokens) == (
            "transformers+sentence_transformers",
            str(checkpoints["text_tower"]),
            128,
        )
    assert info.model_id == str(checkpoints["st_clip"])
    with clipserve.CLIP(servers["text_tower"].address, model="st") as clip:
        [raw] = clip.embed_texts([QUERIES[0]], raw=True)
    assert np.allclose(raw.embedding, texts[0], rtol=1e-4, atol=1e-5), "raw text vectors are the text model's own"


@pytest.mark.parametrize("variant", synthetic.SIGLIP_VARIANTS)
def test_siglip_scores_are_logits_per_image_with_the_bias(servers, checkpoints, images, variant):
    import torch
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(checkpoints[variant]).eval()
    processor = AutoProcessor.from_pretrained(checkpoints[variant])
    # The processors' documented call: SigLIP pads texts to the full length when asked,
    # Siglip2Processor always does.
    padding = {} if variant == "siglip2-naflex" else {"padding": "max_length"}
    inputs = processor(text=QUERIES, images=[rgb(p) for p in images], return_tensors="pt", **padding)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.numpy().T
    scale, bias = float(model.logit_scale.detach().exp()), float(model.logit_bias.detach())
    got, info = served_scores(servers["siglip"], variant, images)
    assert np.abs(got - expected).max() <= 1e-4 * scale, (got, expected)
    assert (info.logit_scale, info.logit_bias) == (pytest.approx(scale), pytest.approx(bias)) and bias < 0


def test_the_memory_check_counts_the_weights_each_backend_loads(checkpoints, tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    from clipserve_server.utils.config import ServerConfig, model_specs
    from clipserve_server.models.memory import ModelsTooLarge, check_fits, weight_bytes

    def parameters(path: Path) -> int:
        with safe_open(str(path), "pt") as weights:
            return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())

    arch_weights = checkpoints["open_clip_arch"] / "open_clip_model.safetensors"
    assert weight_bytes(str(arch_weights), "float16") == 2 * parameters(arch_weights)
    # A repo with the model exported for both libraries (apple/DFN5B-CLIP-ViT-H-14-378) loads
    # through transformers: its weights count once.
    both = shutil.copytree(tiny_checkpoint, tmp_path / "both")
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        shutil.copy(checkpoints["open_clip"] / name, both)
    assert weight_bytes(str(both), "float32") == 4 * parameters(tiny_checkpoint / "model.safetensors")
    assert weight_bytes(str(checkpoints["open_clip"]), "float32") == 4 * parameters(
        checkpoints["open_clip"] / "open_clip_model.safetensors"
    )
    # open_clip:ARCH is an architecture: its weights are the --pretrained file.
    specs = model_specs([f"open_clip:{OPEN_CLIP_ARCH}"], pretrained=[str(arch_weights)])
    with pytest.raises(ModelsTooLarge) as refused:
        check_fits(specs, ServerConfig(model=("fake",), memory_budget_gb=0.01, device="cpu"))
    assert f"({arch_weights}): 0.16 GiB" in str(refused.value) and "not on disk" not in str(refused.value)
