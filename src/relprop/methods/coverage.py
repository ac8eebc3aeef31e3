"""Which rule every op of a model gets under a rule set, and what is not covered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..propagate import reachable
from ..rules.base import PreparedGraph
from ..rules.composites import Composite, GradientComposite, resolve_composite
from ..trace import record
from .core import Inputs, sources_of, split_inputs


@dataclass
class Coverage:
    """Per-op rule table. ``fraction`` = covered op calls / all op calls.

    A region node (several recorded ops the rules treat as one, e.g. GPT-2's written-out GELU) is one
    row under its region name; ``regions`` lists each distinct region with its inner ops
    (:meth:`relprop.graph.RegionOp.describe`), and ``total``/``covered`` count its inner ops, so the
    totals are recorded op calls whatever the rule set groups.
    """

    rows: list[tuple[str, int, str]]  # (op, count, rule)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (op, module)
    total: int = 0
    covered: int = 0
    regions: list[tuple[str, int, str]] = field(default_factory=list)  # (description, count, first module)

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 1.0

    def __str__(self) -> str:
        lines = [f"coverage {self.fraction:.1%} ({self.covered}/{self.total} op calls)"]
        for op, count, rule in self.rows:
            lines.append(f"  {count:6d}  {op:55s} {rule}")
        for op, module in self.unsupported:
            lines.append(f"  UNSUPPORTED {op} in '{module}'")
        if self.regions:
            lines.append("regions (several recorded ops, one rule):")
            for desc, count, module in self.regions:
                lines.append(f"  {count:6d}  {desc}  (e.g. in '{module}')")
        return "\n".join(lines)


def coverage(model: Any, inputs: Inputs, composite: str | Composite = "epsilon", **options: Any) -> Coverage:
    """Trace ``model`` on ``inputs`` and report the rule each op gets under ``composite``.

    Ops off every path from the inputs to the output (parameter transposes, mask construction)
    never carry relevance; they count as covered with rule ``constant``.
    """
    comp = GradientComposite() if composite == "gradient" else resolve_composite(composite, options)
    args, kwargs = split_inputs(inputs)
    return coverage_of(comp.prepare(record(model, args, kwargs)), comp)


def coverage_of(prepared: PreparedGraph, comp: Composite) -> Coverage:
    graph = prepared.graph
    sources = [s for _, src in sources_of(graph) for s in src]
    reach = reachable(graph, sources)
    table: Counter = Counter()
    unsupported = []
    covered = total = 0
    regions: dict[str, list] = {}
    for node in graph.nodes:
        calls = 1
        if node.region is not None:
            calls = len(node.region.nodes)
            regions.setdefault(node.region.describe(), [0, node.module])[0] += 1
        total += calls
        on_path = any(v.index in reach for v in node.inputs)
        if not on_path:
            rule_name = "constant"
        else:
            rule = comp.rule_for(prepared, node)
            rule_name = "UNSUPPORTED" if rule is None else repr(rule)
            if rule is None:
                unsupported.append((node.op_name, node.module))
        if rule_name != "UNSUPPORTED":
            covered += calls
        table[(node.op_name, rule_name)] += 1
    rows = sorted(((op, c, r) for (op, r), c in table.items()), key=lambda x: -x[1])
    region_rows = sorted(((d, c, m) for d, (c, m) in regions.items()), key=lambda x: (-x[1], x[0]))
    return Coverage(rows, unsupported, total, covered, region_rows)
