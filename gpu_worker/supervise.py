"""Keep one model server running: restart it when it exits, with bounded exponential backoff, and give up on
a crash loop.

``python -m gpu_worker.supervise [options] -- COMMAND [ARGS...]`` runs the command (a gpu_worker, or any
server command) as its child. When the child exits on its own, the supervisor logs why, stops what it left
in the supervisor's process group (a wrapper's children), and starts it again after a backoff that doubles
from ``--backoff-initial-s`` up to ``--backoff-max-s``. A run that lasts ``--stable-s`` resets the count; after
more than ``--max-restarts`` shorter runs in a row the supervisor gives up with one clear log line and exits
1. SIGTERM or SIGINT stops it: the child gets SIGTERM (it drains), the supervisor waits for it and exits 0;
a signal during a backoff wait ends the wait at once. A restarted server loads the checkpoint its command
names: a hot reload made since is not kept.

``start_pi0_models.sh --supervise`` starts every server under one; ``stop_pi0_models.sh`` signals the
supervisor's process group, which holds the server and its children, so all stop together.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
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
                 max_restarts: int = 5, stable_s: float = 300.0) -> None:
        self.command = command
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.max_restarts, self.stable_s = max_restarts, stable_s
        self.stopping = False  # set by the signal handler: a plain flag, no lock it could deadlock on
        self.child: subprocess.Popen | None = None

    def stop(self, signum: int | None = None, _frame=None) -> None:
        if not self.stopping and signum is not None:
            log(f"{signal.Signals(signum).name} received: stopping the server")
        self.stopping = True
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped (a signal cuts the sleep short); True when stopped."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.stopping

    def reap_leftovers(self, grace_s: float = 5.0) -> None:
        """Stop what the dead server left in the supervisor's process group (the children of a wrapper such
        as ``bash -c`` or ``uv run``), so the next start does not find its port taken. Only when the
        supervisor leads its own group (start_pi0_models.sh starts it with setsid): another group may hold
        processes that are not the server's."""
        group = os.getpgrp()
        if group != os.getpid():
            return
        leftovers = [pid for pid in _group_members(group) if pid != os.getpid()]
        if not leftovers:
            return
        log(f"stopping {len(leftovers)} process(es) the server left behind: {leftovers}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                leftovers = [pid for pid in _group_members(group) if pid != os.getpid()]
                if not leftovers:
                    return
                time.sleep(0.05)

    def run(self) -> int:
        short = 0  # consecutive runs that ended within stable_s of their start: the backoff doubles with each
        while not self.stopping:
            started = time.monotonic()
            try:
                self.child = subprocess.Popen(self.command)
            except OSError as exc:
                log(f"cannot start {self.command[0]!r}: {exc}")
                return 1
            log(f"started pid {self.child.pid}: {' '.join(self.command)}")
            if self.stopping:  # a signal between the check and the start: pass it on
                self.stop()
            code = self.child.wait()
            ran = time.monotonic() - started
            self.reap_leftovers()  # a wrapper that died may leave its server holding the port
            if self.stopping:
                log(f"server stopped ({describe(code)})")
                return 0
            short = short + 1 if ran < self.stable_s else 1
            if short > self.max_restarts:
                log(f"giving up: the server exited {short} times in a row, each within {self.stable_s:g}s of its "
                    f"start (crash loop; last: {describe(code)} after {ran:.1f}s); see the lines above")
                return 1
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (short - 1))
            log(f"server exited ({describe(code)}) after {ran:.1f}s; restarting in {delay:g}s "
                f"(short run {short} of at most {self.max_restarts} in a row)")
            if self._sleep(delay):
                log("stopped during the backoff")
                return 0
        return 0


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``, from /proc."""
    members = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backoff-initial-s", type=float, default=1.0, help="first restart delay (default 1)")
    parser.add_argument("--backoff-max-s", type=float, default=30.0, help="longest restart delay (default 30)")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="give up after this many restarts in a row of runs shorter than --stable-s (default 5)")
    parser.add_argument("--stable-s", type=float, default=300.0,
                        help="a run this long is not a crash loop: it resets the count and the backoff (default 300)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]: the server to keep running")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give the server to run after --")
    for name in ("backoff_initial_s", "backoff_max_s", "stable_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be 0 or more")
    supervisor = Supervisor(command, backoff_initial_s=args.backoff_initial_s, backoff_max_s=args.backoff_max_s,
                            max_restarts=args.max_restarts, stable_s=args.stable_s)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
