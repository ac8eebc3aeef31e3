"""Ctrl-C during a compare run always stops it, the documented way (finished cells kept, a re-run resumes).

Python's default SIGINT handler raises :class:`KeyboardInterrupt` wherever the main thread happens to be.
When that is inside a callback whose exceptions Python ignores (a weakref finaliser, e.g. a
``WeakKeyDictionary``'s ``remove``, a ``__del__``), the exception is printed as "Exception ignored in ..."
and dropped: the run went on to the end as if Ctrl-C had not been pressed.

:class:`Interrupt`, entered by :func:`relprop.report.run_compare` for one run, installs a handler that
raises as the default one does (so a blocking wait, e.g. on Ray, stops at once) and also records the
press; :meth:`Interrupt.check`, called between cells and between batches, raises for a press that was
swallowed. Every press raises at once; a second one after a swallowed first stops the run where it is.

No process-wide state is left: the handler is installed only in the main thread (``signal.signal`` cannot
be called elsewhere, so a run from another thread keeps the old behaviour), only over Python's default
handler (a handler of the caller's, or SIGINT ignored, is left alone), and the previous one is put back
when the run ends.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class Interrupt:
    """One run's Ctrl-C: a context manager (see the module docstring). ``pending``: a press not yet seen
    by the run (:meth:`check` raises for it; :meth:`seen` clears it once the run has stopped)."""

    def __init__(self) -> None:
        self.pending = False
        self.installed = False
        self._previous: object = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self.installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, ex: BaseException | None, tb: TracebackType | None) -> None:
        if self.installed:
            self.installed = False
            if signal.getsignal(signal.SIGINT) == self._handler:  # another's, set since: not ours to undo
                signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]

    def check(self) -> None:
        """Raise :class:`KeyboardInterrupt` for a press the run has not seen (e.g. one raised inside a
        weakref callback, where Python drops it)."""
        if self.pending:
            raise KeyboardInterrupt

    def seen(self) -> None:
        """The run has stopped for the press: later checks (the report of the finished cells) pass."""
        self.pending = False
