"""The ``relprop`` command: explain one input, or compare how several models explain a dataset.

Run ``relprop --help``, ``relprop explain --help`` or ``relprop compare --help`` for examples.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from pathlib import Path

from .specs import SpecError

EXAMPLES = """\
examples:
  relprop compare                                   # the embedded default: 4 zoo models on zoo:digits
  relprop compare --models zoo:resnet_digits,zoo:vit_digits --methods lrp,integrated_gradients --out report
  relprop compare --models timm:resnet18 --weights r18.pth --data photos/ --out report   # photos/CLASS/*.jpg
  relprop compare --models hf:./my-bert --data reviews.csv --methods lrp,input_x_gradient
  relprop explain --model zoo:resnet_digits --input digit.png --method lrp,gradient --out heatmap.png
  relprop explain --model zoo:minilm-similarity --input "A man plays a guitar." --reference "Someone makes music."
  relprop list                                      # zoo models, datasets and methods

model specs:  zoo:NAME | torchvision:NAME [--weights FILE] | timm:NAME [--weights FILE] | hf:FOLDER |
              python:MODULE:FUNCTION | FILE.pt (torch.save(model)) | FILE.safetensors (+ FILE.json, zoo format)
data specs:   zoo:NAME | FOLDER with one sub-folder of images per class | FILE.csv / FILE.jsonl (text, label)
method specs: NAME[:KEY=VALUE...], e.g. lrp, lrp:composite=epsilon, integrated_gradients:n_steps=32
"""

COMPARE_EXAMPLES = """\
examples:
  relprop compare                              # zoo.DEFAULT_MODELS on zoo:digits, default methods, ./relprop-report
  relprop compare --models zoo:resnet_digits,zoo:vgg_digits --methods lrp,saliency --samples 16 --out r
  relprop compare --models timm:resnet18,torchvision:resnet18 --weights timm:resnet18=r18_timm.pth \\
                  --weights torchvision:resnet18=r18_tv.pth --data photos/ --out r
  relprop compare --models hf:./bert-sst2 --data reviews.jsonl --text-column sentence --label-column label

The report is OUT/index.html (open it in a browser) and OUT/results.json. Finished model x method cells are
cached in OUT/cache and reused when the same command runs again; Ctrl-C keeps them (re-run to continue).
"""

EXPLAIN_EXAMPLES = """\
examples:
  relprop explain --model zoo:resnet_digits --input digit.png --method lrp --out heatmap.png
  relprop explain --model zoo:vit_digits --input digit.png --method lrp,integrated_gradients --target 3
  relprop explain --model timm:resnet18 --weights r18.pth --input cat.jpg --method lrp:composite=epsilon_plus_flat
  relprop explain --model hf:./bert-sst2 --input "a gripping, moving film" --method lrp --out tokens.html
  relprop explain --model zoo:minilm-similarity --input "A man plays a guitar." --reference "Someone makes music."
