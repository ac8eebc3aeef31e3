"""Data labels -> model classes, by name.

A folder ``photos/tabby/`` or a CSV label ``tabby`` means the model's class named "tabby", whatever
position the folder has among its siblings: labels are matched to the model's class names (zoo
metadata, Hugging Face ``id2label``, torchvision/timm ImageNet names and WordNet ids such as
``n01440764``, or ``--classes FILE``), ignoring case, spaces, hyphens and underscores. Any subset of
the classes, in any order, works. An integer label with no class of that name is the class index.

A label that matches nothing is an error, because accuracies and "true label" targets computed from
a guessed mapping would be silently wrong. ``--labels ignore`` runs anyway (those examples get no
accuracy and are explained for the prediction) and puts a warning in the terminal and the report;
``--labels sorted`` uses the sorted folder order as class indices (torchvision ``ImageFolder``'s
convention, for models trained that way without class names).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

POLICIES = ("names", "sorted", "ignore")
_WNID = re.compile(r"^(n\d{8})\s+(.*)$")


def norm(label: str) -> str:
    """Case, spaces, hyphens and underscores do not distinguish labels."""
    return re.sub(r"[\s_\-]+", "", str(label)).casefold()


def group_spellings(raw: list[str]) -> tuple[list[str], list[int], str | None]:
    """Text labels grouped as :func:`norm` groups them: ``"Positive"``, ``"positive"`` and ``" positive"``
    are one class, as folder names are matched to model classes.

    Returns the class names (sorted by their normalised form, each shown with its first spelling in
    ``raw``, stripped), each row's class index, and one note naming the merged spellings (None when every class
    is spelled one way). Counting spellings as classes would split a class's examples and its accuracy.
    """
    first: dict[str, str] = {}
    spellings: dict[str, list[str]] = {}
    for v in raw:
        k = norm(v)
        first.setdefault(k, v.strip())
        if v not in spellings.setdefault(k, []):
            spellings[k].append(v)
    keys = sorted(first)
    names = [first[k] for k in keys]
    where = {k: i for i, k in enumerate(keys)}
    index = [where[norm(v)] for v in raw]
    merged = [spellings[k] for k in keys if len(spellings[k]) > 1]
    note = None
    if merged:
        shown = "; ".join(" = ".join(repr(s) for s in group) for group in merged[:4])
        more = f" and {len(merged) - 4} more" if len(merged) > 4 else ""
        note = (
            f"labels spelled differently are one class (case, spaces, hyphens and underscores are ignored): "
            f"{shown}{more}; each is shown by its first spelling"
        )
    return names, index, note


def read_class_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Class names in output order, and every alias of each, from ``--classes FILE``.

    Formats: a JSON list of names, a JSON object ``{"0": "cat", ...}``, or text with one class per
    line, where a line may hold several comma-separated names and may start with a WordNet id
    (``n01440764 tench, Tinca tinca``, the format of ImageNet's ``synset_words.txt``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SpecError(f"--classes file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"--classes {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(obj, dict):
            try:
                items = sorted((int(k), str(v)) for k, v in obj.items())
            except ValueError:
                raise SpecError(f"--classes {path}: a JSON object must map class indices to names") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise SpecError(f"--classes {path}: class indices must be 0..{len(items) - 1} without gaps")
            names = [v for _, v in items]
        elif isinstance(obj, list):
            names = [str(v) for v in obj]
        else:
            raise SpecError(f"--classes {path}: expected a JSON list of names or an object index -> name")
        return names, [[n] for n in names]
    names, aliases = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        al: list[str] = []
        m = _WNID.match(line)
        if m:
            al.append(m.group(1))
            line = m.group(2)
        parts = [s.strip() for s in line.split(",") if s.strip()]
        al = parts[:1] + al + parts[1:]
        names.append(al[0])
        aliases.append(al)
    if not names:
        raise SpecError(f"--classes {path} lists no classes")
    return names, aliases


@dataclass
class LabelMap:
    """``index[i]``: the model class of data class ``i`` (None: no match, only with ``--labels ignore``)."""

    index: list[int | None]
    how: list[str]  # per data class: "name", "alias", "index", "sorted" or "none"
    warnings: list[str] = field(default_factory=list)

    @property
    def unmatched(self) -> list[int]:
        return [i for i, j in enumerate(self.index) if j is None]


def map_labels(
    data_classes: list[str],
    model_classes: list[str] | None,
    n_outputs: int,
    *,
    aliases: list[list[str]] | None = None,
    present: list[int] | None = None,
    policy: str = "names",
    model_name: str = "the model",
) -> LabelMap:
    """Match the data's class names to the model's (see the module docstring).

    ``present``: the data classes that have examples (only those must match).
    """
    if policy not in POLICIES:
        raise SpecError(f"--labels must be one of {', '.join(POLICIES)}, got '{policy}'")
    present = list(range(len(data_classes))) if present is None else list(present)
    model_classes = list(model_classes or [str(i) for i in range(n_outputs)])
    if policy == "sorted":
        over = [data_classes[i] for i in present if i >= n_outputs]
        if over:
            raise SpecError(
                f"--labels sorted: the data has {len(data_classes)} classes but '{model_name}' outputs {n_outputs}"
            )
        return LabelMap(list(range(len(data_classes))), ["sorted"] * len(data_classes))
    lookup: dict[str, int] = {}
    alias_lookup: dict[str, int] = {}
    for j, name in enumerate(model_classes):
        lookup.setdefault(norm(name), j)
    for j, al in enumerate(aliases or []):
        for a in al:
            alias_lookup.setdefault(norm(a), j)
    index: list[int | None] = []
    how: list[str] = []
    for c in data_classes:
        k = norm(c)
        if k in lookup:
            index.append(lookup[k])
            how.append("name")
        elif k in alias_lookup:
            index.append(alias_lookup[k])
            how.append("alias")
        elif re.fullmatch(r"\d+", str(c).strip()) and int(c) < n_outputs:
            index.append(int(c))
            how.append("index")
        else:
            index.append(None)
            how.append("none")
    lm = LabelMap(index, how)
    bad = [data_classes[i] for i in present if index[i] is None]
    if bad:
        shown = ", ".join("'' (empty label cells)" if not str(b).strip() else f"'{b}'" for b in bad[:6]) + (
            f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        )
        examples = ", ".join(f"'{n}'" for n in model_classes[:5]) + (", ..." if len(model_classes) > 5 else "")
        generic = all(str(n) in (str(i), f"LABEL_{i}") for i, n in enumerate(model_classes))
        fix = (
            "give its class names with --classes FILE (one per line, in output order), or --labels sorted to use "
            "the sorted folder order as class indices (torchvision ImageFolder's convention)"
            if generic
            else "rename them to class names of the model, or give the names with --classes FILE"
        )
        matched = [f"'{data_classes[i]}'" for i in present if index[i] is not None]
        what = (
            f"'{model_name}' names its {n_outputs} classes only by their index (0 to {n_outputs - 1})"
            if generic
            else (f"'{model_name}' has classes {examples}")
        ) + (f" ({', '.join(matched[:3])}{', ...' if len(matched) > 3 else ''} matched)" if matched else "")
        msg = f"data labels {shown} match no class of the model: {what}; {fix}"
        if policy == "names":
            raise SpecError(msg + "; or pass --labels ignore to run without accuracy for them")
        lm.warnings.append(
            f"labels {shown} match no class of model '{model_name}': their examples are explained for the "
            f"predicted class and left out of the accuracy (--labels ignore)"
        )
    return lm
