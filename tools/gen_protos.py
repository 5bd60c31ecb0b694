"""Generate the Python protobuf/gRPC stubs from ``protos/``.

Usage (from the repository root)::

    python tools/gen_protos.py            # writes client/clipserve/{v1,oip}/*_pb2*.py and the .binpb
    python tools/gen_protos.py --out DIR  # writes DIR/clipserve/... (the drift test uses this)

The stubs land inside the ``clipserve`` client package because the generated modules import
each other as ``clipserve.v1.*``. Never edit them by hand: change the ``.proto`` and rerun.

The Open Inference Protocol's schema (package ``inference``) is also written as a serialized
descriptor set, ``clipserve/oip/open_inference.binpb``: the server builds its messages from it
in a descriptor pool of its own, because tritonclient defines the same ``inference`` messages in
protobuf's default pool and a process that imports both stub modules fails (duplicate symbol).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "client"
# The schemas that also go out as a descriptor set (see the module docstring): proto -> .binpb.
DESCRIPTOR_SETS = {"clipserve/oip/open_inference.proto": "clipserve/oip/open_inference.binpb"}


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the generated files."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for proto, descriptor_set in DESCRIPTOR_SETS.items():
        args = ["protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out / descriptor_set}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out)


def generated_files(root: Path) -> list[Path]:
    """What ``generate`` writes under ``root`` (the drift test compares these)."""
    return sorted([*root.rglob("*_pb2*.py*"), *(root / d for d in DESCRIPTOR_SETS.values() if (root / d).exists())])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: client/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
