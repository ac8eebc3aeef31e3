"""AttnLRP on a decoder: relprop (recording, and replayed from a plan) vs LXT vs a plain gradient.

Runs in LXT's environment (LXT 2.x patches transformers 4.52's modules) with relprop importable:

    PYTHONPATH=src .venv-lxt/bin/python bench/bench_lxt_decoder.py                  # Qwen2 512 x 8, 512 tokens
    PYTHONPATH=src .venv-lxt/bin/python bench/bench_lxt_decoder.py --tokens 2048 --runs 2

Each (mode, run) is a fresh process (LXT's patch is process-wide; peak RSS is per process), modes
alternated run after run, so load on a shared machine hits them alike. In each process: the same
random-init Qwen2 (eager attention, float32), one warm-up batch, then --batches batches of random
tokens, each explained for the last position's logit 7; it prints the median seconds per batch and
the process's peak RSS. The table shows medians over runs and ratios to the gradient and to LXT.
Modes: ``gradient`` (forward + backward to the input embeddings, unpatched model), ``lxt`` (LXT's
efficient AttnLRP: patched model, gradient x input), ``relprop`` (``relprop.explain(...,
composite="attnlrp")``, records every batch), ``plan`` (``relprop.plan``: records the first batch,
replays the next ones).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("gradient", "lxt", "relprop", "plan")


def _model(a, patch: bool):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if patch:
        from lxt.efficient import monkey_patch
        from lxt.efficient.models.qwen2 import attnLRP
        from transformers.models.qwen2 import modeling_qwen2

        monkey_patch(modeling_qwen2, attnLRP)
    cfg = Qwen2Config(
        vocab_size=1000,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 3,
        num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64),
        num_key_value_heads=max(1, a.hidden // 128),
        max_position_embeddings=max(a.tokens, 32),
        use_cache=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def child(a) -> None:
    """One process, one mode: prints {"seconds": [...], "peak_rss_mib": ...} as JSON."""
    import torch

    torch.set_num_threads(a.threads)
    model = _model(a, patch=a.mode == "lxt")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1000, (1, a.tokens), generator=g) for _ in range(a.batches + 1)]
    emb = model.get_input_embeddings()

    def target(out):
        return out.logits[:, -1, 7]

    if a.mode in ("gradient", "lxt"):

        def run(ids):
            e = emb(ids).detach().requires_grad_()
            score = target(model(inputs_embeds=e))
            (grad,) = torch.autograd.grad(score.sum(), e)
            return (e * grad).sum(-1) if a.mode == "lxt" else grad

    else:
        import relprop

        if a.mode == "plan":  # (only there: a plan records at once, which would count in relprop's peak)
            plan = relprop.plan(model, {"input_ids": batches[0]}, target=target, method="lrp", composite="attnlrp")

        def run(ids):
            if a.mode == "plan":
                return plan.explain({"input_ids": ids})
            return relprop.explain(model, {"input_ids": ids}, target=target, method="lrp", composite="attnlrp")

    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    run(batches[0])  # warm-up (and the plan's recording)
    seconds = []
    for ids in batches[1:]:
        t = clock()
        run(ids)
        seconds.append(clock() - t)
    if a.mode == "plan" and plan.rerecords:
        raise SystemExit(f"the plan recorded again: {plan.last_reason}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per process (after one warm-up)")
    ap.add_argument("--runs", type=int, default=3, help="processes per mode, alternated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time (steadier on a loaded machine; use with --threads 1)",
    )
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # a child process
    a = ap.parse_args()
    if a.mode:
        child(a)
        return
    modes = a.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.runs):
        for m in modes:
            cmd = [sys.executable, __file__, "--mode", m] + [
                f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "tokens", "batches", "threads", "clock")
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[m].append(res)
            print(
                f"run {r + 1} {m:9s} median {statistics.median(res['seconds']):.3f} s  peak RSS {res['peak_rss_mib']:.0f} MiB"
            )
    import torch

    print(
        f"\nQwen2 random init, hidden {a.hidden}, {a.layers} layers, {a.tokens} tokens, eager attention, float32; "
        f"torch {torch.__version__}, {a.threads} threads, {a.clock} clock; {a.runs} processes per mode x {a.batches} batches"
    )
    t = {m: statistics.median(statistics.median(x["seconds"]) for x in results[m]) for m in modes}
    rss = {m: statistics.median(x["peak_rss_mib"] for x in results[m]) for m in modes}
    print(f"  {'mode':10s} {'s/batch':>8s} {'x grad':>7s} {'x LXT':>6s} {'peak RSS MiB':>13s} {'x grad':>7s}")
    for m in modes:
        vs_grad = f"{t[m] / t['gradient']:7.2f}" if "gradient" in t else "      -"
        vs_lxt = f"{t[m] / t['lxt']:6.2f}" if "lxt" in t else "     -"
        rss_grad = f"{rss[m] / rss['gradient']:7.2f}" if "gradient" in rss else "      -"
        print(f"  {m:10s} {t[m]:8.3f} {vs_grad} {vs_lxt} {rss[m]:13.0f} {rss_grad}")


if __name__ == "__main__":
    main()
