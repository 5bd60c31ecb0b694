"""Generated protobuf/gRPC stubs for ``clipserve.v1`` (see ``tools/gen_protos.py``)."""
