"""The Open Inference Protocol (KServe v2; Triton's gRPC API) beside the Scorer service.

``inference.GRPCInferenceService`` on the same port, behind the same interceptors (auth) and
credentials (TLS): liveness, readiness, metadata and ModelInfer. Its models are the served
models by name (``BatchScores``) and, with ``--v2-alias``, the default model under that name
with a Triton CLIP model's signature (``ClipFeatures``); see oip_models.py. The methods the
protocol makes optional (model configuration, the repository, statistics) are not defined, so
gRPC answers them UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from clipserve import __version__
from ..utils.errors import ErrorKind, ItemError
from ..utils.metrics import Metrics
from . import oip_messages as pb
from . import parsing
from .oip_models import BatchScores, ClipFeatures, describe
from .registry import ModelRegistry
from .status import guarded_unary
from .tensors import raw_bytes, read_inputs


_RPC = "ModelInfer"


def server_metadata() -> dict[str, Any]:
    return {"name": "clipserve", "version": __version__, "extensions": []}


class InferenceModels:
    """The protocol's models over the registry, whichever face asks (gRPC here, REST in
    http/kserve.py): what a name means, readiness, metadata and ModelInfer itself."""

    def __init__(self, registry: ModelRegistry, *, alias: str, max_items: int) -> None:
        """``max_items``: the largest batch of one ModelInfer call (--max-items-per-message)."""
        self._registry = registry
        self._max_items = max_items
        self._alias = alias

    @property
    def server_ready(self) -> bool:
        # As the standard health service: not ready once a model's batcher or instance has died.
        alive = all(engine.alive for _, engine in self._registry.engines())
        return self._registry.ready and not self._registry.closing and alive

    def model_ready(self, name: str) -> bool:
        """Whether ``name`` is ready; an unknown name raises (NOT_FOUND), a loading one is not."""
        try:
            _, engine = self.model(name)
        except ItemError as exc:
            if exc.kind is not ErrorKind.UNAVAILABLE:
                raise
            return False
        return bool(engine.alive)

    def metadata(self, name: str) -> dict[str, Any]:
        model, engine = self.model(name)
        return {"name": name, "versions": ["1"], "platform": engine.description.backend, **describe(model)}

    async def infer(self, request: Any) -> Any:
        """A ModelInferRequest's ModelInferResponse (every output raw), or an ItemError."""
        model, _ = self.model(request.model_name)
        arrays = read_inputs(request, model.inputs, request.model_name, max_items=self._max_items)
        outputs = await model.infer(arrays)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        wanted = [output.name for output in request.outputs] or [spec.name for spec in model.outputs]
        datatypes = {spec.name: spec.datatype for spec in model.outputs}
        for name in wanted:
            if name not in datatypes:
                raise ItemError(
                    ErrorKind.INVALID_INPUT,
                    f"model {request.model_name!r} has no output {name!r} (it gives {', '.join(datatypes)})",
                )
            response.outputs.add(name=name, datatype=datatypes[name], shape=outputs[name].shape)
            response.raw_output_contents.append(raw_bytes(outputs[name], datatypes[name]))
        return response

    def model(self, name: str) -> tuple[Any, Any]:
        """The model ``name`` names (its signature) and the engine it runs on."""
        if not name:
            raise ItemError(ErrorKind.INVALID_INPUT, "the request names no model")
        if self._alias and name == self._alias:
            engine = self._registry.get()
            return ClipFeatures(engine), engine
        try:
            engine = self._registry.get(name)
        except ItemError as exc:
            if exc.kind is ErrorKind.NOT_FOUND and self._alias:
                raise ItemError(exc.kind, f"{exc.message}, and the alias {self._alias!r}") from None
            raise
        return BatchScores(engine), engine


class OpenInferenceServicer:
    """The protocol's gRPC face: every RPC through the one unary guard (serving/status.py)."""

    def __init__(self, models: InferenceModels, *, metrics: Metrics) -> None:
        self._models = models
        self._metrics = metrics

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def live() -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, live)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def ready() -> Any:
            return pb.ServerReadyResponse(ready=self._models.server_ready)

        return await self._answer("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def ready() -> Any:
            return pb.ModelReadyResponse(ready=self._models.model_ready(request.name))

        return await self._answer("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def metadata() -> Any:
            return pb.ServerMetadataResponse(**server_metadata())

        return await self._answer("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def metadata() -> Any:
            return pb.ModelMetadataResponse(**self._models.metadata(request.name))

        return await self._answer("ModelMetadata", context, metadata)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(_RPC, context, lambda: self._models.infer(request))

    async def _answer(self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Any]]) -> Any:
        return await guarded_unary(rpc, context, self._metrics, work)


def add_open_inference_to_server(servicer: OpenInferenceServicer, server: grpc.aio.Server) -> None:
    """Like a generated ``add_..._to_server``, with the messages of oip_messages' own pool."""
    methods = {
        "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    }
    # Raw bytes in, parsed off the event loop when large (a ModelInfer of a big batch).
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            parsing.unary(getattr(servicer, name), request.FromString), response_serializer=response.SerializeToString
        )
        for name, (request, response) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, handlers),))
