"""Random-weight CLIP checkpoints with a generated tokenizer, for tests, benchmarks and demos.

No network is needed: the config, weights, tokenizer files and processor are all written
locally with ``save_pretrained``, and the result loads with ``from_pretrained`` exactly like a
hub checkpoint. ``--arch vit-b-32`` gives the architecture of openai/clip-vit-base-patch32 and
``--arch vit-h-14-378`` that of apple/DFN5B-CLIP-ViT-H-14-378 (same compute cost as the real
models); ``--arch tiny`` a model that loads in a second and costs next to nothing per image,
also at a real input size (``--image-size 224``).

The other families, tiny, in the layout their hub checkpoints have (``--family``): an open_clip
checkpoint (``open_clip_config.json`` + ``open_clip_model.safetensors``), SigLIP, SigLIP2 at a
fixed resolution and SigLIP2 NaFlex (transformers), and a sentence-transformers text tower for a
CLIP model's embedding space (``build_text_tower``).

    python -m clipserve_server.models.synthetic /tmp/tiny-clip --arch tiny
    python -m clipserve_server.models.synthetic /tmp/vit-h --arch vit-h-14-378 --device cuda --dtype float16
    python -m clipserve_server.models.synthetic /tmp/tiny-siglip2 --family siglip2-naflex
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer_files(folder: Path) -> tuple[Path, Path, int]:
    """A small byte-level BPE vocabulary in CLIP's format: every byte, every byte at a word's
    end, a few merges of common English pairs, and the two special tokens."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "og", "do", "ca"):
        merges.append((pair[0], pair[1]))
        vocab.append(pair)
    vocab.extend(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file, len(vocab)


ARCHS = ("tiny", "vit-b-32", "vit-h-14-378")


def build_checkpoint(
    out: str | Path,
    *,
    arch: str = "tiny",
    seed: int = 0,
    image_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight CLIPModel + CLIPProcessor to ``out`` and return the folder.

    ``device``: where the weights are drawn (a GPU draws ViT-H's billion in a second, a CPU
    takes minutes); ``dtype``: how they are saved (float16 halves ViT-H's 4 GB)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file, vocab_size = write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    token_ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    if arch == "tiny":
        size = image_size or 32
        text = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            **token_ids,
        )
        # At most 7x7 patches, as ViT-B/32 at 224: cheap at any input size (8-pixel patches at 224
        # would make 784 tokens and cost more per image than the decoding it is there to expose).
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=size,
            patch_size=max(8, size // 7),
        )
        projection_dim = 16
    elif arch == "vit-b-32":
        # openai/clip-vit-base-patch32, layer for layer (49408-token embedding included).
        size = image_size or 224
        text = dict(
            vocab_size=49408,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            **token_ids,
        )
        vision = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=size,
            patch_size=32,
        )
        projection_dim = 512
    elif arch == "vit-h-14-378":
        # apple/DFN5B-CLIP-ViT-H-14-378 (open_clip ViT-H-14-378-quickgelu): a 32-layer, 1280-wide
        # ViT with 14-pixel patches at 378 (27x27 + 1 tokens), a 24-layer 1024-wide text tower,
        # 1024-d embeddings; quick_gelu and layer-norm eps 1e-5 are the CLIP config's defaults.
        size = image_size or 378
        text = dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            **token_ids,
        )
        vision = dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=size,
            patch_size=14,
        )
        projection_dim = 1024
    else:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with torch.device(device):
        model = CLIPModel(config).eval()
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


# Words the generated tokenizers know whole; anything else is spelled out letter by letter.
_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "and",
    "with",
    "dog",
    "cat",
    "car",
    "red",
    "small",
    "boat",
    "beach",
    "photo",
    "picture",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
_WORD_START = "\u2581"  # SentencePiece's mark for the start of a word


