"""Rule sets ("composites"): which rule each node of a graph gets.

A composite maps op *families* to rules and can override by op, by module type, by module name
(glob patterns) and for the first linear layer, like Zennit's composites but at operation level,
so functional ops and any architecture are covered without per-model code. ``prepare`` applies
the graph passes the rule set needs (batch-norm merge, normaliser detection, CP-LRP marking) and
returns a per-call :class:`PreparedGraph`; ``rule_for(prepared, node)`` reads it. A composite holds
no per-call state, so one composite (and one recorded graph) can serve many calls and threads.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ..canonical import attention_weight_operands, merge_batch_norms, normalizer_operands
from ..graph import Graph, Node
from ..regions import find_elementwise_regions
from .attention import AttentionRule, SoftmaxRule
from .base import PreparedGraph, Rule
from .elementwise import Identity, Stop, Uniform
from .gradient import gradient_rule
from .linear import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus
from .normalization import ConstantScale, PassThrough, _is_eval_batch_norm
from .recurrent import Recurrent, recurrent_gate_operands
from .reduction import Proportional, SoftmaxShare
from .routing import Route

LINEAR_FAMILIES = ("conv", "dense")

#: User-registered rules: packet or op name -> rule (consulted by every composite after its own overrides).
_USER_RULES: dict[str, Rule] = {}


def register_rule(op: str, rule: Rule, family: str | None = None) -> None:
    """Register ``rule`` for ATen op ``op`` (packet name like ``'my_op'`` or ``'aten.my_op.default'``).

    With ``family=``, the op also joins that family, so every composite's family rule applies to it.
    """
    from .base import register_family

    _USER_RULES[op] = rule
    if family is not None:
        register_family(family, op.split(".")[1] if op.startswith("aten.") else op)


class Composite:
    """A rule set: family rules plus overrides.

    Args:
        families: family name -> rule.
        first: rule for the first linear (conv/dense) op touching the input (Zennit's ``first_map``).
        first_families: which families count as "first layer" candidates.
        ops: op packet (``'convolution'``) or full name (``'aten.convolution.default'``) -> rule.
        module_types: module class -> rule (or family -> rule dict) for the ops inside such modules.
        module_names: glob on module path (``'features.0'``, ``'encoder.layer.*.attention'``) -> rule.
        canonize: merge eval batch norms into the preceding linear op first.
        constant_attention: hold attention weights constant (CP-LRP).
        fallback: rule for ops no family knows (``None``: raise an error naming the op).
    """

    #: Seed and carry the relevance in float32 on a bfloat16/float16 model even where the seed is not the output
    #: (LRP's is, and is always widened): DeepLIFT's multipliers (:class:`relprop.rules.deeplift.DeepLiftComposite`).
    #: Read by :func:`relprop.methods.core.run_backward`.
    float32_relevance: bool = False

    def __init__(
        self,
        families: Mapping[str, Rule],
        *,
        first: Rule | None = None,
        first_families: tuple[str, ...] = LINEAR_FAMILIES,
        ops: Mapping[str, Rule] | None = None,
        module_types: Mapping[type, Any] | None = None,
        module_names: Mapping[str, Any] | None = None,
        canonize: bool = True,
        constant_attention: bool = False,
        fallback: Rule | None = None,
        name: str = "custom",
    ):
        self.families = dict(families)
        self.first = first
        self.first_families = first_families
        self.ops = dict(ops or {})
        self.module_types = dict(module_types or {})
        self.module_names = dict(module_names or {})
        self.canonize = canonize
        self.constant_attention = constant_attention
        self.fallback = fallback
        self.name = name

    # ------------------------------------------------------------------ graph
    def prepare(self, graph: Graph) -> PreparedGraph:
        """The graph passes this rule set needs, as a new :class:`PreparedGraph` for one call.

        The recorded ``graph`` is not modified (passes that change structure return a new graph;
        findings go into per-call notes), so one recording can be explained with several rule sets,
        and a composite holds no state between calls (safe to share between threads).
        """
        if self.canonize:
            graph = merge_batch_norms(graph)
        graph = find_elementwise_regions(graph, keep_ops=(*self.ops, *_USER_RULES))  # one nonlinearity each
        constant = recurrent_gate_operands(graph, normalizer_operands(graph))
        if self.constant_attention:
            constant = attention_weight_operands(graph, constant)
        prepared = PreparedGraph.plain(graph, constant)
        if self.first is not None:
            for node in graph.nodes:
                fam = prepared.notes_of(node).family
                if fam == "recurrent" and "dense" in self.first_families:  # a fused RNN layer is a dense layer
                    fam = "dense"
                if fam in self.first_families and node.activation_inputs():
                    prepared = replace(prepared, first_node=node.index)
                    break
        return prepared

    def resolver(self, prepared: PreparedGraph) -> Callable[[Node], Rule | None]:
        """``node -> rule`` for :func:`relprop.propagate`, bound to one prepared graph."""
        return partial(self.rule_for, prepared)

    # ------------------------------------------------------------------ rules
    def _scoped(self, node: Node, spec: Any, fam: str | None) -> Rule | None:
        if isinstance(spec, Mapping):
            return spec.get(fam)
        return spec if fam in LINEAR_FAMILIES else None

    def rule_for(self, prepared: PreparedGraph, node: Node) -> Rule | None:
        """The rule ``node`` of ``prepared`` gets (``None``: no rule, the propagation raises NoRuleError).

        Precedence: module-name globs, module types, ``ops``, rules registered with
        :func:`register_rule`, the first-layer rule, the family rules, the fallback.
        """
        fam = prepared.notes_of(node).family
        for pattern, spec in self.module_names.items():
            if node.module and fnmatch.fnmatchcase(node.module, pattern):
                rule = self._scoped(node, spec, fam)
                if rule is not None:
                    return rule
        if self.module_types and node.module_type is not None:
            for mtype, spec in self.module_types.items():
                if issubclass(node.module_type, mtype):
                    rule = self._scoped(node, spec, fam)
                    if rule is not None:
                        return rule
        rule = self.ops.get(node.op_name) or self.ops.get(node.packet)
        if rule is None:
            rule = _USER_RULES.get(node.op_name) or _USER_RULES.get(node.packet)
        if rule is not None:
            return rule
        if prepared.first_node is not None and node.index == prepared.first_node:
            with_first = getattr(self.families.get(fam), "with_first", None) if fam == "recurrent" else None
            return with_first(self.first) if with_first is not None else self.first
        if fam is None:
            return self.fallback
        return self.families.get(fam, self.fallback)

    def describe(self, prepared: PreparedGraph, node: Node) -> str:
        rule = self.rule_for(prepared, node)
        return "none" if rule is None else repr(rule)

    def __repr__(self) -> str:
        return f"Composite({self.name!r})"


class _Gradient:
    def __call__(self, ctx):
        return gradient_rule(ctx)

    def __repr__(self) -> str:
        return "Gradient()"


GRADIENT = _Gradient()


class GradientComposite(Composite):
    """Every op's exact VJP (no canonization: the gradient must equal autograd's).

    Modified-gradient methods (guided backprop, deconvnet, DeepLIFT) are this composite with
    ``ops``/``families`` overrides for the ops they treat differently.
    """

    def __init__(
        self, families: Mapping[str, Rule] | None = None, ops: Mapping[str, Rule] | None = None, name: str = "gradient"
    ):
        super().__init__(dict(families or {}), ops=ops, canonize=False, name=name)

    def prepare(self, graph: Graph) -> PreparedGraph:
        """No graph pass (the gradient must be autograd's): the recording with each node's family."""
        return PreparedGraph.plain(graph)

    def rule_for(self, prepared: PreparedGraph, node: Node) -> Rule | None:
        """``ops`` overrides, then ``families`` overrides, else the exact VJP.

        Unlike LRP composites, rules registered with :func:`register_rule` do not apply: a gradient
        method computes the gradient, whatever rule an op has for LRP.
        """
        rule = self.ops.get(node.op_name) or self.ops.get(node.packet)
        if rule is None and self.families:
            family = prepared.notes_of(node).family
            rule = self.families.get(family) if family is not None else None
        return rule or GRADIENT


def _norm_rule(stabilizer: float, batch_norm: Rule) -> Rule:
    """Layer/group/RMS norms get the constant-scale rule; a batch norm that could not be merged ``batch_norm``."""
    const = ConstantScale(stabilizer)

    def rule(ctx):
        return (batch_norm if _is_eval_batch_norm(ctx.node) else const)(ctx)

    return _Named(rule, f"Norm(batch_norm={batch_norm!r})")


class _Named:
    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, ctx):
        return self.fn(ctx)

    def __repr__(self) -> str:
        return self.name


def base_families(stabilizer: float = 1e-6, batch_norm: Rule | None = None) -> dict[str, Rule]:
    """Rules shared by all LRP composites for the non-linear families."""
    return {
        "sum": Proportional(stabilizer),
        "product": Uniform(0.0),
        "nonlinear": Identity(),
        "softmax": SoftmaxRule(),
        "smoothmax": SoftmaxShare(),
        "norm": _norm_rule(0.0, batch_norm or PassThrough()),
        "routing": Route(),
        "attention": AttentionRule(),
        "stop": Stop(),
        "recurrent": Recurrent(stabilizer=stabilizer, epsilon=stabilizer),
    }


def _lrp(
    linear: Rule,
    conv: Rule | None = None,
    *,
    first: Rule | None = None,
    first_families: tuple[str, ...] = LINEAR_FAMILIES,
    stabilizer: float = 1e-6,
    name: str,
    constant_attention: bool = False,
    **kw,
) -> Composite:
    fam = base_families(stabilizer)
    fam["dense"] = linear
    fam["conv"] = conv or linear
    fam["recurrent"] = Recurrent(linear, stabilizer)  # a fused RNN kernel's linear parts get the dense rule
    if constant_attention:
        fam["attention"] = AttentionRule(constant_weights=True)
    return Composite(
        fam, first=first, first_families=first_families, name=name, constant_attention=constant_attention, **kw
    )


def named_composite(
    name: str,
    *,
    epsilon: float | None = None,
    stabilizer: float = 1e-6,
    gamma: float = 0.25,
    low: float | torch.Tensor = -3.0,
    high: float | torch.Tensor = 3.0,
    alpha: float = 2.0,
    beta: float = 1.0,
    **overrides: Any,
) -> Composite:
    """Build a named composite; parameters are the keyword options of :func:`relprop.explain`."""
    attn_eps = 0.0 if epsilon is None else epsilon
    epsilon = 1e-6 if epsilon is None else epsilon
    eps = Epsilon(epsilon)
    builders: dict[str, Callable[[], Composite]] = {
        "epsilon": lambda: _lrp(eps, name=name, stabilizer=stabilizer, **overrides),
        "lrp0": lambda: _lrp(Epsilon(0.0), name=name, stabilizer=0.0, **overrides),
        "gamma": lambda: _lrp(Gamma(gamma, stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "zplus": lambda: _lrp(ZPlus(stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "alpha_beta": lambda: _lrp(AlphaBeta(alpha, beta, stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "flat": lambda: _lrp(Flat(stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "wsquare": lambda: _lrp(WSquare(stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "epsilon_plus": lambda: _lrp(eps, ZPlus(stabilizer), name=name, stabilizer=stabilizer, **overrides),
        "epsilon_plus_flat": lambda: _lrp(
            eps, ZPlus(stabilizer), first=Flat(stabilizer), name=name, stabilizer=stabilizer, **overrides
        ),
        "epsilon_gamma_box": lambda: _lrp(
            eps,
            Gamma(gamma, stabilizer),
            first=ZBox(low, high, stabilizer),
            first_families=("conv",),
            name=name,
            stabilizer=stabilizer,
            **overrides,
        ),
        "epsilon_alpha2_beta1": lambda: _lrp(
            eps, AlphaBeta(2.0, 1.0, stabilizer), name=name, stabilizer=stabilizer, **overrides
        ),
        "epsilon_alpha2_beta1_flat": lambda: _lrp(
            eps, AlphaBeta(2.0, 1.0, stabilizer), first=Flat(stabilizer), name=name, stabilizer=stabilizer, **overrides
        ),
        "attnlrp": lambda: _attnlrp(name, attn_eps, cp=False, **overrides),
        "cp_lrp": lambda: _attnlrp(name, attn_eps, cp=True, **overrides),
    }
    if name not in builders:
        import difflib

        close = difflib.get_close_matches(name, builders, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown composite '{name}'. Available: {', '.join(sorted(builders))}.{hint}")
    return builders[name]()


def _attnlrp(name: str, epsilon: float, cp: bool, **overrides: Any) -> Composite:
    """AttnLRP (Achtibat et al. 2024) as LXT computes it: LRP-0/epsilon on linear ops, identity on
    nonlinearities, uniform rule on products, softmax rule, norms with constant scale."""
    fam = base_families(0.0, batch_norm=ConstantScale(0.0))
    fam["dense"] = fam["conv"] = Epsilon(epsilon)
    fam["sum"] = Proportional(0.0)
    fam["attention"] = AttentionRule(epsilon, constant_weights=cp)
    fam["recurrent"] = Recurrent(fam["dense"], 0.0)
    return Composite(fam, name=name, constant_attention=cp, canonize=False, **overrides)


NAMES = (
    "epsilon",
    "lrp0",
    "gamma",
    "zplus",
    "alpha_beta",
    "flat",
    "wsquare",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "attnlrp",
    "cp_lrp",
)


class WarningFallback:
    """A declared fallback for ops without a rule: applies ``rule`` and warns once per op."""

    def __init__(self, rule: Rule, name: str):
        self.rule, self.name = rule, name
        self._warned: set[str] = set()

    def __call__(self, ctx):
        node = ctx.node
        if node.op_name not in self._warned:
            self._warned.add(node.op_name)
            warnings.warn(
                f"relprop: no rule for {node.op_name} (module '{node.module}'); using the declared "
                f"fallback '{self.name}'",
                stacklevel=2,
            )
        return self.rule(ctx)

    def __repr__(self) -> str:
        return f"Fallback({self.name})"


FALLBACKS: dict[str, Rule] = {"gradient": GRADIENT, "identity": Identity()}


def resolve_composite(composite: str | Composite | None, options: dict[str, Any]) -> Composite:
    """``explain``'s ``composite=`` argument (name or object) plus its keyword options.

    ``fallback=`` (``'gradient'`` or ``'identity'``) opts into a warned rule for ops without one;
    ``rules=`` maps op names to rules for this call only.
    """
    options = dict(options)
    fallback = options.pop("fallback", None)
    rules = options.pop("rules", None)
    if isinstance(composite, Composite):
        if options:
            raise ValueError(f"options {sorted(options)} only apply to named composites")
        comp = copy.copy(composite)
        comp.ops = dict(composite.ops)
    else:
        name = composite or "epsilon"
        if not isinstance(name, str):
            raise ValueError(f"composite: expected a name or a relprop.Composite, got {type(name).__name__}")
        try:
            comp = named_composite(name, **options)
        except TypeError as e:
            raise ValueError(f"bad option for composite '{name}': {e}") from None
    if fallback is not None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback: expected one of {sorted(FALLBACKS)}, got {fallback!r}")
        comp.fallback = WarningFallback(FALLBACKS[fallback], fallback)
    if rules:
        comp.ops.update(rules)
    return comp
