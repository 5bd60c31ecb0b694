"""AsyncCLIP: the same behaviour as CLIP, for asyncio programs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import clipserve

from ..helpers import make_image


def test_async_client_scores_like_the_sync_client(fake_server, image_host, tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(make_image(seed=21, fmt="JPEG"))
    inputs = [
        clipserve.SimilarityInput(f"q{i % 4}", image_host.url(f"img/photo{i % 6}.png"), query_id=str(i))
        for i in range(120)
    ]
    inputs.append(clipserve.SimilarityInput("local", str(path), query_id="local"))
    inputs.append(clipserve.SimilarityInput("broken", image_host.url("img/not-an-image.png"), query_id="broken"))

    async def main():
        async with clipserve.AsyncCLIP(fake_server.address, max_in_flight=8) as clip:
            single = await clip.score("q0", image_host.url("img/photo0.png"))
            batch, other = await asyncio.gather(clip.score_batch(inputs), clip.score_batch(inputs[:5]))
            info = await clip.model_info()
            with pytest.raises(clipserve.ClipServeError) as error:
                await clip.score("q", image_host.url("status/404"))
            return single, batch, other, info, error.value

    single, batch, other, info, error = asyncio.run(main())
    with clipserve.CLIP(fake_server.address) as sync:
        expected = sync.score_batch(inputs)
    assert [r.query_id for r in batch] == [x.query_id for x in inputs]
    assert [(r.score, r.error_code) for r in batch] == [(r.score, r.error_code) for r in expected]
    assert batch[0].score == pytest.approx(single)
    assert batch[-1].error_code == "INVALID_ARGUMENT" and batch[-2].error is None
    assert len(other) == 5 and info.model_id == "fake"
    assert error.code == grpc.StatusCode.NOT_FOUND
