"""What CI checks besides behaviour (docs/operations-checks.md): lint, the client SDK's types,
the Dockerfile, and every manifest under deploy/ against its schema. All offline."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import clipserve

from .conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# Kubernetes versions the manifests must be valid for: the oldest with every field they use
# (native gRPC probes are GA from 1.27) that kubernetes-validate still bundles, and its newest.
_KUBERNETES_VERSIONS = ("1.29", "latest")


def _run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=ROOT, capture_output=True, text=True, timeout=280)


def _report(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def _tool(name: str) -> Path:
    """A console script the dev extra installs (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / name
    found = beside if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return Path(found)


def test_ruff_finds_nothing():
    """`ruff check` with the rule set in pyproject.toml ([tool.ruff]) is clean."""
    done = _run(sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise")
    assert done.returncode == 0, _report(done)


def test_the_client_sdk_type_checks():
    """mypy, as configured in pyproject.toml ([tool.mypy]), finds nothing in client/clipserve."""
    # Its cache (.mypy_cache/, ignored by git) makes a second run ~1 s instead of ~15.
    done = _run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, _report(done)


def test_everything_the_sdk_exports_is_type_checked_strictly():
    """Every module that defines a name of ``clipserve.__all__`` (base classes included) is
    among the modules [tool.mypy] holds to the strict settings; a new public module must be."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    strict = next(o for o in config["overrides"] if o.get("disallow_untyped_defs"))
    defining = set()
    for name in clipserve.__all__:
        obj = getattr(clipserve, name)
        for part in inspect.getmro(obj) if inspect.isclass(obj) else (obj,):
            module = getattr(part, "__module__", None)
            if module and module.split(".")[0] == "clipserve":
                defining.add(module)
    assert defining - set(strict["module"]) == set()


def test_hadolint_finds_nothing_in_the_dockerfile():
    """hadolint at its default threshold (every finding, info included) passes the Dockerfile;
    a rule set aside is set aside on its line with the reason."""
    done = _run(_tool("hadolint"), "--no-color", "Dockerfile")
    assert done.returncode == 0, _report(done)


# Custom resources whose schema Kubernetes does not bundle, each checked by a test of its own
# against the schema its project publishes.
_VALIDATED_ELSEWHERE = {("serving.kserve.io/v1beta1", "InferenceService"): "tests/test_kserve.py"}


def _manifests() -> list[Any]:
    import yaml  # transformers depends on PyYAML

    found = []
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        for number, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if document and (document.get("apiVersion"), document.get("kind")) not in _VALIDATED_ELSEWHERE:
                name = (
                    f"{path.relative_to(ROOT / 'deploy')}:{document.get('kind')}/"
                    f"{document.get('metadata', {}).get('name')}"
                )
                found.append(pytest.param(path, number, document, id=name))
    return found


@pytest.mark.parametrize("version", _KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("path", "number", "document"), _manifests())
def test_every_manifest_is_valid_against_its_schema(path, number, document, version):
    """Each document of each manifest under deploy/ validates against its kind's schema,
    strictly (a misspelt or misplaced field fails). Custom resources are validated by their own
    tests (``_VALIDATED_ELSEWHERE``); any other kind without a bundled schema fails, by name."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    where = (
        f"{path.relative_to(ROOT)} document {number} ({document.get('apiVersion')} "
        f"{document.get('kind')}), Kubernetes {version}"
    )
    problem = None
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        problem = f"{where}: no schema bundled for this kind, and no test of its own in _VALIDATED_ELSEWHERE"
    except kubernetes_validate.ValidationError as exc:
        problem = f"{where}: {exc.message} at {'/'.join(map(str, exc.path)) or 'the top'}"
    assert problem is None, problem


def test_the_manifest_check_catches_a_misplaced_field():
    """The validation is strict: a field in the wrong place is an error, not ignored."""
    import kubernetes_validate

    deployment = next(p.values[2] for p in _manifests() if p.values[2]["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_a_kind_with_no_schema_is_reported_not_passed():
    """kubernetes-validate names a kind it has no schema for (so the test above skips it by
    name) instead of passing it."""
    import kubernetes_validate

    service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "clipserve"},
        "spec": {},
    }
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(service, kubernetes_validate.latest_version(), strict=True)
