"""Small models with fixed, known outputs, for tests and demos of the server's behaviour.

:class:`AffineModel` answers ``actions = 2 * x + 1`` and ``row_sum = sum(x)``
for ``observation/state`` of any length. Options make it misbehave on purpose:

* ``gated``: each forward first waits on the class-level event ``gate`` (and
  sets ``entered``), so an in-process test can hold the model busy while
  requests queue up;
* ``gate_file`` / ``entered_file``: the same across processes, with files;
* ``fail_on_negative``: raise when any state value is negative (a model
  exception, answered to the whole batch);
* ``delay_s``: sleep in every forward; ``load_delay_s``: sleep while loading.
"""

from __future__ import annotations

import pathlib
import threading
import time

import numpy as np

from gpu_worker.model import STRING, TensorSpec


class AffineModel:
    input_spec = {"observation/state": TensorSpec((None,), "float32")}
    output_spec = {"actions": TensorSpec((None,), "float32"), "row_sum": TensorSpec((), "float32")}
    version = "affine-1"
    gate = threading.Event()
    entered = threading.Event()

    def __init__(
        self,
        *,
        gated: bool = False,
        gate_file: str | None = None,
        entered_file: str | None = None,
        fail_on_negative: bool = False,
        delay_s: float = 0.0,
    ) -> None:
        self.gated = gated
        self.gate_file = gate_file
        self.entered_file = entered_file
        self.fail_on_negative = fail_on_negative
        self.delay_s = delay_s
        self.calls: list[int] = []  # batch sizes seen, for tests

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None, *, device: str, load_delay_s: float = 0.0, **options):
        time.sleep(load_delay_s)
        return cls(**options)

    def metadata(self) -> dict:
        return {"kind": type(self).__name__}

    def _hold(self) -> None:
        if self.gated:
            type(self).entered.set()
            if not type(self).gate.wait(timeout=60):
                raise TimeoutError("the test never opened AffineModel.gate")
        if self.entered_file:
            pathlib.Path(self.entered_file).touch()
        if self.gate_file:
            deadline = time.monotonic() + 60
            while not pathlib.Path(self.gate_file).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate file {self.gate_file} never appeared")
                time.sleep(0.01)
        if self.delay_s:
            time.sleep(self.delay_s)

    def infer_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["observation/state"]
        self._hold()
        self.calls.append(len(x))
        if self.fail_on_negative and (x < 0).any():
            raise ValueError("negative input in batch")
        return {"actions": 2 * x + 1, "row_sum": x.sum(axis=1)}


class PromptModel(AffineModel):
    """AffineModel on a fixed-size state that also takes a ``prompt`` string."""

    input_spec = {"observation/state": TensorSpec((2,), "float32"), "prompt": TensorSpec((), STRING)}
    output_spec = {**AffineModel.output_spec, "prompt_len": TensorSpec((), "int64")}

    def infer_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().infer_batch(batch)
        out["prompt_len"] = np.array([len(p) for p in batch["prompt"]], dtype=np.int64)
        return out


class ReservedOutputModel(AffineModel):
    """Declares an output named like a reply field the server adds: refused at load."""

    output_spec = {**AffineModel.output_spec, "server_timing": TensorSpec((), "float32")}
