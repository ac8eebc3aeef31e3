"""Which rule every op of a model gets under a rule set, and what is not covered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..graph import Graph
from ..propagate import reachable
from ..rules.composites import Composite, GradientComposite, resolve_composite
from ..trace import record
from .core import Inputs, sources_of, split_inputs


@dataclass
class Coverage:
    """Per-op rule table. ``fraction`` = covered op calls / all op calls."""

    rows: list[tuple[str, int, str]]  # (op, count, rule)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (op, module)
    total: int = 0
    covered: int = 0

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 1.0

    def __str__(self) -> str:
        lines = [f"coverage {self.fraction:.1%} ({self.covered}/{self.total} op calls)"]
        for op, count, rule in self.rows:
            lines.append(f"  {count:6d}  {op:55s} {rule}")
        for op, module in self.unsupported:
            lines.append(f"  UNSUPPORTED {op} in '{module}'")
        return "\n".join(lines)


def coverage(model: Any, inputs: Inputs, composite: str | Composite = "epsilon", **options: Any) -> Coverage:
    """Trace ``model`` on ``inputs`` and report the rule each op gets under ``composite``.

    Ops off every path from the inputs to the output (parameter transposes, mask construction)
    never carry relevance; they count as covered with rule ``constant``.
    """
    comp = GradientComposite() if composite == "gradient" else resolve_composite(composite, options)
    args, kwargs = split_inputs(inputs)
    graph = comp.prepare(record(model, args, kwargs))
    return coverage_of(graph, comp)


def coverage_of(graph: Graph, comp: Composite) -> Coverage:
    sources = [s for _, src in sources_of(graph) for s in src]
    reach = reachable(graph, sources)
    table: Counter = Counter()
    unsupported = []
    covered = 0
    for node in graph.nodes:
        on_path = any(v.index in reach for v in node.inputs)
        if not on_path:
            rule_name = "constant"
        else:
            rule = comp.rule_for(node)
            rule_name = "UNSUPPORTED" if rule is None else repr(rule)
            if rule is None:
                unsupported.append((node.op_name, node.module))
        if rule_name != "UNSUPPORTED":
            covered += 1
        table[(node.op_name, rule_name)] += 1
    rows = sorted(((op, c, r) for (op, r), c in table.items()), key=lambda x: -x[1])
    return Coverage(rows, unsupported, len(graph.nodes), covered)
