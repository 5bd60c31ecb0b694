"""The Open Inference Protocol over REST (KServe v2; Triton's HTTP API), on the models of the
gRPC side (open_inference.InferenceModels: the ``clip`` alias, each model's score signature).

A REST request becomes the ModelInferRequest gRPC would have received (every input's
elements in raw contents), so both faces read, check and infer one way. Tensors travel as
JSON ``data`` or, with the binary tensor extension that ``tritonclient.http`` uses by default,
as bytes after a JSON header of ``Inference-Header-Content-Length`` bytes, each input's
``binary_data_size`` of them in order; an output goes back binary when its request asks
(``"parameters": {"binary_data": true}``, or ``binary_data_output`` for all).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .. import oip_messages as pb
from ..open_inference import InferenceModels, server_metadata
from ..tensors import json_from_raw, raw_from_json
from .common import invalid, read_body

_HEADER_LENGTH = "Inference-Header-Content-Length"


def routes(models: InferenceModels) -> list[web.RouteDef]:
    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        ready = models.server_ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(server_metadata())

    async def model_metadata(request: web.Request) -> web.Response:
        return web.json_response(models.metadata(request.match_info["model"]))

    async def model_ready(request: web.Request) -> web.Response:
        ready = models.model_ready(request.match_info["model"])
        return web.json_response({"name": request.match_info["model"], "ready": ready}, status=200 if ready else 503)

    async def infer(request: web.Request) -> web.Response:
        body = await read_body(request)
        header_length = _header_length(request, len(body))
        try:
            header = json.loads(body[:header_length])
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid(f"the inference header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise invalid("the inference request must be a JSON object")
        grpc_request = _infer_request(request.match_info["model"], header, body[header_length:])
        return _infer_response(header, await models.infer(grpc_request))

    return [
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", metadata),
        web.get("/v2/models/{model}", model_metadata),
        web.get("/v2/models/{model}/versions/{version}", model_metadata),
        web.get("/v2/models/{model}/ready", model_ready),
        web.get("/v2/models/{model}/versions/{version}/ready", model_ready),
        web.post("/v2/models/{model}/infer", infer),
        web.post("/v2/models/{model}/versions/{version}/infer", infer),
    ]


def _header_length(request: web.Request, size: int) -> int:
    given = request.headers.get(_HEADER_LENGTH)
    if given is None:
        return size
    try:
        length = int(given)
    except ValueError:
        raise invalid(f"{_HEADER_LENGTH} must be a number of bytes, not {given!r}") from None
    if not 0 <= length <= size:
        raise invalid(f"{_HEADER_LENGTH} is {length}, but the body has {size} bytes")
    return length


def _infer_request(model: str, header: dict[str, Any], binary: bytes) -> Any:
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("the inference request has no 'inputs' list")
    request = pb.ModelInferRequest(model_name=model, id=str(header.get("id", "")))
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid(f"inputs[{index}] must be an object with a name, a datatype, a shape and data")
        name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise invalid(f"input {name!r} needs a datatype (a string) and a shape (a list of integers)")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(
                    f"input {name!r}: binary_data_size {size!r}, "
                    f"but {len(binary) - offset} bytes of binary data are left"
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(raw_from_json(tensor["data"], datatype, name))
        else:
            raise invalid(f"input {name!r} has neither data nor parameters.binary_data_size")
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data after the last input's binary_data_size")
    for index, output in enumerate(header.get("outputs") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise invalid(f"outputs[{index}] must be an object with a name")
        request.outputs.add(name=output["name"])
    return request


def _infer_response(header: dict[str, Any], response: Any) -> web.Response:
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    binary_wanted = {
        output["name"]: bool((output.get("parameters") or {}).get("binary_data", binary_default))
        for output in header.get("outputs") or []
    }
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary_wanted.get(tensor.name, binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = json_from_raw(raw, tensor.datatype)
        outputs.append(entry)
    answer = json.dumps(
        {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "id": response.id,
            "outputs": outputs,
        },
        allow_nan=False,
    ).encode()
    if not blobs:
        return web.Response(body=answer, content_type="application/json")
    return web.Response(
        body=answer + b"".join(blobs),
        content_type="application/octet-stream",
        headers={_HEADER_LENGTH: str(len(answer))},
    )
