"""Any text is a query: the server scores odd but valid text exactly as an in-process
transformers forward pass does, and refuses only what cannot be encoded at all."""

from __future__ import annotations

import pytest

import clipserve

ODD_BUT_VALID = {
    "bell, tab and emoji": "émoji 🚗\x07\ttab",
    "other C0 controls": "a dog\x00 on\x1b a\x7f beach",
    "C1 control": "a dog\x85on a beach",
    "zero-width characters": "a\u200bdog\u200c on\u200d a\u2060 beach\ufeff",
    "Arabic (right to left)": "كلب على الشاطئ",
    "Hebrew with a right-to-left override": "\u202eכלב על החוף\u202c",
    "mixed directions": "a dog \u200fكلب\u200e on a beach",
    "tabs and newlines": "a dog\n\ton a beach\r\nat noon",
    "combining marks": "a do\u0301g on a bea\u0308ch",
    "only a control character": "\x07",
    "only a zero-width space": "\u200b",
}


@pytest.fixture(scope="module")
def clip(real_server):
    with clipserve.CLIP(real_server.address, timeout=120) as client:
        yield client


def test_odd_but_valid_queries_score_like_an_in_process_forward_pass(clip, image_host, reference):
    url = image_host.url("img/photo2.png")
    expected = {name: reference(query, image_host.images["photo2.png"]) for name, query in ODD_BUT_VALID.items()}
    results = clip.score_batch(
        [clipserve.SimilarityInput(query, url, query_id=name) for name, query in ODD_BUT_VALID.items()]
    )
    for result in results:
        assert result.error is None, (result.query_id, result.error)
        assert result.score == pytest.approx(expected[result.query_id], abs=reference.tolerance), result.query_id
    # The unary call takes the same path.
    assert clip.score(ODD_BUT_VALID["bell, tab and emoji"], url) == pytest.approx(
        expected["bell, tab and emoji"], abs=reference.tolerance
    )


@pytest.mark.parametrize(
    "query, words", [("", "query is empty"), (" \t\r\n", "only whitespace"), ("\u00a0\u3000\u2003", "only whitespace")]
)
def test_a_query_with_nothing_to_encode_is_refused(clip, image_host, query, words):
    [result] = clip.score_batch([(query, image_host.url("img/photo2.png"))])
    assert (result.score, result.error_code) == (None, "INVALID_ARGUMENT")
    assert words in result.error
