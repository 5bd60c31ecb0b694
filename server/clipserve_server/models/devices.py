"""The devices one server runs its models on: ``--device`` as a list.

``--device cuda:0,cuda:1`` (or ``cuda:all``) puts every model on each device, with
``--instances`` forward workers per device; ``cpu,cpu`` gives two CPU "devices", which is how
tests and the simulated accelerator exercise several devices on a machine without GPUs. Each
device gets its own copy of the weights (loaded once per device) and a name of its own (a
device listed twice is told apart by ``#2``), which metrics and GetModelInfo use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.config import device_entries


@dataclass(frozen=True)
class Device:
    """One entry of the device list."""

    name: str  # unique on this server: "cuda:1", "cpu", "cpu#2"
    torch: str  # what the model is loaded onto: "cuda:1", "cpu"

    @property
    def is_cpu(self) -> bool:
        return self.torch == "cpu"


def resolve_devices(device: str) -> list[Device]:
    """The devices ``--device`` names: ``auto`` (CUDA when available), ``cpu``, ``cuda``,
    ``cuda:N``, ``cuda:all`` (every visible GPU), or a comma-separated list of those."""
    resolved: list[str] = []
    for entry in device_entries(device):
        if entry == "cuda:all":
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not count:
                raise RuntimeError("--device cuda:all was asked for, but CUDA is not available on this machine")
            resolved.extend(f"cuda:{i}" for i in range(count))
        elif entry == "auto":
            import torch

            resolved.append("cuda" if torch.cuda.is_available() else "cpu")
        else:
            resolved.append(entry)
    devices = []
    for i, name in enumerate(resolved):
        seen = resolved[:i].count(name)
        devices.append(Device(f"{name}#{seen + 1}" if seen else name, name))
    return devices
