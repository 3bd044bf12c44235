"""Hot reload of a hosted model: what is checked before a new checkpoint replaces the one serving.

The server (:meth:`gpu_worker.server.ModelServer.reload`) builds the new instance beside the old one, off the
serving path, and swaps it into the model's batcher between two batches. Before that, this module checks
that a second copy fits in the device's memory, warms the new instance up with one forward pass on
zeros shaped from its input spec, and checks that it takes and gives what the old one did (clients were
told the specs when they connected).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gpu_worker.model import STRING, ModelLoadError, Policy

HEADROOM = 1.2  # the second copy, plus some room for the activations of the batches still serving


class ReloadError(RuntimeError):
    """A reload refused, with the reason; the old model keeps serving."""


def model_bytes(policy: Any) -> int:
    """Bytes of a policy's parameters and buffers (a torch module, or one it holds as ``policy``/``model``)."""
    for candidate in (policy, getattr(policy, "policy", None), getattr(policy, "model", None)):
        if candidate is not None and callable(getattr(candidate, "parameters", None)) \
                and callable(getattr(candidate, "buffers", None)):
            tensors = list(candidate.parameters()) + list(candidate.buffers())
            return sum(t.numel() * t.element_size() for t in tensors)
    return 0


def checkpoint_bytes(checkpoint: str) -> int:
    path = pathlib.Path(checkpoint)
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size if path.exists() else 0
    except OSError:  # unreadable: the load that follows says why
        return 0


def free_bytes(device: str) -> int | None:
    """Memory a second copy could use on ``device``: free CUDA memory, or the host's MemAvailable; None when
    it cannot be told."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(name: str, needed: int, available: int | None, device: str) -> None:
    if available is not None and needed * HEADROOM > available:
        raise ReloadError(
            f"not enough memory on {device} to load model {name!r} beside the copy serving: it needs about "
            f"{needed * HEADROOM / 2**20:.0f} MiB ({needed / 2**20:.0f} MiB of weights plus room), "
            f"{available / 2**20:.0f} MiB are free; free memory, or restart the server with the new checkpoint")


def warm_up_batch(policy: Policy) -> dict[str, np.ndarray]:
    """One row of zeros (strings: a short text) per input, shaped by the spec (any-size axes: 1)."""
    batch = {}
    for key, spec in policy.input_spec.items():
        shape = (1, *[1 if d is None else d for d in spec.shape])
        if spec.dtype == STRING:
            batch[key] = np.full(shape, "warm up", dtype="U16")
        else:
            batch[key] = np.zeros(shape, dtype=spec.dtype)
    return batch


def warm_up(name: str, policy: Policy) -> None:
    """One forward pass; raises :class:`ReloadError` when it fails or answers something the spec does not."""
    try:
        outputs = policy.infer_batch(warm_up_batch(policy))
    except Exception as exc:  # noqa: BLE001 - any failure refuses the checkpoint
        raise ReloadError(f"model {name!r}: the new checkpoint failed its warm-up forward pass: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(outputs, dict):
        raise ReloadError(f"model {name!r}: the warm-up forward returned {type(outputs).__name__}, not a dict")
    missing = sorted(set(policy.output_spec) - set(outputs))
    if missing:
        raise ReloadError(f"model {name!r}: the warm-up forward did not return {missing}")
    for key, value in outputs.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != 1:
            raise ReloadError(f"model {name!r}: warm-up output {key!r} has shape {value.shape}, not one row")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ReloadError(f"model {name!r}: the new checkpoint's warm-up output {key!r} is not finite")


def same_interface(name: str, old: Policy, new: Policy) -> None:
    for what in ("input_spec", "output_spec"):
        before = {k: s.describe() for k, s in getattr(old, what).items()}
        after = {k: s.describe() for k, s in getattr(new, what).items()}
        if before != after:
            raise ReloadError(f"model {name!r}: the new checkpoint changes the model's {what} ({before} -> {after}); "
                              "clients were told the old one: restart the server to change it")


def check_metadata(name: str, policy: Policy) -> None:
    from gpu_worker import wire

    try:
        wire.packb(policy.metadata())
    except Exception as exc:  # noqa: BLE001 - a frame that cannot be sent refuses the checkpoint
        raise ReloadError(f"model {name!r}: the new checkpoint's metadata cannot be sent: "
                          f"{type(exc).__name__}: {exc}") from exc


def load_error(name: str, checkpoint: str, exc: BaseException) -> ReloadError:
    reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
    return ReloadError(f"model {name!r}: checkpoint {checkpoint!r} could not be loaded: {reason}")
