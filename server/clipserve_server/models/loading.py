"""Choosing the backend that loads a model (one module per family, one interface).

- ``fake`` or ``fake:forward_ms=30,image_ms=2,dim=16``: the deterministic stand-in model (tests,
  demos, and benchmarks that simulate accelerator time: a forward pass sleeps ``forward_ms`` per
  batch plus ``image_ms`` per image in it);
- ``open_clip:ARCH`` with ``--pretrained PATH``: one of open_clip's built-in architectures with
  a weights file (``openclip_model``);
- a local folder or hub id, by the files it holds:
  - ``config.json``: a transformers model (``clip_model``: CLIP, SigLIP, SigLIP2). This wins over
    ``open_clip_config.json``: repos that export one model for both libraries
    (laion/CLIP-ViT-L-14-laion2B-s32B-b82K has both configs and both weight files;
    apple/DFN5B-CLIP-ViT-H-14-378 has its open_clip files and a transformers ``pytorch_model.bin``)
    load as the benchmark maker's adapter loads them, through transformers, whose preprocessing
    its scores were made with (DFN5B's open_clip config squashes images instead of cropping);
  - ``open_clip_config.json``: open_clip (``local-dir:`` / ``hf-hub:``);
  - ``modules.json`` naming one sentence-transformers ``CLIPModel`` module: the transformers CLIP
    model in that module's folder (sentence-transformers/clip-ViT-B-32 keeps OpenAI's CLIP in
    ``0_CLIPModel/``);
  - a hub repo with none of these that open_clip's own list of pretrained weights names:
    open_clip, that architecture with those weights
    (laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k holds only
    ``open_clip_pytorch_model.bin``: open_clip knows it as xlm-roberta-base-ViT-B-32, laion5b_s13b_b90k);
  - anything else goes to transformers, whose error then says what is missing.

  A hub id's files are those in the Hugging Face cache, plus the hub's listing when the cache
  alone does not settle it (no cached ``config.json``) and the hub answers; so a cached model
  loads the same way offline, and a repo with only some of its files cached (DFN5B used through
  open_clip before) still goes where the whole repo would send it when the hub can be asked.
- ``--text-model``: a sentence-transformers text model for the texts, the model above for the
  images (``text_tower``).

Whichever it is, its towers then go to the runtime ``--runtime`` picks (``runtimes``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from ..utils.config import ModelSpec, ServerConfig
from .model import EmbeddingModel
from .runtimes import apply_runtime

log = logging.getLogger(__name__)

FAKE_PREFIX = "fake"
OPEN_CLIP_PREFIX = "open_clip:"
_MARKERS = ("config.json", "open_clip_config.json", "modules.json")


def load_model(spec: ModelSpec, config: ServerConfig) -> EmbeddingModel:
    source = spec.source
    if spec.pretrained and not source.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"--pretrained {spec.pretrained} goes with --model open_clip:ARCH, not {source}")
    if source == FAKE_PREFIX or source.startswith(FAKE_PREFIX + ":"):
        model = _fake(source)
    elif source.startswith(OPEN_CLIP_PREFIX):
        if not spec.pretrained:
            raise ValueError(f"--model {source} needs --pretrained PATH: the weights file of that architecture")
        model = _open_clip(source[len(OPEN_CLIP_PREFIX) :], source, config, pretrained=spec.pretrained)
    else:
        model = _by_files(source, config)
    if spec.text_model:
        _require("sentence_transformers", "multilingual", f"--text-model {spec.text_model}")
        from .text_tower import TextTowerModel

        model = TextTowerModel(model, spec.text_model)
    # The towers move to the configured runtime (--runtime) before the warm-up and serving.
    apply_runtime(model, config)
    return model


def _by_files(source: str, config: ServerConfig) -> EmbeddingModel:
    folder = Path(source).expanduser()
    local = folder.is_dir()
    files = {name for name in _MARKERS if (folder / name).is_file()} if local else _hub_files(source)
    if "config.json" in files:
        return _transformers(source, config)
    if "open_clip_config.json" in files:
        return _open_clip(f"local-dir:{folder}" if local else f"hf-hub:{source}", source, config)
    if "modules.json" in files:
        module = _sentence_transformers_clip(folder if local else None, source)
        if module is not None:
            return _transformers(module, config, name=source)
    known = None if local else _open_clip_pretrained(source)
    if known is not None:
        return _open_clip(known[0], source, config, pretrained=known[1])
    return _transformers(source, config)


def _hub_files(repo_id: str) -> set[str]:
    """Which of the marker files the hub repo ``repo_id`` has, as far as can be known here."""
    from huggingface_hub import constants, list_repo_files, try_to_load_from_cache

    try:
        cached = {name for name in _MARKERS if isinstance(try_to_load_from_cache(repo_id, name), str)}
    except Exception:  # not a valid repo id: transformers will say so
        return set()
    if "config.json" in cached or constants.HF_HUB_OFFLINE:
        return cached
    try:
        return cached | (set(list_repo_files(repo_id)) & set(_MARKERS))
    except Exception as exc:  # no network, no such repo, gated: the cache is all there is
        log.debug("could not list the files of %s on the hub (%s); going by the cache", repo_id, exc)
        return cached


def _open_clip_pretrained(repo_id: str) -> tuple[str, str] | None:
    """(architecture, tag) of the weights that open_clip's pretrained list keeps in the hub repo
    ``repo_id``; the ``-quickgelu`` architecture where both are listed (as those weights need)."""
    try:
        import open_clip
    except ImportError:
        return None
    found = [
        (arch, tag)
        for arch, tag in open_clip.list_pretrained()
        if open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "").rstrip("/") == repo_id
    ]
    quick_gelu = [(arch, tag) for arch, tag in found if arch.endswith("-quickgelu")]
    return (quick_gelu or found or [None])[0]


def _sentence_transformers_clip(folder: Path | None, repo_id: str) -> str | None:
    """The local folder of the transformers CLIP model inside a sentence-transformers CLIP model
    (its only module, a ``CLIPModel``), or None for any other sentence-transformers model."""
    if folder is None:
        from huggingface_hub import hf_hub_download

        modules = json.loads(Path(hf_hub_download(repo_id, "modules.json")).read_text())
    else:
        modules = json.loads((folder / "modules.json").read_text())
    if len(modules) != 1 or not modules[0].get("type", "").endswith(".CLIPModel"):
        return None
    path = modules[0]["path"]
    if folder is not None:
        return str(folder / path)
    from huggingface_hub import snapshot_download

    return str(Path(snapshot_download(repo_id, allow_patterns=[f"{path}/*"])) / path)


def _transformers(source: str, config: ServerConfig, name: str | None = None) -> EmbeddingModel:
    from .clip_model import HFClipModel

    return HFClipModel(
        source,
        device=config.device,
        dtype=config.dtype,
        use_safetensors=config.use_safetensors,
        compile=config.compile,
        name=name,
    )


def _open_clip(name: str, source: str, config: ServerConfig, pretrained: str = "") -> EmbeddingModel:
    _require("open_clip", "open_clip", f"{source} (an open_clip model)")
    from .openclip_model import OpenClipModel

    return OpenClipModel(
        name, model_id=source, pretrained=pretrained, device=config.device, dtype=config.dtype, compile=config.compile
    )


def _require(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"{what} needs the {module} package, which is not installed: pip install 'clipserve[server,{extra}]'"
        )


def _fake(source: str) -> EmbeddingModel:
    from .fake_model import FakeModel

    options: dict[str, float] = {}
    for part in filter(None, source.partition(":")[2].split(",")):
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--model {source}: {part!r} is not key=number") from None
    unknown = set(options) - {"forward_ms", "image_ms", "dim", "logit_scale"}
    if unknown:
        raise ValueError(
            f"--model {source}: unknown option(s) {', '.join(sorted(unknown))} (forward_ms, image_ms, dim, logit_scale)"
        )
    return FakeModel(
        dim=int(options.get("dim", 16)),
        logit_scale=options.get("logit_scale", 100.0),
        forward_delay_s=options.get("forward_ms", 0.0) / 1000.0,
        image_delay_s=options.get("image_ms", 0.0) / 1000.0,
    )
