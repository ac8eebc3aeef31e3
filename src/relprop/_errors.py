"""Helpers for error messages shared by every layer of relprop.

One place builds "Did you mean ...?" hints so that every message that names an unknown option
(a method, a composite, a module, a parameter, a class label) reads the same way and uses the same
similarity cutoff.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, options: Iterable[object], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The options (as strings) most similar to ``word``, best first, at most ``n``."""
    names = [str(o) for o in options]
    return difflib.get_close_matches(str(word), names, n=n, cutoff=cutoff)


def did_you_mean(word: str, options: Iterable[object], n: int = 1, cutoff: float = 0.5) -> str:
    """``" Did you mean 'x'?"`` (or ``'x', 'y' or 'z'`` for ``n > 1``), or ``""`` if nothing is close.

    The result starts with a space so that it can be appended to a sentence unconditionally::

        raise ValueError(f"unknown method {name!r}.{did_you_mean(name, METHODS)}")
    """
    close = close_matches(word, options, n=n, cutoff=cutoff)
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" Did you mean {listed}?"
