"""Host-built tensors onto the serving device without stalling it.

`torch.tensor(list, device=cuda)` copies from pageable memory, which waits for the device; the step's
small index tensors are built on the host instead and sent from pinned memory without waiting
(`non_blocking`), so a decode step queues its work and syncs once, when its sampled tokens come back.
On CPU this is the tensor itself.
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`: itself on CPU, else an asynchronous copy from pinned memory."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
