"""gunicorn's gthread worker, with a fast refusal for new work while it drains.

On SIGTERM the stock worker stops accepting and finishes its in-flight
requests for up to ``graceful_timeout`` (120 s here). A client that connects
meanwhile lands in the listen backlog, is never read, and gets a connection
reset when the worker finally exits: it waits for the whole drain to learn
nothing. This worker keeps accepting during the drain, but only to answer each
new connection at once with ``503 Service Unavailable`` and ``Retry-After``
(on a short-lived thread, so the event loop that finishes in-flight work is
never blocked), so a client or load balancer retries elsewhere straight away.

Only when the whole app stops: when gunicorn merely replaces this worker (a
reload, a worker restart) a sibling serves new connections, so the worker
then stops accepting exactly as stock gthread does.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time

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
    _refusing = False
    _refusals = threading.BoundedSemaphore(64)  # refusals being answered at once; past it, a plain close

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled or self.alive or not self._shutting_down():
            super().set_accept_enabled(enabled)  # running (with back-pressure), or a lone worker being replaced
            return
        if self._refusing:
            return
        # Graceful stop of the whole app: the listeners stay registered, now to refuse (cleanup closes them).
        for listener in self.sockets:
            listener.setblocking(False)
            if self._accepting:
                self.poller.modify(listener, selectors.EVENT_READ, self._refuse)
            else:
                self.poller.register(listener, selectors.EVENT_READ, self._refuse)
        self._accepting = False
        self._refusing = True

    def _shutting_down(self) -> bool:
        """Whether the master has closed its listeners: it does so when the app stops, but not when it only
        replaces this worker (reload, a worker restart), where a sibling serves new connections and
        refusing them would be wrong. Read from /proc; elsewhere, or with TLS, behave as stock gthread."""
        if self.cfg.is_ssl:
            return False
        try:
            ours = {os.fstat(listener.fileno()).st_ino for listener in self.sockets}
            held = set()
            for fd in os.scandir(f"/proc/{self.ppid}/fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    held.add(int(target[8:-1]))
        except (OSError, ValueError):
            return False
        return not (ours & held)

    def _refuse(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # another worker took it, or it went away
        if not self._refusals.acquire(blocking=False):
            client.close()  # a flood of connections during the drain: no thread each
            return
        threading.Thread(target=_answer_refusal, args=(client, self._refusals), name="drain-refusal",
                         daemon=True).start()


def _answer_refusal(client: socket.socket, slots: threading.BoundedSemaphore) -> None:
    """Read the request head (closing with unread data would reset the connection before the client reads the
    answer), answer 503, and close once the client has had it; two seconds at most."""
    deadline = time.monotonic() + 2.0
    try:
        client.setblocking(True)
        received = b""
        while b"\r\n\r\n" not in received and len(received) < _READ_LIMIT:
            client.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
        client.settimeout(max(0.01, deadline - time.monotonic()))
        client.sendall(_REFUSAL)
        client.shutdown(socket.SHUT_WR)
        read = 0
        while read < _READ_LIMIT:  # let the client finish sending its body, then see our FIN
            client.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = client.recv(65536)
            if not chunk:
                break
            read += len(chunk)
    except OSError:
        pass
    finally:
        client.close()
        slots.release()
