"""Replayed plans vs recording every batch vs a plain gradient, side by side in one process.

    python bench/bench_plan.py                       # ResNet-50 (batch 4, 160 px) + a small decoder, 2 threads
    python bench/bench_plan.py --batches 20 --clock cpu
    python bench/bench_plan.py --decoder 512,8,512   # the issue's Qwen2 size (hidden, layers, tokens)
    python bench/bench_plan.py --device cuda --models resnet50   # on a GPU (bench/gpu.sh)

For each model, N different batches of the same shape are explained; per batch, in turn (so load on
a shared machine hits all modes alike): a plain gradient (forward + backward with autograd),
``relprop.explain`` (records the batch), and ``plan.explain`` (replays the recording made once from the
first batch by ``relprop.plan``). Prints the median time per batch and the ratio to the gradient (and the minor
page faults per call: new large temporaries page-fault on CPU, where a gradient's backward reuses memory), where
the time goes (the gradient's forward and backward, the plan's replayed forward and the rest: preparation,
rule pass, attributions; each as a ratio to the whole gradient), plus the parts of one call: recording vs
replaying the forward, and a no-grad forward for scale.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

import relprop
from relprop.trace import record


def _table(
    title: str,
    rows: dict[str, list[float]],
    base: str,
    scale: list[float] | None = None,
    faults: dict[str, list[int]] | None = None,
) -> None:
    b = statistics.median(scale if scale is not None else rows[base])
    print(f"\n{title}")
    extra = f" {'page faults':>11s}" if faults else ""
    print(f"  {'mode':34s} {'median s':>9s} {'min s':>8s} {'x grad':>7s}{extra}")
    for label, ts in rows.items():
        m = statistics.median(ts)
        f = f" {statistics.median(faults[label]):11.0f}" if faults else ""
        print(f"  {label:34s} {m:9.4f} {min(ts):8.4f} {m / b:7.2f}{f}")


def _minor_faults() -> int:
    """Minor page faults of this process so far: a new large tensor's first touch costs one per page on CPU."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_SYNC = [lambda: None]  # torch.cuda.synchronize with --device cuda: time the queued kernels too


def _timed(fn, clock) -> float:
    t = clock()
    fn()
    _SYNC[0]()
    return clock() - t


