"""The process group of a pipeline run, and how a run ends when a peer is gone.

Every distributed step runs inside :meth:`Session.step`. Two ways a peer can go:

- it dies (crash, kill, ``Ctrl-C``): the operating system closes its sockets, and MLX's ring
  backend raises ``RuntimeError: [ring] connection to a peer was lost`` in the ranks talking to
  it within milliseconds; :meth:`Session.step` turns that into :class:`PeerLost`, a one-line
  :class:`~mlx_dupq.errors.DupqError` naming the rank and the step. (Before raising, the ring's
  IO thread prints ``[ring] Socket N was closed by the peer`` ten times on stderr, and more
  ``[ring]`` lines under load, some after the session has ended; the session drops the ring's lines
  until the process exits, so that the error stays one line; everything else passes.)
- it hangs (a frozen process, a pulled cable: no socket closes) and a ``recv`` would wait
  forever: a watchdog thread ends the process with a one-line error when one step has made no
  progress for ``timeout`` seconds. A step is one prefill chunk or one token, so the timeout
  must exceed the slowest rank's prefill chunk (the default, 300 s, does for any model a Mac
  holds; ``--peer-timeout`` changes it). Connecting and waiting for every rank to load its
  layers may take up to ``LOAD_TIMEOUT`` (ranks start and read their files at different speeds).

Under ``mlx.launch`` a rank that exits with an error also makes the launcher stop the others.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from contextlib import contextmanager

import mlx.core as mx

from ..errors import DupqError

DEFAULT_TIMEOUT = 300.0
LOAD_TIMEOUT = 900.0
# the ring IO thread's own diagnostics (per-socket closes, send/recv error counts, and under load
# other per-socket lines): the step's exception already says what happened, in one line
_RING_NOISE = re.compile(rb"^\[ring\] ")


class PeerLost(DupqError):
    """Another rank of a pipeline run is gone (died, killed or unreachable)."""


class _StderrFilter:
    """Route fd 2 through a pipe and drop the ring backend's per-socket error lines."""

    def __init__(self):
        sys.stderr.flush()
        self.out = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        buf = b""
        while data := os.read(self._r, 1 << 16):
            *lines, buf = (buf + data).split(b"\n")
            kept = [ln + b"\n" for ln in lines if not _RING_NOISE.match(ln)]
            if kept:
                os.write(self.out, b"".join(kept))
        if buf:
            os.write(self.out, buf)
        os.close(self._r)

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.out, 2)  # the pipe's last writer closes: the pump drains it and stops
        self._thread.join(timeout=5)
        os.close(self.out)

    def close_at_exit(self) -> None:
        """Keep filtering until the process exits: after a peer is lost the ring's IO thread goes on
        printing for a while, after the session has ended and while the error is being reported."""
        atexit.register(self._drain)

    def _drain(self) -> None:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # later ring lines go nowhere; the pump forwards what it holds and stops
        os.close(devnull)
        self._thread.join(timeout=5)


class Session:
    """The group of a pipeline run: rank, size, guarded steps; use as a context manager."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, backend: str = "any"):
        if timeout <= 0:
            raise DupqError(f"--peer-timeout {timeout} must be positive (seconds)")
        self.timeout = timeout
        self._busy: tuple[str, float, float] | None = None
        self._peer_lost = False
        self._filter = _StderrFilter()
        self._stop = threading.Event()
        self._dog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._dog.start()
        self.rank, self.size = 0, 0  # not known before the group is made
        try:
            with self.step("connecting to the other ranks", LOAD_TIMEOUT):
                try:
                    self.group = mx.distributed.init(strict=False, backend=backend)
                except RuntimeError as e:
                    raise DupqError(f"the ranks could not connect ({e}); check the hostfile given to mlx.launch "
                                    "(run a single rank without mlx.launch)") from None
        except BaseException:
            self.close()
            raise
        self.rank, self.size = self.group.rank(), self.group.size()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            busy = self._busy
            if busy is not None and time.monotonic() - busy[1] > busy[2]:
                msg = (f"error: rank {self.rank}: no progress for {busy[2]:.0f}s while {busy[0]}; a peer is "
                       "stuck or unreachable (raise --peer-timeout if it is only slow)\n")
                os.write(self._filter.out, msg.encode())
                os._exit(1)

    @contextmanager
    def step(self, what: str, timeout: float | None = None):
        """Run a distributed step: PeerLost when a peer dies, process exit when it hangs for
        ``timeout`` seconds (default: the session's)."""
        self._busy = (what, time.monotonic(), self.timeout if timeout is None else timeout)
        try:
            yield
        except RuntimeError as e:
            if self.size == 1:  # no peer: an ordinary error
                raise
            self._peer_lost = True
            raise PeerLost(f"rank {self.rank}: {what} failed, a peer is gone ({e}); all ranks stop") from None
        finally:
            self._busy = None

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (up to ``LOAD_TIMEOUT`` seconds)."""
        if self.size > 1:
            with self.step(what, max(self.timeout, LOAD_TIMEOUT)):
                mx.eval(mx.distributed.all_sum(mx.array([1]), group=self.group))

    def close(self) -> None:
        self._stop.set()
        if self._peer_lost:
            self._filter.close_at_exit()
        else:
            self._filter.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
