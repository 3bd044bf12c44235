"""A blocking client for gpu_worker and any openpi-compatible policy server.

One client is one connection: use it from one thread at a time (the reward
app's pool hands each borrower its own).
"""

from __future__ import annotations

import threading
import urllib.parse
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
        api_key: str | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.broken = False
        options: dict[str, Any] = dict(
            open_timeout=open_timeout, close_timeout=close_timeout, compression=None, max_size=max_message_bytes
        )
        if api_key:
            options["additional_headers"] = {"Authorization": f"Api-Key {api_key}"}  # as openpi-client sends it
        try:
            self._ws = connect(url, legacy=True, **options)  # websockets >= 17: a plain connection object
        except TypeError:
            self._ws = connect(url, **options)
        self.metadata: dict[str, Any] = wire.unpackb(self._ws.recv(timeout=open_timeout))

    @property
    def explicit_batch(self) -> bool:
        """Whether the server announced that it answers a list of observations with a list of
        actions (gpu_worker does). openpi's server takes exactly one observation map per frame."""
        server = self.metadata.get("server") if isinstance(self.metadata, dict) else None
        return isinstance(server, dict) and server.get("explicit_batch") is True

    @property
    def selects_models(self) -> bool:
        """Whether the server hosts several models chosen per request by ``__model__``. A server that
        does not say so serves one policy, and the key would only reach that policy as an input."""
        return self.explicit_batch and isinstance(self.metadata.get("models"), dict)

    @property
    def server_name(self) -> str:
        server = self.metadata.get("server") if isinstance(self.metadata, dict) else None
        name = server.get("name") if isinstance(server, dict) else None
        return name if isinstance(name, str) else "openpi-compatible"

    def _exchange(self, frame: bytes | str) -> bytes | str:
        """Send one frame, receive its reply. Any failure in between closes the
        connection: a reply that arrives late must never answer the next request."""
        if self.broken:
            raise ConnectionError(f"connection to {self.url} was closed after an earlier failure")
        try:
            self._ws.send(frame)
            return self._ws.recv(timeout=self.timeout)
        except BaseException:
            self.broken = True
            # Close on a side thread: a hung server would hold a graceful close for close_timeout.
            threading.Thread(target=self.close, name="close-broken-connection", daemon=True).start()
            raise

    def _roundtrip(self, payload: Any) -> Any:
        reply = self._exchange(wire.packb(payload))
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
        reply = self._exchange(frame)
        return reply if isinstance(reply, str) else wire.unpackb(reply)

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close cleanly; it is gone
            pass

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def admin_call(url: str, request: dict[str, Any], *, api_key: str | None = None, timeout: float = 600.0,
               open_timeout: float = 10.0) -> dict[str, Any]:
    """One admin call on a gpu_worker's ``/admin`` path: ``{"command": "reload", "model": name,
    "checkpoint": path}`` or ``{"command": "status"}``. Returns the server's answer, ``{"ok": true, ...}`` or
    ``{"ok": false, "error": reason}``; raises ServerError when the server has no admin endpoint (an openpi
    server) and OSError/TimeoutError when it cannot be reached."""
    parts = urllib.parse.urlsplit(url)
    admin = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/admin", "", ""))
    with ModelClient(admin, open_timeout=open_timeout, timeout=timeout, api_key=api_key) as client:
        if not (isinstance(client.metadata, dict) and client.metadata.get("admin") is True):
            raise ServerError(f"{url} has no admin endpoint (not a gpu_worker: an openpi server cannot reload; "
                              "restart it with the new checkpoint)")
        return client._roundtrip(request)
