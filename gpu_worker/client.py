"""A blocking client for gpu_worker and any openpi-compatible policy server.

One client is one connection: use it from one thread at a time (the reward
app's pool hands each borrower its own).
"""

from __future__ import annotations

from typing import Any

from websockets.sync.client import connect

from gpu_worker import wire


class ServerError(RuntimeError):
    """The server answered a request with an error message (a text frame)."""

    @property
    def overloaded(self) -> bool:
        return str(self).startswith("overloaded")


class ModelClient:
    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10.0,
        timeout: float | None = 60.0,
        max_message_bytes: int | None = 256 * 2**20,
        close_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.timeout = timeout
        options = dict(open_timeout=open_timeout, close_timeout=close_timeout, compression=None, max_size=max_message_bytes)
        try:
            self._ws = connect(url, legacy=True, **options)  # websockets >= 17: a plain connection object
        except TypeError:
            self._ws = connect(url, **options)
        self.metadata: dict[str, Any] = wire.unpackb(self._ws.recv(timeout=open_timeout))

    def _roundtrip(self, payload: Any) -> Any:
        self._ws.send(wire.packb(payload))
        reply = self._ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise ServerError(reply)
        return wire.unpackb(reply)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """One observation in, one action map out (with ``server_timing``)."""
        return self._roundtrip(obs)

    def infer_batch(self, observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An explicit batch frame: a list in, a list of the same length out."""
        return self._roundtrip(list(observations))

    def send_raw(self, frame: bytes | str) -> Any:
        """Send a frame as given (tests of bad input); returns the decoded reply or the error text."""
        self._ws.send(frame)
        reply = self._ws.recv(timeout=self.timeout)
        return reply if isinstance(reply, str) else wire.unpackb(reply)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
