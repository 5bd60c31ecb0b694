"""A synthetic scored benchmark for the report page's tests, its screenshot and its benchmark:
queries with candidates whose relevant images CLIP mostly scores higher, images recurring
across queries, and one planted mislabelled pair (labelled relevant, scored lowest of all)."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SCENES = [
    "smoke plume rising over a forested ridge",
    "clear daytime mountain view with no smoke",
    "night camera view with a distant glow",
    "fog in a valley at dawn",
    "flames visible on a hillside",
    "low clouds over a lake",
    "haze over the city skyline",
    "wildfire smoke seen from a highway",
    "snow on the peaks under a blue sky",
    "sunset over dry grassland",
    "rain on the camera lens",
    "dust blowing across a desert road",
]


@dataclass(frozen=True)
class Benchmark:
    scored: Path
    images: Path
    rows: list[dict]
    planted: tuple[str, str]  # (query id, image id) of the mislabelled pair


def picture(seed: int, size: tuple[int, int] = (240, 180)) -> bytes:
    """A small landscape-like JPEG: a sky, a ridge, and for some seeds a plume."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    top = (rng.randint(60, 140), rng.randint(110, 180), rng.randint(170, 235))
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=tuple(int(c * (1 - 0.35 * t)) for c in top))
    ground = (rng.randint(40, 110), rng.randint(70, 130), rng.randint(30, 80))
    points = (
        [(0, height)]
        + [(x, int(height * (0.45 + 0.25 * rng.random()))) for x in range(0, width + 40, 40)]
        + [(width, height)]
    )
    draw.polygon(points, fill=ground)
    if seed % 3 == 0:
        x = rng.randint(40, width - 40)
        for r in range(6, 40, 4):
            grey = 170 + r
            draw.ellipse(
                [x - r + r // 2, height * 0.55 - r * 2.2, x + r + r // 2, height * 0.55 - r * 0.2],
                fill=(grey, grey, grey),
            )
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def make_benchmark(
    folder: Path, *, queries: int = 12, per_query: int = 10, pool: int = 30, seed: int = 7, write_images: bool = True
) -> Benchmark:
    """``folder``/scored.jsonl (score-file's output) and images.jsonl (local paths).

    Query 0's scores are rounded to whole numbers (ties); query 1 has no relevant image; query 2
    has a row whose pair failed (score null); query 3 holds the planted pair."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image_rows = []
    for i in range(pool):
        path = folder / "images" / f"im{i:04d}.jpg"
        if write_images:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(picture(i))
        image_rows.append({"image_id": f"im{i:04d}", "image_url": str(path), "license": "CC0"})
    rows = []
    for q in range(queries):
        text = SCENES[q % len(SCENES)] + (f" #{q // len(SCENES)}" if q >= len(SCENES) else "")
        if q == 5:
            text = 'a road sign reading "</script><b>EXIT</b>"'  # shown as text, never as markup
        chosen = rng.sample(range(pool), per_query)
        for n, i in enumerate(chosen):
            relevant = 0 if q == 1 else int(rng.random() < 0.35 or n == 0)
            score = rng.gauss(26.0 if relevant else 21.0, 2.0)
            if q == 0:
                score = float(round(score / 2) * 2)
            row = {
                "query_id": f"q{q:04d}",
                "query_text": text,
                "image_id": f"im{i:04d}",
                "relevance_label": relevant,
                "clip_score": score,
            }
            rows.append(row)
    rows[2 * per_query + 1]["clip_score"] = None
    planted = rows[3 * per_query + per_query - 1]
    planted.update(relevance_label=1, clip_score=8.0)
    scored = folder / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    images = folder / "images.jsonl"
    images.write_text("".join(json.dumps(r) + "\n" for r in image_rows), encoding="utf-8")
    return Benchmark(scored, images, rows, (planted["query_id"], planted["image_id"]))
