"""Random-weight CLIP checkpoints with a generated tokenizer, for tests, benchmarks and demos.

No network is needed: the config, weights, tokenizer files and processor are all written
locally with ``save_pretrained``, and the result loads with ``from_pretrained`` exactly like a
hub checkpoint. ``--arch vit-b-32`` gives the architecture of openai/clip-vit-base-patch32 and
``--arch vit-h-14-378`` that of apple/DFN5B-CLIP-ViT-H-14-378 (same compute cost as the real
models); ``--arch tiny`` a model that loads in a second and costs next to nothing per image,
also at a real input size (``--image-size 224``).

    python -m clipserve_server.synthetic /tmp/tiny-clip --arch tiny
    python -m clipserve_server.synthetic /tmp/vit-h --arch vit-h-14-378 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

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
    out: str | Path, *, arch: str = "tiny", seed: int = 0, image_size: int | None = None, device: str = "cpu", dtype: str = "float32"
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
        text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, **token_ids)
        # At most 7x7 patches, as ViT-B/32 at 224: cheap at any input size (8-pixel patches at 224
        # would make 784 tokens and cost more per image than the decoding it is there to expose).
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=max(8, size // 7))
        projection_dim = 16
    elif arch == "vit-b-32":
        # openai/clip-vit-base-patch32, layer for layer (49408-token embedding included).
        size = image_size or 224
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77, **token_ids)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=size, patch_size=32)
        projection_dim = 512
    elif arch == "vit-h-14-378":
        # apple/DFN5B-CLIP-ViT-H-14-378 (open_clip ViT-H-14-378-quickgelu): a 32-layer, 1280-wide
        # ViT with 14-pixel patches at 378 (27x27 + 1 tokens), a 24-layer 1024-wide text tower,
        # 1024-d embeddings; quick_gelu and layer-norm eps 1e-5 are the CLIP config's defaults.
        size = image_size or 378
        text = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77, **token_ids)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=size, patch_size=14)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the checkpoint to")
    parser.add_argument("--arch", choices=ARCHS, default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the architecture's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to draw the weights (cuda: much faster for vit-h-14-378)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="how to save the weights")
    args = parser.parse_args(argv)
    print(build_checkpoint(args.out, arch=args.arch, seed=args.seed, image_size=args.image_size, device=args.device, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
