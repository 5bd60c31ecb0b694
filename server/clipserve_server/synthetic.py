"""Random-weight CLIP checkpoints with a generated tokenizer, for tests, benchmarks and demos.

No network is needed: the config, weights, tokenizer files and processor are all written
locally with ``save_pretrained``, and the result loads with ``from_pretrained`` exactly like a
hub checkpoint. ``--arch vit-b-32`` gives the architecture of openai/clip-vit-base-patch32
(same compute cost as the real model); ``--arch tiny`` a model that loads in a second.

    python -m clipserve_server.synthetic /tmp/tiny-clip --arch tiny
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


def build_checkpoint(out: str | Path, *, arch: str = "tiny", seed: int = 0, image_size: int | None = None) -> Path:
    """Write a random-weight CLIPModel + CLIPProcessor to ``out`` and return the folder."""
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
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=8)
        projection_dim = 16
    elif arch == "vit-b-32":
        # openai/clip-vit-base-patch32, layer for layer (49408-token embedding included).
        size = image_size or 224
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77, **token_ids)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=size, patch_size=32)
        projection_dim = 512
    else:
        raise ValueError(f"unknown arch {arch!r}: expected 'tiny' or 'vit-b-32'")
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the checkpoint to")
    parser.add_argument("--arch", choices=("tiny", "vit-b-32"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_checkpoint(args.out, arch=args.arch, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
