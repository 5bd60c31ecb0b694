"""Generated stubs match the schema; the client installs and imports without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
gen_protos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_protos)


def test_generated_stubs_match_the_proto_schema(tmp_path):
    """Fails when someone edits protos/ without rerunning `python tools/gen_protos.py`."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    generated = sorted(p.relative_to(tmp_path) for p in gen_protos.generated_files(tmp_path))
    committed = sorted(p.relative_to(ROOT / "client") for p in gen_protos.generated_files(ROOT / "client"))
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / "client" / rel).read_bytes(), (
            f"{rel} is stale: run python tools/gen_protos.py"
        )


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'torchvision', 'transformers', 'numpy', 'PIL', 'aiohttp'}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_the_client_imports_and_works_without_torch(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"\\x89PNG fake")
    code = BLOCK_TORCH + f"""
import clipserve
clip = clipserve.CLIP('127.0.0.1:1', timeout=0.5)
request = clip._score_request('q', {str(image)!r})  # a local file: hashed and read without numpy
assert request.image_bytes and len(request.image_sha256) == 64
clip.close()
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(sorted(clipserve.__all__))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "CLIP" in done.stdout


def test_serve_without_the_server_extra_prints_a_hint_not_a_traceback():
    code = BLOCK_TORCH + "from clipserve.cli import main; sys.exit(main(['serve', '--model', 'x']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'clipserve[server]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_sdk_and_cli_import_no_ray_and_engine_ray_without_it_says_what_to_install(tmp_path):
    """ray is an extra: `import clipserve` and the CLI's parsers never import it (also where it
    is installed, as here), and --engine ray without it is a one-line hint, not a traceback."""
    (tmp_path / "q.jsonl").write_text('{"query_text": "a", "image_url": "x.png"}\n')
    imports = """
import clipserve, clipserve.cli
clipserve.cli.build_parser()
assert 'ray' not in sys.modules and not any(m.startswith(('ray.', 'pandas')) for m in sys.modules), sorted(sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", "import sys" + imports], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    blocked = (
        BLOCK_TORCH.replace("'aiohttp'}", "'aiohttp', 'ray'}")
        + imports
        + f"sys.exit(clipserve.cli.main(['score-file', {str(tmp_path / 'q.jsonl')!r}, '--engine', 'ray']))"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'clipserve[ray]'" in done.stderr and "Traceback" not in done.stderr


def test_base_dependencies_hold_no_server_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "transformers", "pillow", "numpy", "aiohttp", "ray", "pandas"):
        assert heavy not in base
    assert project["optional-dependencies"]["ray"] == ["ray[data]>=2.40"]
    assert any(dep.startswith("torchvision") for dep in project["optional-dependencies"]["server"])
