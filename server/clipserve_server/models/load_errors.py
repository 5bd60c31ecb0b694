"""Why ``--model`` could not be loaded, said in one line that names the model and what to do.

transformers reports a missing model as a chain of exceptions from huggingface_hub and httpx,
ending in advice about its own offline mode; a server operator needs to know which of three
things went wrong: the folder is not there, the folder is not a CLIP model, or the hub id is
neither cached nor downloadable from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _looks_like_a_path(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything else can only have meant a folder.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def explain(model: str, error: BaseException) -> str:
    """One message for ``error``, raised while loading ``model`` (a hub id or a folder)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    path = Path(model).expanduser()
    if path.is_dir():
        return (
            f"cannot load the model in {model}: "
            f"{_first_line(error).rstrip('.')}. --model needs a CLIP-family model folder: "
            "a transformers one (config.json, weights, "
            "tokenizer and preprocessor files, as save_pretrained writes them) "
            "or an open_clip one (open_clip_config.json and open_clip_model.safetensors)"
        )
    if path.exists():
        return f"cannot load the model {model}: it is a file. Give --model the folder that holds the model's files"
    if _looks_like_a_path(model):
        return (
            f"cannot load the model {model}: there is no such folder. Give --model a model folder, "
            "or a hub id such as openai/clip-vit-base-patch32"
        )
    chain = list(_chain(error))
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (
            f"cannot load the model {model}: it is gated on the Hugging Face hub; "
            "accept its terms there and set HF_TOKEN, or pass a local folder"
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (
            f"cannot load the model {model}: the Hugging Face hub has no such model (or it is private: "
            "set HF_TOKEN). Check the id, or pass a local folder"
        )
    if any(isinstance(e, HFValidationError) for e in chain):
        return (
            f"cannot load the model {model}: "
            "it is neither a folder nor a hub id (org/name). Give --model a model folder or a hub id"
        )
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"the hub cannot be reached ({constants.ENDPOINT}: {_first_line(chain[-1])})"
        )
        return (
            f"cannot load the model {model}: it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
            f"Pass a local folder (--model /path/to/model), or set HF_HOME to a cache that has it "
            f"(`hf download {model}` fills one on a machine with network)"
        )
    return f"cannot load the model {model}: {type(error).__name__}: {_first_line(error)}"
