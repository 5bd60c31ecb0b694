"""The scoring engine on its own (the fake model, no server): what a pair's score is made of,
and that each text and image is encoded once however often it is asked for."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clipserve_server.inference.promises import awaited
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.utils.config import ServerConfig
from clipserve_server.utils.domain import EmbedItem, ImageSource, ScoreItem

from ..helpers import make_image, running_engine

CONFIG = ServerConfig(model=("fake",), decode_workers=1, decode_pool="threads", max_batch_delay_ms=1)


def test_a_score_is_the_scaled_cosine_of_the_two_embeddings():
    image = ImageSource(data=make_image(12, 10, seed=3))

    async def main():
        async with running_engine(FakeModel(), CONFIG) as engine:
            score = await awaited(engine.score(ScoreItem("a dog", image), wait=True))
            text = await awaited(engine.embed(EmbedItem(text="a dog"), wait=True))
            picture = await awaited(engine.embed(EmbedItem(image=image), wait=True))
            return score, text, picture, engine.description.logit_scale

    score, text, picture, scale = asyncio.run(main())
    assert score == pytest.approx(scale * float(np.dot(text, picture)), rel=1e-5)


def test_each_text_and_image_is_encoded_once():
    model = FakeModel()
    images = [ImageSource(data=make_image(8, 8, seed=seed)) for seed in range(3)]

    async def main():
        async with running_engine(model, CONFIG) as engine:
            pairs = [ScoreItem(query, image) for query in ("a", "b") for image in images] * 2
            await asyncio.gather(*(awaited(engine.score(pair, wait=True)) for pair in pairs))
            return engine.cache_stats()

    text_cache, image_cache = asyncio.run(main())
    assert sorted(model.encoded_texts) == ["a", "b"] and model.encoded_images == 3
    assert (text_cache.entries, image_cache.entries) == (2, 3)


def test_without_the_cache_nothing_is_kept():
    async def main():
        async with running_engine(FakeModel(), ServerConfig(model=("fake",), cache=False, decode_workers=1)) as engine:
            await awaited(engine.score(ScoreItem("a", ImageSource(data=make_image(8, 8))), wait=True))
            return engine.cache_stats()

    text_cache, image_cache = asyncio.run(main())
    assert (text_cache.capacity, text_cache.entries, image_cache.capacity, image_cache.entries) == (0, 0, 0, 0)
