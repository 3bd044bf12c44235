"""The model interface the server hosts, and a base class for PyTorch policies.

A hosted model ("policy") is any object with:

* ``input_spec``: ``{key: TensorSpec}``, the shape and dtype of one
  observation's value under each key (no batch dimension);
* ``output_spec``: ``{key: TensorSpec}``, the same for one action;
* ``metadata() -> dict``: the policy's own metadata, sent to clients on
  connect (msgpack-able values only);
* ``infer_batch(batch) -> dict``: ``batch`` maps every input key to an array
  stacked along a new leading axis of size B; the result maps every output key
  to an array whose leading axis is also B. String inputs arrive as numpy
  unicode arrays of shape ``(B,)``.

Models are built by :func:`load_model` from ``module:Class`` named on the
command line or in a config file, never by a request: the class's
``from_checkpoint(checkpoint, *, device, **options)`` builds a ready instance.
:class:`TorchPolicy` provides that for ``torch.nn.Module`` models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import pathlib
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

STRING = "str"
"""The dtype name of a string input (for example a language prompt)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one row. ``None`` in ``shape`` accepts any size."""

    shape: tuple[int | None, ...]
    dtype: str  # a numpy dtype string such as "float32", or STRING

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype != STRING:
            np.dtype(self.dtype)  # raises on a bad name at definition time

    @functools.cached_property
    def numpy_dtype(self) -> np.dtype | None:
        """The dtype as a numpy dtype (None for strings), worked out once: frames are checked against it."""
        return None if self.dtype == STRING else np.dtype(self.dtype)

    @functools.cached_property
    def exact_shape(self) -> tuple[int, ...] | None:
        """The shape when no dimension is free: an array of exactly this shape needs no further checks."""
        return None if any(d is None for d in self.shape) else self.shape

    def describe(self) -> dict[str, Any]:
        """The form sent in the server metadata: shape (-1 for any) and dtype."""
        dtype = STRING if self.dtype == STRING else np.dtype(self.dtype).str
        return {"shape": [-1 if d is None else d for d in self.shape], "dtype": dtype}


@runtime_checkable
class Policy(Protocol):
    input_spec: Mapping[str, TensorSpec]
    output_spec: Mapping[str, TensorSpec]

    def metadata(self) -> dict[str, Any]: ...

    def infer_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ModelLoadError(RuntimeError):
    """A model named in the configuration could not be imported or built."""


def import_target(target: str) -> type:
    """Import ``module:Class``; errors say which part failed and how to fix it."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"model target {target!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {module_name!r} for model {target!r}: {exc}. "
            "Is the package installed, or its directory on PYTHONPATH?"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r} (model {target!r})")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ModelLoadError(f"model target {target!r} is not a class")
    return obj


def load_model(target: str, checkpoint: str | None, *, device: str, options: Mapping[str, Any] | None = None) -> Policy:
    """Build the model ``target`` on ``device``; call only inside the server process."""
    cls = import_target(target)
    factory = getattr(cls, "from_checkpoint", None)
    if factory is None:
        raise ModelLoadError(
            f"model class {target!r} has no from_checkpoint(checkpoint, *, device, **options); "
            "subclass gpu_worker.model.TorchPolicy or add that classmethod"
        )
    if checkpoint is not None and not pathlib.Path(checkpoint).exists():
        raise ModelLoadError(f"checkpoint {checkpoint!r} for model {target!r} does not exist")
    try:
        model = factory(checkpoint, device=device, **dict(options or {}))
    except TypeError as exc:
        raise ModelLoadError(f"cannot build model {target!r} with options {dict(options or {})}: {exc}") from exc
    for attr in ("input_spec", "output_spec", "metadata", "infer_batch"):
        if not hasattr(model, attr):
            raise ModelLoadError(f"model {target!r} lacks {attr!r}; see gpu_worker.model.Policy")
    return model


def _torch():
    import torch  # imported lazily: the CLI must not touch torch before CUDA_VISIBLE_DEVICES is final

    return torch


