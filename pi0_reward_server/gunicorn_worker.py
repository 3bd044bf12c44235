"""gunicorn's gthread worker, with a fast refusal for new work while it drains.

On SIGTERM the stock worker stops accepting and finishes its in-flight
requests for up to ``graceful_timeout`` (120 s here). A client that connects
meanwhile lands in the listen backlog, is never read, and gets a connection
reset when the worker finally exits: it waits for the whole drain to learn
nothing. This worker keeps accepting during the drain, but only to answer each
new connection at once with ``503 Service Unavailable`` and ``Retry-After``
(on a short-lived thread, so the event loop that finishes in-flight work is
never blocked), so a client or load balancer retries elsewhere straight away.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading

from gunicorn.workers.gthread import ThreadWorker

RETRY_AFTER_S = 5
_BODY = json.dumps({"error": "the reward app is shutting down; retry on another instance or shortly"}).encode()
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    + f"Retry-After: {RETRY_AFTER_S}\r\nContent-Length: {len(_BODY)}\r\n".encode()
    + b"Connection: close\r\n\r\n" + _BODY
)
_READ_LIMIT = 256 * 1024  # what a refusal reads of the request before answering; the rest is not wanted


class DrainingThreadWorker(ThreadWorker):
    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled or self.alive:
            super().set_accept_enabled(enabled)  # normal running, including back-pressure on worker_connections
            return
        # Graceful stop: the listeners stay registered, now to refuse. (Cleanup closes them when the drain ends.)
        for listener in self.sockets:
            listener.setblocking(False)
            if self._accepting:
                self.poller.modify(listener, selectors.EVENT_READ, self._refuse)
            else:
                self.poller.register(listener, selectors.EVENT_READ, self._refuse)
        self._accepting = False

    def _refuse(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # another worker took it, or it went away
        threading.Thread(target=_answer_refusal, args=(client,), name="drain-refusal", daemon=True).start()


def _answer_refusal(client: socket.socket) -> None:
    """Read the request head (closing with unread data would reset the connection before the client reads the
    answer), answer 503, and close once the client has had it."""
    try:
        client.setblocking(True)
        client.settimeout(2.0)
        received = b""
        while b"\r\n\r\n" not in received and len(received) < _READ_LIMIT:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
        client.sendall(_REFUSAL)
        client.shutdown(socket.SHUT_WR)
        read = 0
        while read < _READ_LIMIT:  # let the client finish sending its body, then see our FIN
            chunk = client.recv(65536)
            if not chunk:
                break
            read += len(chunk)
    except OSError:
        pass
    finally:
        client.close()