def build_open_clip_checkpoint(out: str | Path, *, arch: str = "tiny", seed: int = 0) -> Path:
    """A random-weight open_clip model in the hub layout (``open_clip_config.json`` with its
    ``model_cfg`` and ``preprocess_cfg``, ``open_clip_model.safetensors``), made by
    ``open_clip.create_model(..., pretrained=None)``. ``arch``: an open_clip architecture
    (``ViT-B-32``), or ``tiny``: open_clip's CLIP at 2 layers of 32 wide, 32-pixel images."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "tiny":
        model_cfg = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }
        (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        model = open_clip.create_model(f"local-dir:{out}")
    else:
        model_cfg = open_clip.get_model_config(arch)
        model = open_clip.create_model(arch, pretrained=None)
    config = {"model_cfg": model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
        str(out / "open_clip_model.safetensors"),
    )
    return out


SIGLIP_VARIANTS = ("siglip", "siglip2", "siglip2-naflex")


def build_siglip_checkpoint(out: str | Path, *, variant: str = "siglip", seed: int = 0) -> Path:
    """A random-weight sigmoid-trained checkpoint with a generated tokenizer, as on the hub:

    - ``siglip``: ``SiglipModel``, a SentencePiece-style unigram tokenizer (lower-cased, ``</s>``
      at the end, padded with ``</s>``; input ids only), ``SiglipImageProcessor`` (32x32);
    - ``siglip2``: SigLIP2 at a fixed resolution, which is a ``SiglipModel`` with a Gemma BPE
      tokenizer (google/siglip2-base-patch16-224 and its siblings);
    - ``siglip2-naflex``: ``Siglip2Model`` with ``Siglip2Tokenizer`` and ``Siglip2ImageProcessor``,
      which resizes each image to its own grid of 16-pixel patches, at most 256 (the defaults
      that ``Siglip2Processor`` passes whatever its image processor's config says).
    """
    import torch
    from transformers import (
        GemmaTokenizer,
        PreTrainedTokenizerFast,
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        Siglip2Processor,
        Siglip2Tokenizer,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    if variant not in SIGLIP_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(SIGLIP_VARIANTS)}")
    out = Path(out)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if variant == "siglip":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_unigram_tokenizer(),
            eos_token="</s>",
            pad_token="</s>",
            unk_token="<unk>",
            model_max_length=64,
            model_input_names=["input_ids"],
        )
    else:
        vocab, merges = _bpe_vocabulary()
        kind = Siglip2Tokenizer if variant == "siglip2-naflex" else GemmaTokenizer
        tokenizer = kind(vocab=vocab, merges=merges, model_max_length=64)
    text = dict(
        tiny,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if variant == "siglip2-naflex":
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=dict(tiny, patch_size=16, num_patches=256)))
        processor = Siglip2Processor(
            image_processor=Siglip2ImageProcessor(patch_size=16, max_num_patches=256), tokenizer=tokenizer
        )
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(tiny, image_size=32, patch_size=8)))
        processor = SiglipProcessor(
            image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
        )
    with torch.no_grad():
        # Random init gives a scale of 1 and a bias of 0, under which a bias left out would go
        # unnoticed; trained SigLIPs have a scale near 100 and a clearly negative bias.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.5)
    model.eval().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _unigram_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    pieces = [_WORD_START + word for word in _WORDS] + [_WORD_START] + list(_LETTERS)
    # Longer pieces score higher, so that whole words win over their letters.
    tokenizer = Tokenizer(
        models.Unigram(
            [(token, 0.0) for token in specials] + [(piece, -10.0 / len(piece)) for piece in pieces], unk_id=2
        )
    )
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def _bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's special tokens, every letter with and without the word-start mark, and the
    merges that attach the mark to a letter."""
    tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        _WORD_START,
        *_LETTERS,
        *(_WORD_START + c for c in _LETTERS),
    ]
    return {token: i for i, token in enumerate(tokens)}, [(_WORD_START, c) for c in _LETTERS]


def build_text_tower(out: str | Path, *, dim: int = 16, seed: int = 0) -> Path:
    """A random-weight sentence-transformers text model in the layout of
    sentence-transformers/clip-ViT-B-32-multilingual-v1, tiny: a 2-layer DistilBERT with a
    WordPiece vocabulary, mean pooling, and a dense layer (no bias, identity activation) into
    a ``dim``-d CLIP embedding space."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        encoder = Path(scratch) / "encoder"
        encoder.mkdir()
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *_LETTERS, *(f"##{c}" for c in _LETTERS)]
        (encoder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        DistilBertTokenizer(str(encoder / "vocab.txt")).save_pretrained(encoder)
        torch.manual_seed(seed)
        config = DistilBertConfig(
            vocab_size=len(vocab), dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=128
        )
        DistilBertModel(config).save_pretrained(encoder, safe_serialization=True)
        modules = [
            Transformer(str(encoder), max_seq_length=128),
            Pooling(32, "mean"),
            Dense(32, dim, bias=False, activation_function=torch.nn.Identity()),
        ]
        SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


FAMILIES = ("clip", "open_clip", *SIGLIP_VARIANTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the checkpoint to")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="clip",
        help="clip: transformers CLIP (--arch sets its size); the others are tiny",
    )
    parser.add_argument("--arch", choices=ARCHS, default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the architecture's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="where to draw the weights (cuda: much faster for vit-h-14-378)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="how to save the weights"
    )
    args = parser.parse_args(argv)
    if args.family == "open_clip":
        print(build_open_clip_checkpoint(args.out, seed=args.seed))
    elif args.family in SIGLIP_VARIANTS:
        print(build_siglip_checkpoint(args.out, variant=args.family, seed=args.seed))
    else:
        print(
            build_checkpoint(
                args.out,
                arch=args.arch,
                seed=args.seed,
                image_size=args.image_size,
                device=args.device,
                dtype=args.dtype,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