"""


class CLIError(SpecError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as argparse does, plus where to look
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=110)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="relprop",
        formatter_class=_formatter,
        description="Explain the predictions of PyTorch models and compare how faithfully they are explained.",
        epilog=EXAMPLES,
    )
    sub = p.add_subparsers(dest="command", metavar="{explain,compare,list}", parser_class=_Parser)

    # compare ---------------------------------------------------------------------------------------------
    c = sub.add_parser(
        "compare",
        help="every model x method over a dataset, into an HTML report",
        formatter_class=_formatter,
        epilog=COMPARE_EXAMPLES,
        description="Explain every model with every method on a dataset; compute each model's accuracy "
        "and each method's faithfulness (ABPC, insertion/deletion), class sensitivity and the "
        "randomisation sanity check; write OUT/index.html and OUT/results.json.",
    )
    c.add_argument(
        "--models",
        action="append",
        metavar="M1,M2,...",
        help="model specs, comma-separated (default: relprop.zoo.DEFAULT_MODELS)",
    )
    c.add_argument("--model", dest="models", action="append", help=argparse.SUPPRESS)
    c.add_argument("--data", metavar="D", help="data spec (default: zoo:DEFAULT_DATASET, i.e. zoo:digits)")
    c.add_argument(
        "--methods",
        metavar="A,B,...",
        help="method specs, comma-separated (default: lrp, saliency or "
        "gradient, input_x_gradient, integrated_gradients)",
    )
    c.add_argument("--out", default="relprop-report", metavar="DIR", help="report folder (default: %(default)s)")
    c.add_argument(
        "--samples", type=int, default=64, metavar="N", help="examples per model for the metrics (default: 64)"
    )
    c.add_argument("--grid", type=int, default=8, metavar="N", help="examples in the heatmap grid (default: 8)")
    c.add_argument(
        "--target",
        choices=("pred", "label"),
        default="pred",
        help="explain the predicted class or the true label (default: pred)",
    )
    c.add_argument(
        "--regions", type=int, default=32, metavar="N", help="patches replaced in the ABPC curves (default: 32 of 8x8)"
    )
    c.add_argument(
        "--steps", type=int, default=16, metavar="N", help="points of the insertion/deletion curves (default: 16)"
    )
    c.add_argument(
        "--patch-grid",
        type=int,
        default=8,
        metavar="N",
        help="images are split into N x N patches for the perturbation metrics (default: 8)",
    )
    c.add_argument(
        "--sensitivity-samples",
        type=int,
        default=16,
        metavar="N",
        help="examples for class sensitivity (default: 16; 0: skip)",
    )
    c.add_argument(
        "--randomisation-samples",
        type=int,
        default=4,
        metavar="N",
        help="examples for the randomisation check (default: 4; 0: skip)",
    )
    c.add_argument(
        "--randomisation-layers",
        type=int,
        default=3,
        metavar="N",
        help="top layers randomised, one after another (default: 3)",
    )
    c.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per explain call (default: 32)")
    c.add_argument("--force", action="store_true", help="recompute every cell (ignore OUT/cache)")
    _common(c)
    c.set_defaults(func=cmd_compare)

    # explain ---------------------------------------------------------------------------------------------
    e = sub.add_parser(
        "explain",
        help="explain one input (image file or text) with one or more methods",
        formatter_class=_formatter,
        epilog=EXPLAIN_EXAMPLES,
        description="Explain one model's prediction on one input; print the prediction and save the "
        "heatmaps (PNG), or token scores (HTML or PNG) for text models.",
    )
    e.add_argument("--model", required=True, metavar="M", help="model spec (see relprop --help)")
    e.add_argument("--input", required=True, metavar="FILE|TEXT", help="an image file, or a text for text models")
    e.add_argument("--reference", metavar="TEXT", help="sentence B for zoo:minilm-similarity")
    e.add_argument(
        "--method",
        "--methods",
        dest="methods",
        default="lrp",
        metavar="A,B,...",
        help="method spec(s), comma-separated (default: lrp)",
    )
    e.add_argument("--target", metavar="K", help="class index or class name to explain (default: the prediction)")
    e.add_argument("--out", metavar="FILE", help="heatmap.png (images) or tokens.html / tokens.png (text)")
    e.add_argument(
        "--top", type=int, default=5, metavar="K", help="classes printed with their probability (default: 5)"
    )
    _common(e)
    e.set_defaults(func=cmd_explain)

    lst = sub.add_parser("list", help="zoo models, zoo datasets and methods", formatter_class=_formatter)
    lst.set_defaults(func=cmd_list)
    return p


def _common(p):
    g = p.add_argument_group("model and preprocessing options")
    g.add_argument(
        "--weights",
        action="append",
        metavar="[SPEC=]FILE",
        help="weights for torchvision:/timm: models (.pth/.pt/.safetensors state dict); SPEC=FILE for one "
        "model of several",
    )
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size when it cannot be read from --weights")
    g.add_argument(
        "--composite",
        default="auto",
        metavar="NAME",
        help="LRP composite (default: auto = attnlrp for transformers, else epsilon_plus_flat)",
    )
    g.add_argument(
        "--image-size", type=int, nargs="+", metavar="H [W]", help="resize images (overrides the model's config)"
    )
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    g.add_argument("--split", default="test", help="split of a zoo dataset (default: test)")
    g.add_argument("--text-column", default="text", help="text column of a CSV/JSONL (default: text)")
    g.add_argument("--label-column", default="label", help="label column of a CSV/JSONL (default: label)")
    g.add_argument("--seed", type=int, default=0, help="sample selection and randomisation seed (default: 0)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------- helpers
def _need_report_deps(*mods: str) -> None:
    for mod in mods:
        try:
            __import__(mod)
        except ImportError:
            raise CLIError(
                f"this command needs '{mod}'; install the report extra: pip install 'relprop[report]'"
            ) from None


def _split(values) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v.strip() for chunk in values for v in chunk.split(",") if v.strip()]


def default_methods() -> list[str]:
    """lrp, saliency (or gradient), input_x_gradient, integrated_gradients: those registered right now."""
    import relprop

    have = relprop.METHODS
    wanted = ["lrp", "saliency" if "saliency" in have else "gradient", "input_x_gradient", "integrated_gradients"]
    return [m for m in wanted if m in have]


def parse_methods(text: str | None):
    import relprop

    from .report.compare import MethodSpec

    specs = [MethodSpec.parse(t) for t in (_split(text) or default_methods())]
    for s in specs:
        if s.name not in relprop.METHODS:
            names = sorted(relprop.METHODS)
            close = difflib.get_close_matches(s.name, names, n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"unknown method '{s.name}'.{hint} Available: {', '.join(names)}")
    labels = [s.label for s in specs]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise CLIError(f"method given twice: {', '.join(sorted(dup))}")
    return specs


def _weights_map(values, models: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    plain = []
    for v in values or []:
        spec, sep, file = v.rpartition("=")
        if sep and spec:
            if spec not in models:
                raise CLIError(f"--weights {v}: '{spec}' is not one of the models ({', '.join(models)})")
            out[spec] = file
        else:
            plain.append(v)
    if plain:
        need = [m for m in models if m.split(":", 1)[0] in ("timm", "torchvision") and m not in out]
        if len(plain) > 1 or (len(need) > 1 and len(models) > 1):
            raise CLIError("several models need weights: give each as --weights SPEC=FILE")
        for m in need or models:
            out.setdefault(m, plain[0])
    for m, f in out.items():
        if not Path(f).expanduser().exists():
            raise CLIError(f"weights file not found: {f}")
    return out


def _preprocess_overrides(args) -> dict:
    if args.image_size and len(args.image_size) > 2:
        raise CLIError("--image-size takes H or H W")
    return {"image_size": args.image_size, "mean": args.mean, "std": args.std, "channels": args.channels}


def _positive(args, *names):
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 0:
            raise CLIError(f"--{n.replace('_', '-')} must be >= 0, got {v}")
    for n in ("samples", "batch_size", "regions", "steps", "patch_grid"):
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise CLIError(f"--{n.replace('_', '-')} must be at least 1, got {v}")


# ------------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    _need_report_deps("matplotlib", "safetensors")
    from . import zoo
    from .report import Settings, run_compare
    from .specs import check_model_spec, load_data

    _positive(args, "grid", "sensitivity_samples", "randomisation_samples", "randomisation_layers")
    models = _split(args.models) or [f"zoo:{m}" for m in zoo.DEFAULT_MODELS]
    if len(set(models)) != len(models):
        raise CLIError("a model is given twice in --models")
    methods = parse_methods(args.methods)
    weights = _weights_map(args.weights, models)
    for m in models:
        check_model_spec(m, weights.get(m))
    data = load_data(
        args.data or f"zoo:{zoo.DEFAULT_DATASET}",
        split=args.split,
        text_column=args.text_column,
        label_column=args.label_column,
    )
    if len(data) == 0:
        raise CLIError(f"data {data.spec} is empty")
    settings = Settings(
        samples=args.samples,
        grid=args.grid,
        target=args.target,
        patch_grid=args.patch_grid,
        regions=args.regions,
        steps=args.steps,
        sensitivity_samples=args.sensitivity_samples,
        randomisation_samples=args.randomisation_samples,
        randomisation_layers=args.randomisation_layers,
        batch_size=args.batch_size,
        composite=args.composite,
        seed=args.seed,
        randomisation=args.randomisation_samples > 0,
        sensitivity=args.sensitivity_samples > 0,
    )
    out = Path(args.out)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    header = (
        f"relprop compare: {len(models)} model(s) x {len(methods)} method(s) on {data.spec} "
        f"({len(data)} examples) -> {out}/index.html"
    )
    command = "relprop " + " ".join(shlex.quote(a) for a in (args._argv or ["compare"]))
    res = run_compare(
        models,
        data,
        methods,
        out,
        settings,
        weights=weights,
        num_classes=args.num_classes,
        preprocess_overrides=_preprocess_overrides(args),
        force=args.force,
        progress=not args.quiet and sys.stderr.isatty() or bool(os.environ.get("RELPROP_PROGRESS")),
        command=command,
        log=log,
        header=header,
    )
    reused = sum(1 for m in res["models"] for c in m.get("methods", []) if c.get("reused"))
    print(
        f"report: {out / 'index.html'}  ({res['cells_done']}/{res['cells_total']} cells, {reused} reused, "
        f"{res['seconds']:.0f} s)"
    )
    for r in res["ranking"]:
        faith = "–" if r["faithfulness"] is None else f"{r['faithfulness']:.3f}"
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"  {r['rank'] or '-'}. {r['name']:<24} faithfulness {faith}  accuracy {acc}")
    if res["status"] != "complete":
        print(
            f"interrupted: finished cells are kept in {out / 'cache'}; run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    return 0


# ------------------------------------------------------------------------------------------- explain
def _resolve_target(target: str | None, model, pred: int, n: int) -> int:
    if target is None:
        return pred
    names = model.class_names or []
    try:
        k = int(target)
    except ValueError:
        if target in names:
            return names.index(target)
        close = difflib.get_close_matches(target, names, n=1)
        raise CLIError(
            f"--target '{target}' is not a class index or class name of '{model.name}'"
            + (f". Did you mean '{close[0]}'?" if close else "")
        ) from None
    if not 0 <= k < n:
        raise CLIError(f"--target {k} is out of range: model '{model.name}' has {n} classes (0..{n - 1})")
    return k


def cmd_explain(args) -> int:
    import torch

    import relprop

    from .specs import check_forward, image_batch, load_model, override_preprocess, read_image, text_batch

    methods = parse_methods(args.methods)
    weights = _weights_map(args.weights, [args.model])
    model = load_model(args.model, weights=weights.get(args.model), num_classes=args.num_classes)
    if model.kind == "image":
        _need_report_deps("matplotlib", "PIL")
        path = Path(args.input).expanduser()
        if not path.exists():
            raise CLIError(f"input file not found: {args.input}")
        if path.is_dir():
            raise CLIError(f"--input {args.input} is a folder; give one image file (compare takes folders as --data)")
        model.preprocess = override_preprocess(model.preprocess, **_preprocess_overrides(args))
        x, disp = image_batch(model, [read_image(path)])
        inputs = x
    else:
        text = args.input
        if Path(text).is_file() and Path(text).suffix.lower() in (".txt", ".md"):
            text = Path(text).read_text(encoding="utf-8").strip()
        if model.kind == "similarity":
            if not args.reference:
                raise CLIError(f"{args.model} compares two sentences: give sentence B with --reference TEXT")
            from .zoo.text import SentenceSimilarity

            model.module = SentenceSimilarity.from_sentence(model.module, model.tokenizer, args.reference)
        inputs = text_batch(model, [text], max_length=512)
    out = check_forward(model, inputs)
    if model.kind == "similarity":
        print(f"similarity of A to B: {float(out[0]):.4f} (cosine of mean-pooled all-MiniLM-L6-v2 embeddings)")
        target = lambda o: o.reshape(-1)  # noqa: E731
        target_desc = "similarity"
    else:
        probs = torch.softmax(out[0].float(), -1)
        pred = int(probs.argmax())
        n = probs.shape[0]
        names = model.class_names or [str(i) for i in range(n)]
        top = torch.topk(probs, min(args.top, n))
        print(f"prediction: {pred} ({names[pred]}), p = {float(probs[pred]):.4f}")
        print(
            "top classes: "
            + ", ".join(f"{int(i)} ({names[int(i)]}) {float(v):.3f}" for v, i in zip(top.values, top.indices))
        )
        k = _resolve_target(args.target, model, pred, n)
        target = k
        target_desc = f"class {k} ({names[k]})"
        print(f"explaining {target_desc}: logit {float(out[0][k]):.4f}, p = {float(probs[k]):.4f}")
    results = {}
    for m in methods:
        opts = m.options_for(model, args.composite)
        try:
            e = relprop.explain(model.module, inputs, target=target, method=m.name, **opts)
        except (ValueError, TypeError) as ex:
            raise CLIError(f"method '{m.label}' on {model.name}: {str(ex).splitlines()[0]}") from None
        a = e.attributions
        a = a["input_ids"] if isinstance(a, dict) else (a[0] if isinstance(a, (tuple, list)) else a)
        results[m.label] = (a[0].detach().float(), float(e.score.reshape(-1)[0]))
        print(f"{m.label}: explained {target_desc}, sum of attributions {float(a[0].sum()):.4f}")
    if model.kind == "image":
        from .report.figures import explain_figure

        dest = Path(args.out or "heatmap.png")
        if dest.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
            raise CLIError(f"--out {dest}: use a .png, .jpg, .pdf or .svg file for image heatmaps")
        dest.parent.mkdir(parents=True, exist_ok=True)
        heat = {k: (r[0].sum(0) if r[0].dim() == 3 else r[0]).numpy() for k, r in results.items()}
        explain_figure(disp[0], heat, dest, title=f"{model.name}: {target_desc}")
        print(f"heatmap saved to {dest}")
        return 0
    tokens = model.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    width = max(len(t) for t in tokens) + 2
    cols = [max(len(k), 8) + 2 for k in results]
    print("token".ljust(width) + "".join(f"{k:>{w}}" for k, w in zip(results, cols)))
    for i, t in enumerate(tokens):
        print(t.ljust(width) + "".join(f"{float(v[0][i]):>{w}.4f}" for v, w in zip(results.values(), cols)))
    dest = Path(args.out or "tokens.html")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scores = {k: v[0].tolist() for k, v in results.items()}
    if dest.suffix.lower() in (".html", ".htm"):
        _need_report_deps("matplotlib")
        from .report.html import e as esc
        from .report.html import page, token_html

        rows = "".join(
            f'<div class="text-row"><b>{esc(k)}</b>: {token_html(tokens, s)}</div>' for k, s in scores.items()
        )
        body = (
            f"<section><h2>{esc(model.name)}: {esc(target_desc)}</h2>{rows}"
            f'<p class="muted">Red: for, blue: against; hover a token for its scaled score.</p></section>'
        )
        sub = esc(args.input) + (f" ↔ {esc(args.reference)}" if args.reference else "")
        dest.write_text(page("relprop explain", sub, "", body), encoding="utf-8")
    elif dest.suffix.lower() in (".png", ".pdf", ".svg", ".jpg"):
        _need_report_deps("matplotlib")
        from .report.figures import token_figure

        token_figure(tokens, scores, dest, title=f"{model.name}: {target_desc}")
    else:
        raise CLIError(f"--out {dest}: use .html or .png for token scores")
    print(f"token scores saved to {dest}")
    return 0


def cmd_list(args) -> int:
    import relprop

    from . import zoo
    from .specs import TEXT_ZOO

    print("zoo models:   " + ", ".join(f"zoo:{m}" for m in zoo.list_models() + list(TEXT_ZOO)))
    print("default:      " + ", ".join(f"zoo:{m}" for m in zoo.DEFAULT_MODELS) + f" on zoo:{zoo.DEFAULT_DATASET}")
    print("zoo datasets: " + ", ".join(f"zoo:{d}" for d in zoo.list_datasets()))
    print("methods:      " + ", ".join(sorted(relprop.METHODS)))
    print("default methods for compare: " + ", ".join(default_methods()))
    return 0


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args._argv = argv
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    debug = bool(os.environ.get("RELPROP_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("relprop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    except (SpecError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError, TypeError, ImportError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (FileNotFoundError, PermissionError)) and getattr(e, "filename", None):
            msg = f"{e.strerror}: {e.filename}"
        print(f"relprop: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; RELPROP_DEBUG=1 shows it
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"relprop: error: {type(e).__name__}: {msg} (set RELPROP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
