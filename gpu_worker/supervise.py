"""Keep one model server running: restart it when it exits, with bounded exponential backoff, and give up on
a crash loop.

``python -m gpu_worker.supervise [options] -- COMMAND [ARGS...]`` runs the command (a gpu_worker, or any
server command) as its child. When the child exits on its own, the supervisor logs why and starts it again
after a backoff that doubles from ``--backoff-initial-s`` up to ``--backoff-max-s`` (reset once a run lasts
``--stable-s``). When the child has exited ``--max-restarts`` times within ``--window-s``, the supervisor
gives up with one clear log line and exits 1. SIGTERM or SIGINT stops it: the child gets SIGTERM (it drains),
the supervisor waits for it and exits 0; a signal during a backoff wait ends the wait at once.

``start_pi0_models.sh --supervise`` starts every server under one; ``stop_pi0_models.sh`` signals the
supervisor's process group, which holds the server and its children, so all stop together.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import threading
import time


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {message}", file=sys.stderr, flush=True)


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, command: list[str], *, backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0,
                 max_restarts: int = 5, window_s: float = 300.0, stable_s: float = 60.0) -> None:
        self.command = command
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.max_restarts, self.window_s, self.stable_s = max_restarts, window_s, stable_s
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.exits: collections.deque[float] = collections.deque()

    def stop(self, signum: int | None = None, _frame=None) -> None:
        if not self.stopping.is_set() and signum is not None:
            log(f"{signal.Signals(signum).name} received: stopping the server")
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        failures = 0  # consecutive short runs: the backoff doubles with each
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.child = subprocess.Popen(self.command)
            except OSError as exc:
                log(f"cannot start {self.command[0]!r}: {exc}")
                return 1
            log(f"started pid {self.child.pid}: {' '.join(self.command)}")
            if self.stopping.is_set():  # a signal between the check and the start: pass it on
                self.stop()
            code = self.child.wait()
            ran = time.monotonic() - started
            if self.stopping.is_set():
                log(f"server stopped ({describe(code)})")
                return 0
            now = time.monotonic()
            self.exits.append(now)
            while self.exits and now - self.exits[0] > self.window_s:
                self.exits.popleft()
            if len(self.exits) > self.max_restarts:
                log(f"giving up: the server exited {len(self.exits)} times within {self.window_s:g}s "
                    f"(crash loop; last: {describe(code)} after {ran:.1f}s); see the lines above")
                return 1
            failures = 1 if ran >= self.stable_s else failures + 1
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
            log(f"server exited ({describe(code)}) after {ran:.1f}s; restarting in {delay:g}s "
                f"(exit {len(self.exits)} of at most {self.max_restarts} within {self.window_s:g}s)")
            if self.stopping.wait(delay):
                log("stopped during the backoff")
                return 0
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backoff-initial-s", type=float, default=1.0, help="first restart delay (default 1)")
    parser.add_argument("--backoff-max-s", type=float, default=30.0, help="longest restart delay (default 30)")
    parser.add_argument("--max-restarts", type=int, default=5, help="restarts allowed within --window-s (default 5)")
    parser.add_argument("--window-s", type=float, default=300.0, help="crash-loop window (default 300)")
    parser.add_argument("--stable-s", type=float, default=60.0,
                        help="a run this long resets the backoff (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]: the server to keep running")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give the server to run after --")
    for name in ("backoff_initial_s", "backoff_max_s", "window_s", "stable_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be 0 or more")
    supervisor = Supervisor(command, backoff_initial_s=args.backoff_initial_s, backoff_max_s=args.backoff_max_s,
                            max_restarts=args.max_restarts, window_s=args.window_s, stable_s=args.stable_s)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
