"""The Open Inference Protocol's messages, built in a descriptor pool of their own.

The protocol's package is ``inference``, and tritonclient (and Triton's, KServe's stubs) put
the same ``inference.*`` names into protobuf's default descriptor pool: a process that loaded
the generated stubs (``clipserve.oip.open_inference_pb2``) and tritonclient would fail on the
second import (duplicate symbol). So the server never loads those stubs: it builds the
messages from the descriptor set that ``tools/gen_protos.py`` writes beside them, in a private
pool. A server then runs beside tritonclient in one process (an in-process test, a notebook).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"


def _schema() -> list[bytes]:
    data = files("clipserve.oip").joinpath("open_inference.binpb").read_bytes()
    return [file.SerializeToString() for file in descriptor_pb2.FileDescriptorSet.FromString(data).file]


def pool(*others: bytes) -> descriptor_pool.DescriptorPool:
    """A fresh pool with the protocol's schema and ``others`` (serialized file descriptors,
    without imports): reflection answers from one, so it gets every service the port serves."""
    built = descriptor_pool.DescriptorPool()
    for file in (*_schema(), *others):
        built.AddSerializedFile(file)
    return built


_POOL = pool()


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