class TorchPolicy:
    """Base for ``torch.nn.Module`` policies: device placement, dtype, checkpoints.

    Subclass it together with ``torch.nn.Module``::

        class MyPolicy(TorchPolicy, torch.nn.Module):
            input_spec = {"observation/state": TensorSpec((4,), "float32")}
            output_spec = {"actions": TensorSpec((), "int64")}

            def __init__(self, hidden: int = 64):
                torch.nn.Module.__init__(self)
                self.net = ...

            def forward(self, batch: dict) -> dict: ...

    ``forward`` receives tensors on the model's device (floating inputs cast to
    the parameter dtype; string inputs stay numpy arrays) and returns a dict of
    tensors with the batch dimension first. ``infer_batch`` runs it under
    ``torch.inference_mode()`` and returns numpy arrays (floating outputs as
    float32, since numpy has no bfloat16).
    """

    input_spec: ClassVar[Mapping[str, TensorSpec]] = {}
    output_spec: ClassVar[Mapping[str, TensorSpec]] = {}
    default_checkpoint: ClassVar[str | None] = None
    """A checkpoint path used when none is configured (relative to the class's module file)."""

    device: str = "cpu"
    version: str = "init"

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None, *, device: str = "cpu", dtype: str = "float32", **options: Any):
        torch = _torch()
        param_dtype = getattr(torch, dtype, None)
        if not isinstance(param_dtype, torch.dtype) or not param_dtype.is_floating_point:
            raise ModelLoadError(f"dtype {dtype!r} is not a floating torch dtype (float32, bfloat16, float16)")
        model = cls(**options)
        if checkpoint is None and cls.default_checkpoint is not None:
            module_file = pathlib.Path(importlib.import_module(cls.__module__).__file__ or ".")
            checkpoint = str((module_file.parent / cls.default_checkpoint).resolve())
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            # The file's name and a digest of its bytes: another checkpoint under the same name is another version.
            digest = hashlib.sha256(pathlib.Path(checkpoint).read_bytes()).hexdigest()[:12]
            model.version = f"{pathlib.Path(checkpoint).name}@{digest}"
        model.to(device=device, dtype=param_dtype)
        model.eval()
        model.device = device
        model._param_dtype = param_dtype
        return model

    def metadata(self) -> dict[str, Any]:
        return {}

    # Inputs at least this large go to a CUDA device from pinned (page-locked) host memory, copied
    # asynchronously. Off (None) by default: on an H200, LIBERO-sized batches (two 224x224x3 images a row)
    # ran 9-15% slower through infer_batch that way (0.68 vs 0.62 ms at 1 row, 1.88 vs 1.64 ms at 32;
    # bench/results/pinned_memory_cuda.json): the extra host copy costs more than the asynchronous
    # transfer saves when the forward pass waits for it anyway. A model with large inputs and CPU work to
    # overlap may set it.
    pin_host_bytes: ClassVar[int | None] = None

    def infer_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        param_dtype = getattr(self, "_param_dtype", torch.float32)
        pin_from = self.pin_host_bytes if str(getattr(self, "device", "cpu")).startswith("cuda") else None
        with torch.inference_mode():
            inputs: dict[str, Any] = {}
            for key, value in batch.items():
                if value.dtype.kind == "U":
                    inputs[key] = value
                    continue
                if pin_from is not None and value.nbytes >= pin_from:
                    # One copy into page-locked memory, then an asynchronous copy to the device.
                    dtype = torch.from_numpy(np.empty(0, value.dtype)).dtype
                    tensor = torch.empty(value.shape, dtype=dtype, pin_memory=True)
                    tensor.numpy()[...] = value
                else:
                    if not value.flags.writeable or not value.flags.c_contiguous:
                        value = np.array(value)  # torch refuses read-only buffers (frames decode read-only)
                    tensor = torch.from_numpy(value)
                tensor = tensor.to(self.device, non_blocking=True)
                if tensor.is_floating_point():
                    tensor = tensor.to(param_dtype)
                inputs[key] = tensor
            outputs = self(inputs)
            result = {}
            for key, tensor in outputs.items():
                if tensor.is_floating_point():
                    tensor = tensor.float()
                result[key] = tensor.cpu().numpy()
        return result
