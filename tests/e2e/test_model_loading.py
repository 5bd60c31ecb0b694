"""A model that cannot be loaded: `clipserve serve` says which and what to do, in a few lines.

Nothing is downloaded: the hub is either switched off (HF_HUB_OFFLINE=1) or pointed at a
closed local port, and HF_HOME is an empty folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cost(18)  # its CPU cost among the files (tests/conftest.py)

HUB_ID = "openai/clip-vit-base-patch32"
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


NO_BACKOFF = """\
# Loaded at the start of the test's server process only (tests/e2e/test_model_loading.py).
try:
    import time as _time
    import types as _types

    import huggingface_hub.utils._http as _http

    _http.time = _types.SimpleNamespace(**{**vars(_time), "sleep": lambda seconds: None})
except Exception:  # another huggingface_hub: the test is only slower
    pass
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Each case's exit code and output; the servers start side by side to save time."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("model-loading")
    empty_cache = root / "hf-home"
    empty_cache.mkdir()
    bert = root / "bert"
    BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(bert)
    offline = {"HF_HOME": str(empty_cache), "HF_HUB_OFFLINE": "1"}
    # The user's case: no network. Connection refused at once, retried by huggingface_hub.
    # Its waits between the attempts (23-63 s in all) are skipped: the attempts and their
    # refusals stay, so the error is the one a user sees, without the wait.
    hook = root / "no-backoff"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_BACKOFF)
    no_network = {
        "HF_HOME": str(empty_cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
    }
    cases = {
        "hub id, no network": ([HUB_ID], no_network),
        "a folder that is not there": ([str(root / "models" / "clip")], offline),
        "a folder with another kind of model": ([str(bert)], offline),
        "hub id, offline, debug": ([HUB_ID, "--log-level", "debug"], offline),
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "clipserve.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--model", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        for name, (args, env) in cases.items()
    }
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in started.items()}
    return {name: (proc.returncode, outputs[name]) for name, proc in started.items()}


@pytest.mark.parametrize(
    "case, model, advice",
    [
        (
            "hub id, no network",
            HUB_ID,
            ["not in the Hugging Face cache", "cannot be reached", "local folder", "HF_HOME"],
        ),
        ("a folder that is not there", "models/clip", ["no such folder"]),
        ("a folder with another kind of model", "bert", ["BertModel", "CLIP-family model", "save_pretrained"]),
    ],
)
def test_one_clear_error_names_the_model_and_what_to_do(runs, case, model, advice):
    code, output = runs[case]
    lines = output.splitlines()
    assert code == 1, output
    assert len(lines) <= 10, output
    assert "Traceback" not in output, output
    [error] = [line for line in lines if " ERROR " in line]
    assert model in error
    for words in advice:
        assert words in error, error
    messages = [_LOG_PREFIX.sub("", line) for line in lines]
    assert len(messages) == len(set(messages)), "a line printed twice:\n" + output


def test_the_traceback_is_there_with_log_level_debug(runs):
    code, output = runs["hub id, offline, debug"]
    assert code == 1
    assert "not in the Hugging Face cache" in output and "HF_HUB_OFFLINE is set" in output
    assert "Traceback" in output
