"""What runs a model's towers: torch eager, or a runtime they are converted to at start-up.

One module per runtime (``openvino``: CPU, the default there; ``torch_cuda``: CUDA graphs and
TensorRT), with what they share: the towers as a runtime sees them (``towers``), the conversion
cache on disk (``cache``), the parity check against torch (``parity``), and the choice and
hand-over (``select``). docs/runtimes.md says what each is for and what it measured.
"""

from .select import apply_runtime, choose

__all__ = ["apply_runtime", "choose"]