def _run(title, model, batches, target, grad_fn, options, clock, parts_input) -> None:
    plan = relprop.plan(model, batches[0], target=target, **options)
    # Split of each call: the gradient's forward vs backward, the plan's replayed forward (signature check,
    # replay, graph instance) vs the rest (graph preparation, rule pass, collecting the attributions).
    split: dict[str, list[float]] = {"gradient: forward": [], "gradient: backward": [], "plan: replayed forward": []}
    graph_for = plan._graph_for

    def timed_graph_for(*a, **k):
        t = clock()
        g = graph_for(*a, **k)
        split["plan: replayed forward"].append(clock() - t)
        return g

    plan._graph_for = timed_graph_for  # type: ignore[method-assign]

    def gradient(b):
        t = clock()
        score, leaf = grad_fn(b)
        t1 = clock()
        torch.autograd.grad(score, leaf)
        _SYNC[0]()
        split["gradient: forward"].append(t1 - t)
        split["gradient: backward"].append(clock() - t1)

    modes = {
        "gradient (autograd fwd+bwd)": gradient,
        "relprop.explain (records)": lambda b: relprop.explain(model, b, target=target, **options),
        "plan.explain (replays)": lambda b: plan.explain(b),
    }
    for fn in modes.values():  # warm-up (allocator, oneDNN primitives)
        fn(batches[0])
    for v in split.values():
        v.clear()
    rows: dict[str, list[float]] = {k: [] for k in modes}
    faults: dict[str, list[int]] = {k: [] for k in modes}  # minor page faults per call (median printed)
    for b in batches[1:]:
        for label, fn in modes.items():
            f0 = _minor_faults()
            rows[label].append(_timed(lambda: fn(b), clock))
            faults[label].append(_minor_faults() - f0)
    assert plan.rerecords == 0, plan.last_reason
    title = f"{title}: {len(batches) - 1} batches after the first, {plan.replays} replays"
    _table(title, rows, next(iter(modes)), faults=faults)
    whole = rows["plan.explain (replays)"]
    split["plan: rules and the rest"] = [w - f for w, f in zip(whole, split["plan: replayed forward"])]
    _table(
        "  where the time goes (ratios to the whole gradient)",
        {**split},
        "gradient: forward",
        scale=rows[next(iter(modes))],
    )
    # The parts: what recording costs over a forward, and what a replay costs.
    if parts_input is None:
        return
    args, kwargs = parts_input
    mod = sys.modules["relprop.plan"]
    tpl = plan._template
    _, live = mod._signature(model, args, kwargs, None)
    parts = {"forward, no grad": [], "forward, autograd on": [], "record (trace)": [], "replay (plan)": []}
    grad_args = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in args)
    for _ in range(max(3, min(10, len(batches)))):
        with torch.no_grad():
            parts["forward, no grad"].append(_timed(lambda: model(*args, **kwargs), clock))
        parts["forward, autograd on"].append(_timed(lambda: model(*grad_args, **kwargs), clock))
        held: list = []
        parts["record (trace)"].append(_timed(lambda: held.append(record(model, args, kwargs)), clock))
        for v in held.pop().values:  # values and nodes form cycles: free the tape now, not at the next GC
            v.data = None
        parts["replay (plan)"].append(_timed(lambda: mod._replay(tpl, args, kwargs, live), clock))
    ops = len(tpl.graph.nodes)
    print(f"  parts of one call ({ops} recorded ops):")
    f = statistics.median(parts["forward, no grad"])
    for label, ts in parts.items():
        m = statistics.median(ts)
        print(f"    {label:32s} {m:9.4f} s   {(m - f) / ops * 1e6:7.1f} us/op over the forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10, help="batches per model (the first builds the plan)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=160, help="ResNet-50 image size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decoder", default="256,4,128", help="hidden,layers,tokens of the random-init Qwen2")
    ap.add_argument("--models", default="resnet50,decoder")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    ap.add_argument("--composite", default="epsilon", help="LRP composite for ResNet-50")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--no-parts", action="store_true", help="skip the parts of one call (record vs replay)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    device = torch.device(a.device)
    if device.type == "cuda":
        _SYNC[0] = lambda: torch.cuda.synchronize(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.clock} clock, {device}")
    torch.manual_seed(0)
    if "resnet50" in a.models:
        import torchvision

        model = torchvision.models.resnet50().eval().to(device)
        batches = [torch.randn(a.batch, 3, a.size, a.size, device=device) for _ in range(a.batches)]

        def grad(x):  # the forward of the gradient: (score, leaf); the bench times autograd.grad apart
            xx = x.clone().requires_grad_()
            return model(xx)[:, 1].sum(), xx

        _run(
            f"ResNet-50, batch {a.batch}, {a.size} px, LRP {a.composite}",
            model,
            batches,
            1,
            grad,
            {"method": "lrp", "composite": a.composite},
            clock,
            None if a.no_parts else ((batches[0],), {}),
        )
    if "decoder" in a.models:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        hidden, layers, tokens = (int(v) for v in a.decoder.split(","))
        cfg = Qwen2Config(
            vocab_size=1000,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            num_key_value_heads=max(1, hidden // 128),
            max_position_embeddings=max(tokens, 32),
            use_cache=False,
        )
        cfg._attn_implementation = "eager"
        model = Qwen2ForCausalLM(cfg).eval().to(device)
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, 1000, (1, tokens), generator=g).to(device)} for _ in range(a.batches)]

        def target(out):
            return out.logits[:, -1, 7]

        emb = model.get_input_embeddings()

        def grad(b):
            e = emb(b["input_ids"]).detach().requires_grad_()
            return target(model(inputs_embeds=e)).sum(), e

        _run(
            f"Qwen2 (random init, hidden {hidden}, {layers} layers, {tokens} tokens, eager), AttnLRP",
            model,
            batches,
            target,
            grad,
            {"method": "lrp", "composite": "attnlrp"},
            clock,
            None if a.no_parts else ((), batches[0]),
        )


if __name__ == "__main__":
    main()
