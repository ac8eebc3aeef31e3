"""How many perturbed copies one forward pass takes: the caller's number, or measured in the call.

A perturbation metric needs ``B * (S + 1)`` forward passes' worth of copies. How many of them one
forward pass should take depends on the model and the device: on a CPU a chunk much larger than the
user's batch can run *slower* per copy (activations fall out of cache), on a GPU a larger chunk is
often much faster. So :class:`ChunkPlan` measures it on the work itself: ``reps`` chunks at the
starting size (the inputs' batch; the first one also pays the model's first-call costs), then
``reps`` chunks at twice, four times ... that size while the time per copy drops by at least
``gain``; the rest runs at the fastest size seen. Each size counts by the least disturbed (fastest)
of its ``reps`` chunks: a disturbance (another process taking a core or the cache for a moment) only
adds time, so while one chunk of each size runs undisturbed the choice is the one an idle machine
makes, and a single disturbed chunk never changes it. A larger size is tried only while ``reps``
whole chunks of it are left to run. Every measured chunk is real work (nothing is evaluated twice),
and nothing is kept across calls. The engine times CPU work by the process' CPU time (robust to
other processes on a shared machine) and accelerators by the wall clock after a sync.

The chunk size changes no result beyond float rounding (a kernel may sum in another order for
another batch size, ~1e-7 relative); pass a fixed ``batch_size`` for bit-for-bit repeatable runs.
"""

from __future__ import annotations

import math

#: the measured size never exceeds this many copies, nor this many input elements per chunk
MAX_COPIES = 8192
MAX_ELEMENTS = 1 << 26
#: the starting size: the inputs' batch, but at most this many copies (a chunk's memory stays bounded)
MAX_START = 256


class ChunkPlan:
    """Chunk sizes for ``total`` copies of ``features`` elements each.

    ``batch_size``: a fixed chunk size, or ``None`` to measure from ``start`` (see the module). Call
    :meth:`next` for the next chunk's size and :meth:`record` after running it (with its seconds
    while :attr:`measuring`); :meth:`too_big` when a measured size ran out of memory.
    """

    def __init__(
        self,
        total: int,
        batch_size: int | None,
        start: int,
        features: int = 1,
        *,
        reps: int = 2,
        gain: float = 0.1,
    ) -> None:
        self.total = total
        self.reps = reps
        self.gain = gain
        self.max_size = max(1, min(MAX_COPIES, MAX_ELEMENTS // max(1, features)))
        self.measuring = batch_size is None
        self.size = int(batch_size) if batch_size is not None else max(1, min(start, MAX_START, self.max_size))
        self.best_size = self.size
        self.best = math.inf
        self.done = 0
        self._times: list[float] = []

    def next(self) -> int:
        """Size of the next chunk (the last one may be smaller)."""
        return min(self.size, self.total - self.done)

    def record(self, n: int, seconds: float | None = None) -> None:
        """``n`` copies were evaluated, in ``seconds`` (needed while measuring)."""
        self.done += n
        if not self.measuring:
            return
        if n < self.size or seconds is None:  # the last, partial chunk: nothing left to decide
            self._stop()
            return
        self._times.append(seconds / n)
        if len(self._times) < self.reps:
            return
        per_copy = min(self._times)  # the least disturbed of this size's repeats
        self._times = []
        if per_copy < self.best * (1 - self.gain):
            self.best, self.best_size = per_copy, self.size
            bigger = self.size * 2
            if bigger <= self.max_size and self.total - self.done >= self.reps * bigger:
                self.size = bigger
                return
        self._stop()

    def too_big(self) -> bool:
        """The current size ran out of memory: fall back to the best smaller size. ``False`` when there is
        none (the caller's own size, or the starting one, failed: re-raise)."""
        if not self.measuring or self.size == self.best_size or self.best == math.inf:
            return False
        self._stop()
        return True

    def _stop(self) -> None:
        self.measuring = False
        self.size = self.best_size
        self._times = []
