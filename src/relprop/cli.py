"""The ``relprop`` command: explain one input, or compare how several models explain a dataset.

Run ``relprop --help``, ``relprop explain --help`` or ``relprop compare --help`` for examples.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .specs import TRUST_PICKLE_HELP, SpecError, TrustPickleWarning

EXAMPLES = """\
examples:
  relprop compare                                   # the embedded default: 4 zoo models on zoo:digits
  relprop compare --models zoo:resnet_digits,zoo:vit_digits --methods lrp,integrated_gradients --out report
  relprop compare --models timm:resnet18 --weights r18.pth --data photos/ --out report   # photos/CLASS/*.jpg
  relprop compare --models hf:./my-bert --data reviews.csv --methods lrp,input_x_gradient
  relprop explain --model zoo:resnet_digits --input digit.png --method lrp,gradient --out heatmap.png
  relprop explain --model zoo:minilm-similarity --input "A man plays a guitar." --reference "Someone makes music."
  relprop list                                      # zoo models, datasets and methods
  relprop layers zoo:resnet_digits                  # module names, e.g. for gradcam:layer=NAME
  relprop sample zoo:digits --out digit.png         # one dataset image, an input for explain

model specs:  zoo:NAME | torchvision:NAME [--weights FILE] | timm:NAME [--weights FILE] | hf:FOLDER |
              python:MODULE:FUNCTION [--weights FILE] | FILE.safetensors (+ FILE.json, zoo format) |
              FILE.pt (torch.save(model): needs --trust-pickle, unpickling runs code from the file;
              a state dict .pt goes with --weights FILE to its architecture: timm:, torchvision:, python:)
data specs:   zoo:NAME | FOLDER with one sub-folder of images per class | FILE.csv / FILE.jsonl / FILE.parquet
              (texts or images, and labels: --text-column, --image-column, --label-column) | a Hugging Face
              dataset saved with save_to_disk (--split) | WebDataset tar shards (data.tar, a FOLDER of .tar
              files, shard-{000..009}.tar; KEY.png/.jpg/.npy or KEY.txt, labelled by KEY.cls or KEY.json)
              folder names / labels are matched to the model's class names (--classes FILE, --labels)
method specs: NAME[:KEY=VALUE...], e.g. lrp, lrp:composite=epsilon, integrated_gradients:n_steps=32,
              occlusion:window=4x4:stride=2x2, gradcam:layer=layer4 (defaults: window from the input
              size, Grad-CAM on the last spatial layer); tuples as AxB or [A,B]
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
    sub = p.add_subparsers(dest="command", metavar="{explain,compare,list,layers,sample}", parser_class=_Parser)

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
    c.add_argument(
        "--out",
        default="relprop-report",
        metavar="DIR",
        help="report folder or any fsspec URL, e.g. s3://bucket/run (default: %(default)s)",
    )
    c.add_argument(
        "--samples", type=int, default=64, metavar="N", help="examples per model for the metrics (default: 64)"
    )
    c.add_argument(
        "--grid", type=int, default=8, metavar="N", help="examples in the heatmap grid (default: 8, at least 1)"
    )
    c.add_argument(
        "--limit", type=int, metavar="N",
        help="use only the first N examples of the data (for everything: accuracy, grid and metrics); --subset N "
        "draws N at random with --seed; --samples is how many of them the metrics explain",
    )  # fmt: skip
    c.add_argument(
        "--subset", type=int, metavar="N",
        help="use N examples of the data drawn at random with --seed (after --limit), in data order",
    )  # fmt: skip
    c.add_argument(
        "--data-workers", type=int, default=0, metavar="N",
        help="processes that read and decode the data ahead during the accuracy pass (default: 0, none)",
    )  # fmt: skip
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
        default=6,
        metavar="N",
        help="examples for the randomisation check (default: 6; fewer than 5 is always inconclusive; 0: skip)",
    )
    c.add_argument(
        "--randomisation-layers",
        type=int,
        default=3,
        metavar="N",
        help="top layers randomised, one after another (default: 3)",
    )
    c.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per explain call (default: 32)")
    c.add_argument("--force", action="store_true", help="recompute every cell (ignore, then overwrite OUT/cache)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write OUT/cache")
    c.add_argument(
        "--engine", choices=["local", "ray"], default="local",
        help="local: one process (default); ray: model x method x data shards on a Ray actor pool, the same numbers "
        "(pip install '.[ray]' from the clone); shards in OUT/shards, a re-run resumes",
    )  # fmt: skip
    c.add_argument(
        "--address",
        metavar="ADDR",
        help="--engine ray: join this Ray cluster (default: RAY_ADDRESS if set, else a local one)",
    )
    c.add_argument("--workers", type=int, default=2, metavar="N", help="--engine ray: actors in the pool (default 2)")
    c.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="--engine ray: GPUs per actor")
    c.add_argument(
        "--shards",
        metavar="URL",
        help="--engine ray: where the per-example Parquet shards go, a folder or any fsspec URL (s3://, gs://, "
        "file://...; default OUT/shards)",
    )
    c.add_argument(
        "--model-files", choices=["ship", "shared"], default="ship",
        help="--engine ray: ship: the driver sends the model files it read (hf: folder, checkpoint, --weights, "
        "python:FILE.py, --classes) and the Python of a python:MODULE or of a trusted pickle's classes from your "
        "own folders to the workers through Ray's object store (default); shared: every node reads them at the "
        "same paths and imports what it finds",
    )  # fmt: skip
    c.add_argument(
        "--model-files-limit", type=int, default=4096, metavar="MIB",
        help="--engine ray: the most MiB of one model's files that are shipped (default 4096)",
    )  # fmt: skip
    c.add_argument(
        "--baseline",
        default="black",
        metavar="B",
        help="what ABPC and deletion replace patches/pixels by: black (the image's minimum), zero, white, mean, "
        "blur, noise or a number (default: black; text: always the mask token)",
    )
    c.add_argument(
        "--insertion-baseline",
        default="blur",
        metavar="B",
        help="what insertion starts from before restoring the most relevant patches (default: blur)",
    )
    c.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples per interval (default: 1000)"
    )
    c.add_argument(
        "--rank-by",
        choices=("abpc", "insertion", "deletion", "insertion_minus_deletion"),
        default="abpc",
        help="the metric the rankings use (default: abpc); every table shows all four",
    )
    c.add_argument(
        "--save-attributions",
        choices=("npy", "pt", "safetensors"),
        metavar="FMT",
        help="also save every evaluated example's attributions to OUT/attributions/MODEL__METHOD.FMT "
        "(npy, pt or safetensors; rows in the order of examples.parquet)",
    )
    c.add_argument(
        "--labels",
        choices=("names", "sorted", "ignore"),
        default="names",
        help="how data labels become model classes: names (match the model's class names, else an error; "
        "default), sorted (sorted folder order = class index, torchvision ImageFolder), ignore (run anyway; "
        "unmatched labels get a warning and no accuracy)",
    )
    _common(c)
    _data_options(c)
    _placement(c)
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
    v = e.add_argument_group("pictures and files")
    v.add_argument("--overlay", action="store_true", help="draw each heatmap over the input image (grey)")
    v.add_argument("--cmap", metavar="NAME", help="any matplotlib colour map (default: bwr, red for / blue against)")
    v.add_argument(
        "--sign",
        choices=("all", "positive", "negative", "absolute"),
        default="all",
        help="which evidence to draw: all (signed, centred on 0; default), positive, negative or absolute",
    )
    v.add_argument(
        "--scale",
        choices=("shared", "per-image"),
        default="per-image",
        help="per-image (default): each method's heatmap on its own colour range (methods differ in units); "
        "shared: one colour range for all methods",
    )
    v.add_argument(
        "--save",
        metavar="FILE",
        help="also save the raw attributions: FILE.npy, FILE.pt or FILE.safetensors (one entry per method)",
    )
    _common(e)
    _placement(e)
    e.set_defaults(func=cmd_explain)

    lst = sub.add_parser("list", help="zoo models, zoo datasets and methods", formatter_class=_formatter)
    lst.set_defaults(func=cmd_list)

    ly = sub.add_parser(
        "layers",
        help="a model's layers (module names and output shapes), e.g. for gradcam:layer=NAME",
        formatter_class=_formatter,
        description="List the named modules of a model in the order their forward finishes, with output "
        "shapes from one forward pass on an input of the model's size (or --input FILE).",
        epilog="examples:\n  relprop layers zoo:resnet_digits\n"
        "  relprop layers timm:resnet18 --weights r18.pth --input cat.jpg\n",
    )
    ly.add_argument("model_pos", nargs="?", metavar="MODEL", help="model spec (or --model)")
    ly.add_argument("--model", help=argparse.SUPPRESS)
    ly.add_argument("--input", metavar="FILE|TEXT", help="an input to run (default: zeros of the model's input size)")
    _common(ly)
    ly.set_defaults(func=cmd_layers)

    sm = sub.add_parser(
        "sample",
        help="save one image of a dataset as a PNG (an input for relprop explain)",
        formatter_class=_formatter,
        description="Write example N of an image data spec (zoo:NAME, an image folder, a table, a saved dataset or "
        "tar shards) as an 8-bit PNG and print its label.",
        epilog="examples:\n  relprop sample zoo:digits --out digit.png\n  relprop sample zoo:chest_xray --index 9\n",
    )
    sm.add_argument("data", metavar="DATA", help="data spec of images (as for compare --data)")
    sm.add_argument("--index", type=int, default=3, metavar="N", help="which example (default: 3)")
    sm.add_argument("--split", default="test", help="split of a zoo dataset or a saved DatasetDict (default: test)")
    sm.add_argument("--out", default="sample.png", metavar="FILE", help="PNG to write (default: %(default)s)")
    sm.set_defaults(func=cmd_sample)
    return p


def _placement(p):
    g = p.add_argument_group("device and precision")
    g.add_argument(
        "--device", default="cpu", metavar="D",
        help="cpu (default), cuda, cuda:N, or auto (cuda when available, else cpu)",
    )  # fmt: skip
    g.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="precision the models run in (default: float32); LRP divides and keeps relevance in float32",
    )  # fmt: skip


def _data_options(p):
    """What reads --data: compare only (explain and layers take one --input)."""
    g = p.add_argument_group("data options")
    g.add_argument("--split", default="test", help="split of a zoo dataset or a saved DatasetDict (default: test)")
    g.add_argument("--text-column", default="text", help="text column of a table/saved dataset (default: text)")
    g.add_argument(
        "--label-column", default="label", help="label column of a table/saved dataset/.json member (default: label)"
    )
    g.add_argument("--image-column", default="image", help="image column of a table/saved dataset (default: image)")
    g.add_argument("--seed", type=int, default=0, help="sample selection and randomisation seed (default: 0)")


def _common(p):
    g = p.add_argument_group("model and preprocessing options")
    g.add_argument(
        "--weights",
        action="append",
        metavar="[SPEC=]FILE",
        help="a state dict (.safetensors, or .pth/.pt/.bin read with weights_only) for torchvision:/timm:/python: "
        "models; SPEC=FILE for one model of several",
    )
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size when it cannot be read from --weights")
    g.add_argument(
        "--classes",
        metavar="FILE",
        help="the model's class names in output order: one per line (aliases after commas, an optional WordNet id "
        "first, as in synset_words.txt), or a JSON list",
    )
    g.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    g.add_argument(
        "--composite",
        default="auto",
        metavar="NAME",
        help="LRP composite (default: auto = attnlrp for transformers, else epsilon_plus_flat)",
    )
    g.add_argument(
        "--image-size", type=int, nargs="+", metavar=("H", "W"), help="resize images (overrides the model's config)"
    )
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------- helpers
def _need_report_deps(*mods: str) -> None:
    from .specs import install_hint

    for mod in mods:
        try:
            __import__(mod)
        except ImportError:
            raise CLIError(f"this command needs '{mod}', which is not installed: {install_hint(mod)}") from None


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
    """Method specs, each checked (name, option keys, value types) before any model is loaded."""
    from .specs import parse_methods as parse

    return parse(text, default_methods())


def _weights_map(values, models: list[str]) -> dict[str, str]:
    from .specs import takes_weights, weights_prefixes

    out: dict[str, str] = {}
    plain = []
    for v in values or []:
        spec, sep, file = v.rpartition("=")
        if sep and spec:
            if spec not in models:
                raise CLIError(f"--weights {v}: '{spec}' is not one of the models ({', '.join(models)})")
            if not takes_weights(spec):
                raise CLIError(f"--weights {v}: '{spec}' does not take --weights (only {weights_prefixes()} models do)")
            out[spec] = file
        else:
            plain.append(v)
    if plain:
        need = [m for m in models if takes_weights(m) and m not in out]
        if not need:
            # Other loaders never read --weights: accepting it would explain the model with its own
            # weights while the user believes theirs are used.
            raise CLIError(
                f"--weights {plain[0]}: only {weights_prefixes()} models take --weights, not {', '.join(models)}; "
                "zoo: and hf: models come with their weights, a whole-model file is given as the model"
            )
        if len(plain) > 1 or (len(need) > 1 and len(models) > 1):
            raise CLIError(
                f"--weights {plain[0]}: {', '.join(need)} all take --weights; say which model's file it is with "
                f"--weights SPEC=FILE (e.g. --weights {need[0]}={plain[0]})"
            )
        for m in need:
            out.setdefault(m, plain[0])
    for m, f in out.items():
        if not Path(f).expanduser().exists():
            raise CLIError(f"weights file not found: {f}")
    return out


def _preprocess_overrides(args) -> dict:
    from .specs import check_overrides

    over = {"image_size": args.image_size, "mean": args.mean, "std": args.std, "channels": args.channels}
    check_overrides(**over)  # before any model or data is loaded; override_preprocess checks again (Python callers)
    return over


def _selected(data) -> str:
    """`` of N (--limit 100)``: how the examples were chosen, for the header line."""
    sel = data.info.get("selection")
    if not sel:
        return ""
    how = ", ".join(f"--{k} {v}" for k, v in sel.items() if v is not None and k != "seed")
    return f" of {data.info.get('selected_from')} ({how}{', --seed ' + str(sel['seed']) if sel.get('subset') else ''})"


def _positive(args, *names):
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 0:
            raise CLIError(f"--{n.replace('_', '-')} must be >= 0, got {v}")
    for n in ("samples", "batch_size", "regions", "steps", "patch_grid", "grid", "top", "limit", "subset"):
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise CLIError(f"--{n.replace('_', '-')} must be at least 1, got {v}")


def _loader(args, weights: dict[str, str]):
    """spec -> LoadedModel with every model option of the command line."""
    import warnings

    from .specs import load_model, override_preprocess

    overrides = _preprocess_overrides(args)
    noted: set[str] = set()

    def load(spec: str):
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", TrustPickleWarning)
                m = load_model(
                    spec,
                    weights=weights.get(spec),
                    num_classes=args.num_classes,
                    trust_pickle=args.trust_pickle,
                    classes_file=args.classes,
                )
        finally:  # --trust-pickle: one plain note per file (also when loading then fails), not a Python warning
            for w in caught:
                if not issubclass(w.category, TrustPickleWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                elif str(w.message) not in noted:
                    noted.add(str(w.message))
                    _say(f"relprop: note: {w.message}")
        if m.kind == "image":
            m.preprocess = override_preprocess(m.preprocess, **overrides)
        return m

    return load


def _cannot_write(path: Path) -> str | None:
    """Why nothing can be written under ``path``'s nearest existing folder, or None. A throw-away folder made
    there tells (``os.access`` says yes to root on /proc); the real files are only made when written."""
    import tempfile

    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".relprop-check-", dir=parent))
    except OSError as e:
        return f"{parent} is not a writable folder: {e.strerror or e}"
    return None


def _ray_flags(args) -> None:
    """``--workers``/``--model-files-limit`` out of range fail before any work (``--workers 0`` failed after the
    models loaded; a negative limit was taken); an ``--address`` where nothing answers fails in seconds; the
    ``--engine ray`` options on a local run are said once."""
    if args.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {args.workers}")
    if args.model_files_limit < 0:
        raise CLIError(f"--model-files-limit must be >= 0 (MiB), got {args.model_files_limit}")
    if args.engine == "ray":
        from .specs.address import check_ray_address

        # nothing there: one line in seconds (ray.init retried for minutes); RAY_ADDRESS is what the engine joins
        # without --address (Ray's own variable), so it is probed here too, before any model is checked
        check_ray_address(args.address or os.environ.get("RAY_ADDRESS"))
    else:
        ray_only = ("--address", "--workers", "--gpus-per-worker", "--shards", "--model-files", "--model-files-limit")
        argv = getattr(args, "_argv", None) or []
        given = [f for f in ray_only if any(a == f or a.startswith(f + "=") for a in argv)]
        if given:
            _say(f"relprop: WARNING: {', '.join(given)} only apply with --engine ray; ignored on this local run")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def preflight(models: list[str], data, methods, settings, load, log) -> tuple[dict[str, str], list[str]]:
    """Load, check and free each model in turn before any computing: kinds, labels, a forward pass,
    and every method with its final options on one example. Returns display names and warnings.

    A compare run takes minutes to hours; a typo in the last method's options must not surface after
    the first model's cells are done.
    """
    import gc

    import relprop

    from .report.compare import Job
    from .report.interrupt import Interrupt
    from .specs import unique_names

    job = Job(Path("."), data, list(methods), settings, log=lambda s: None, use_cache=False)
    with Interrupt() as stop:  # a Ctrl-C Python drops (in a weakref callback) stops here too
        job.interrupt = stop
        loaded: list[tuple[str, str]] = []
        for spec in models:
            job.check_interrupt()
            log(f"checking {spec} ...")
            model = load(spec)
            if model.kind == "similarity":
                raise CLIError(
                    f"{spec} is a sentence-similarity model without classes; use it with "
                    f"relprop explain --model {spec} --input TEXT --reference TEXT"
                )
            if model.kind != data.kind:
                raise CLIError(f"model {spec} takes {model.kind} inputs but the data {data.spec} holds {data.kind}s")
            if model.info.get("class_names_note"):
                job.warn(model.info["class_names_note"])
            prep = job.prepare(model, job.indices[:2])  # forward pass + label matching (errors name the fix)
            present = set(data.labels.tolist())
            if settings.target == "label" and present & set(job.label_map(model).unmatched):
                raise CLIError(
                    f"--target label: some data labels match no class of '{model.name}' (--labels ignore); "
                    f"use --target pred or give the class names with --classes FILE"
                )
            x = {k: v[:1] for k, v in prep.inputs.items()} if isinstance(prep.inputs, dict) else prep.inputs[:1]
            for m in methods:
                try:
                    opts = job.options(model, m)
                    relprop.explain(model.module, x, target=prep.target[:1], method=m.name, **opts)
                except SpecError as e:
                    raise CLIError(f"method '{m.label}' on {model.name}: {str(e).splitlines()[0]}") from None
                except Exception as e:  # noqa: BLE001 - the method's own message, one line, before any work
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise CLIError(
                        f"method '{m.label}' cannot run on {model.name}: {type(e).__name__}: {msg}"
                    ) from None
            loaded.append((model.spec, model.name))
            del model, prep, x
            gc.collect()
        job.check_interrupt()
    return unique_names(loaded), list(job.warnings)


def _baseline_arg(value: str, flag: str) -> str:
    """A perturbation baseline name or number, checked before anything runs."""
    from .metrics.baselines import ALL_BASELINES

    v = value.strip().lower()
    if v in ALL_BASELINES:
        return v
    try:
        float(v)
    except ValueError:
        close = difflib.get_close_matches(v, ALL_BASELINES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CLIError(
            f"{flag} {value!r} is not a baseline.{hint} Use one of {', '.join(ALL_BASELINES)} or a number"
        ) from None
    return v


# ------------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    _need_report_deps("matplotlib", "safetensors", "PIL")
    from . import zoo
    from .report import Settings, run_compare
    from .report.compare import check_seed
    from .report.device import check_placement, place_loaded
    from .report.html import accuracy_count, incomplete_text
    from .report.store import Output
    from .specs import check_model_spec, load_data

    check_placement(args.device, args.dtype)  # before the data is read
    out = Output(args.out)  # a folder or any fsspec URL: a bad URL fails here, before any work
    if out.in_process:
        raise CLIError(
            f"--out {args.out}: a memory:// file system lives in this process and is lost when relprop exits; "
            f"use a folder or a URL (memory:// is for Python: relprop.compare(..., out='memory://...'))"
        )
    _positive(args, "grid", "sensitivity_samples", "randomisation_samples", "randomisation_layers", "bootstrap",
              "data_workers")  # fmt: skip
    check_seed(args.seed, "--seed")  # before the data is read
    out.check_folder()
    if out.local is not None and (why := _cannot_write(Path(out.local))):  # else it failed after the models loaded
        raise CLIError(f"--out {args.out}: the report folder cannot be made there ({why})")
    _ray_flags(args)
    if args.models is not None and not _split(args.models):
        raise CLIError(f"--models {args.models!r} names no model; omit --models for the default models")
    models = _split(args.models) or [f"zoo:{m}" for m in zoo.DEFAULT_MODELS]
    if dup := sorted({m for m in models if models.count(m) > 1}):
        raise CLIError(f"a model is given twice in --models: {', '.join(dup)}")
    methods = parse_methods(args.methods)
    weights = _weights_map(args.weights, models)
    for m in models:
        check_model_spec(m, weights.get(m))
    _preprocess_overrides(args)
    data = load_data(
        args.data or f"zoo:{zoo.DEFAULT_DATASET}",
        split=args.split,
        text_column=args.text_column,
        label_column=args.label_column,
        image_column=args.image_column,
        trust_pickle=args.trust_pickle,
        limit=args.limit,
        subset=args.subset,
        seed=args.seed,
        loader_workers=args.data_workers,
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
        labels=args.labels,
        baseline=_baseline_arg(args.baseline, "--baseline"),
        insertion_baseline=_baseline_arg(args.insertion_baseline, "--insertion-baseline"),
        bootstrap=args.bootstrap,
        save_attributions=args.save_attributions,
        rank_by=args.rank_by,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        subset=args.subset,
    )
    log = (lambda s: None) if args.quiet else _say
    load = _loader(args, weights)

    def load_placed(spec: str):  # --device/--dtype (Ray workers too); the preflight checks the model as it runs
        return place_loaded(load(spec), args.device, args.dtype, copy=False)

    names, warnings = preflight(models, data, methods, settings, load_placed, log)
    for w in warnings:  # prominent even with --quiet: results depend on it
        _say(f"relprop: WARNING: {w}")

    def load_named(spec: str):
        m = load_placed(spec)
        m.name = names.get(spec, m.name)
        return m

    n_metrics = min(args.samples, len(data))
    header = (
        f"relprop compare: {len(models)} model(s) x {len(methods)} method(s) on {data.spec} "
        f"({len(data)} examples{_selected(data)}, metrics on {n_metrics}) -> {out.where('index.html')}"
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
        preprocess_overrides=None,
        force=args.force,
        progress=not args.quiet,  # run_compare: a bar only on a terminal (or RELPROP_PROGRESS), else one line per cell
        command=command,
        log=log,
        header=header,
        load=load_named,
        use_cache=not args.no_cache,
        engine=args.engine,
        ray_options=dict(
            address=args.address,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            shards=args.shards,
            ship_models=args.model_files == "ship",
            model_bytes=args.model_files_limit << 20,
        ),
        warnings=warnings,
    )
    reused = sum(1 for m in res["models"] for c in m.get("methods", []) if c.get("reused"))
    print(
        f"report: {out.where('index.html')}  ({res['cells_done']}/{res['cells_total']} cells, {reused} reused, "
        f"{res['seconds']:.0f} s)"
    )
    names_by_anchor = {r["anchor"]: r["name"] for r in res["ranking"]}
    if res["ranking"]:
        print(f"ranking by mean rank over methods of {res['ranking'][0].get('metric_label', 'ABPC')} (95% intervals):")
    for r in res["ranking"]:
        ov = (r.get("overall") or {}).get(r.get("metric", "abpc")) or {}
        lo, hi = ov.get("ci") or (None, None)
        faith = "–" if r["faithfulness"] is None else f"{r['faithfulness']:.3f}"
        if lo is not None and hi is not None:
            faith += f" [{lo:.3f}, {hi:.3f}]"
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        if r.get("n_total") is not None and r.get("n_eval") != r["n_total"]:
            acc += f" on {accuracy_count(r)}"
        if r.get("uninformative"):
            faith += " (perturbation metrics uninformative)"
        mr = "–" if r.get("mean_rank") is None else f"{r['mean_rank']:.2f}"
        tie = ", ".join(names_by_anchor.get(t, t) for t in r.get("tied_with", []))
        cut = f"  ({incomplete_text(r)})" if incomplete_text(r) else ""  # stopped in this model, or a method failed
        print(
            f"  {r['rank'] or '-'}. {r['name']:<24} mean rank {mr}  {r.get('metric_label', 'ABPC')} {faith}  "
            f"accuracy {acc}{'  (tie with ' + tie + ')' if tie else ''}{cut}"
        )
    for w in res.get("warnings", []) if args.quiet else ():  # else run_compare said each once, at its end
        if w not in warnings:
            _say(f"relprop: WARNING: {w}")
    if res["status"] == "incomplete":
        for p in res.get("problems", []):
            _say(f"relprop: failed: {p}")
        _say(f"relprop: the report is incomplete ({len(res.get('problems', []))} failed cell(s))")
        return 1
    if res["status"] != "complete":
        kept = f"finished cells are kept in {out.where('cache')}"
        if args.engine == "ray":
            from .report.distributed import shard_folder

            kept += f" and finished shards in {shard_folder(out, args.shards)} (resumed, not recomputed)"
        _say(f"interrupted: {kept}; run the same command again to continue")
        return 130
    return 0


# ------------------------------------------------------------------------------------------- explain
def _resolve_target(target: str | None, model, pred: int, n: int) -> int:
    if target is None:
        return pred
    from .specs.labels import norm

    names = model.class_names or []
    try:
        k = int(target)
    except ValueError:
        normed = [norm(n) for n in names]
        if norm(target) in normed:
            return normed.index(norm(target))
        close = difflib.get_close_matches(target, names, n=1)
        raise CLIError(
            f"--target '{target}' is not a class index or class name of '{model.name}'"
            + (f". Did you mean '{close[0]}'?" if close else "")
        ) from None
    if not 0 <= k < n:
        raise CLIError(f"--target {k} is out of range: model '{model.name}' has {n} classes (0..{n - 1})")
    return k


IMAGE_OUT = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # explain --out for image heatmaps
TEXT_OUT = (".html", ".htm", ".png", ".pdf", ".svg", ".jpg")  # explain --out for token scores


def _check_writable(flag: str, path: str) -> None:
    """Refuse an output file before any work: a folder, or a place under a file or a read-only folder."""
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if why := _cannot_write(dest.parent.resolve()):
        raise CLIError(f"{flag} {path}: cannot write there ({why})")


def _check_explain_outputs(args, kind: str | None) -> None:
    """``--out``/``--save`` checked before the model is loaded (``kind`` None: any suffix explain writes)
    and again once its kind is known, before computing: a bad name never costs a run."""
    if args.out:
        allowed = IMAGE_OUT if kind == "image" else TEXT_OUT if kind else tuple(sorted({*IMAGE_OUT, *TEXT_OUT}))
        if Path(args.out).suffix.lower() not in allowed:
            what = {"image": "image heatmaps", None: "heatmaps or token scores"}.get(kind, "token scores")
            raise CLIError(f"--out {args.out}: use a {', '.join(allowed)} file for {what}")
        _check_writable("--out", args.out)
    if args.save and kind is None:
        from .report.store import attribution_format

        try:
            attribution_format(args.save)
        except ValueError as ex:
            raise CLIError(f"--save {args.save}: {ex}") from None
        _check_writable("--save", args.save)


def cmd_explain(args) -> int:
    import torch

    import relprop

    from .specs import IMAGE_SUFFIXES, check_forward, image_batch, read_image, text_batch

    _check_explain_outputs(args, None)
    methods = parse_methods(args.methods)
    weights = _weights_map(args.weights, [args.model])
    _preprocess_overrides(args)
    model = _loader(args, weights)(args.model)
    from .report.device import cast_text, check_placement, place_loaded

    check_placement(args.device, args.dtype)
    model = place_loaded(model, args.device, args.dtype, copy=False)
    if model.info.get("dtype_cast"):  # e.g. a float64 model under the default --dtype float32
        _say(f"relprop: note: {cast_text(model.name, model.info['dtype_cast'])}")
    _check_explain_outputs(args, "image" if model.kind == "image" else "text")
    inputs: Any  # a tensor (images) or the tokenizer's dict of tensors (texts)
    if model.kind == "image":
        _need_report_deps("matplotlib", "PIL")
        path = Path(args.input).expanduser()
        if not path.exists():
            raise CLIError(f"input file not found: {args.input}")
        if path.is_dir():
            raise CLIError(f"--input {args.input} is a folder; give one image file (compare takes folders as --data)")
        notes: list[str] = []
        x, disp = image_batch(model, [read_image(path, notes)])
        for note in notes:
            _say(f"relprop: WARNING: {note}")
        inputs = x
    else:
        text = args.input
        if Path(text).suffix.lower() in IMAGE_SUFFIXES and Path(text).is_file():
            raise CLIError(f"{args.model} is a text model; --input {text} is an image file (give the text itself)")
        if Path(text).is_file() and Path(text).suffix.lower() in (".txt", ".md"):
            text = Path(text).read_text(encoding="utf-8").strip()
        if model.kind == "similarity":
            if not args.reference:
                raise CLIError(f"{args.model} compares two sentences: give sentence B with --reference TEXT")
            from .zoo.text import SentenceSimilarity

            similarity_base = model.module
            model.module = SentenceSimilarity.from_sentence(model.module, model.tokenizer, args.reference).eval()
        inputs = text_batch(model, [text], max_length=512)
    out = check_forward(model, inputs)
    if model.kind == "similarity":
        print(f"similarity of A to B: {float(out[0]):.4f} (cosine of mean-pooled all-MiniLM-L6-v2 embeddings)")
        target: int | Callable[[torch.Tensor], torch.Tensor] = lambda o: o.reshape(-1)  # noqa: E731
        target_desc = "similarity (sentence A, against B)"
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

    def run_methods(module, inputs, target, target_desc) -> dict:
        results = {}
        for m in methods:
            try:
                opts = m.options_for(model, args.composite, inputs)
                e = relprop.explain(module, inputs, target=target, method=m.name, **opts)
            except (ValueError, TypeError) as ex:
                raise CLIError(f"method '{m.label}' on {model.name}: {str(ex).splitlines()[0]}") from None
            if m.name in ("occlusion", "gradcam", "grad_cam", "guided_gradcam", "guided_grad_cam"):
                chosen = {k: v for k, v in opts.items() if k not in m.options}
                if chosen:
                    print(f"{m.label}: default " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
            a = e.attributions
            a = a["input_ids"] if isinstance(a, dict) else (a[0] if isinstance(a, (tuple, list)) else a)
            results[m.label] = (a[0].detach().float(), float(e.score.reshape(-1)[0]))
            print(f"{m.label}: explained {target_desc}, sum of attributions {float(a[0].sum()):.4g}")
        return results

    results = run_methods(model.module, inputs, target, target_desc)
    if model.kind == "image":
        from .report.figures import explain_figure

        dest = Path(args.out or "heatmap.png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        heat = {k: (r[0].sum(0) if r[0].dim() == 3 else r[0]).numpy() for k, r in results.items()}
        try:
            explain_figure(
                disp[0],
                heat,
                dest,
                title=f"{model.name}: {target_desc}",
                overlay=args.overlay,
                cmap=args.cmap,
                sign=args.sign,
                scale=args.scale,
            )
        except (KeyError, ValueError) as ex:  # an unknown colour map
            raise CLIError(f"--cmap {args.cmap}: {str(ex).splitlines()[0][:200]}") from None
        print(f"heatmap saved to {dest}")
        if args.save:
            _save_attributions(args.save, {k: r[0] for k, r in results.items()})
        return 0
    sections = [(args.input, inputs, results, target_desc)]
    if model.kind == "similarity":  # sentence B explained too, against A
        from .zoo.text import SentenceSimilarity

        module_b = SentenceSimilarity.from_sentence(similarity_base, model.tokenizer, text).eval()
        inputs_b = text_batch(model, [args.reference], max_length=512)
        desc_b = "similarity (sentence B, against A)"
        sections = [(text, inputs, results, target_desc)]
        sections.append((args.reference, inputs_b, run_methods(module_b, inputs_b, target, desc_b), desc_b))
    for sentence, inp, res, desc in sections:
        tokens = model.tokenizer.convert_ids_to_tokens(inp["input_ids"][0].tolist())
        _print_token_scores(tokens, {k: v[0].tolist() for k, v in res.items()}, f"{model.name}: {desc}")
    dest = Path(args.out or "tokens.html")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix.lower() in (".html", ".htm"):
        from .report.html import e as esc
        from .report.html import page, token_html

        body = []
        for sentence, inp, res, desc in sections:
            tokens = model.tokenizer.convert_ids_to_tokens(inp["input_ids"][0].tolist())
            rows = "".join(
                f'<div class="text-row"><b>{esc(k)}</b>: {token_html(tokens, v[0].tolist(), cmap=args.cmap)}</div>'
                for k, v in res.items()
            )
            body.append(f"<section><h2>{esc(model.name)}: {esc(desc)}</h2><p>{esc(sentence)}</p>{rows}</section>")
        body.append(
            '<p class="muted">Red: for, blue: against; word pieces are merged into words (their scores added); '
            "hover a word for its score and the raw score of each piece.</p>"
        )
        sub = esc(args.input) + (f" ↔ {esc(args.reference)}" if args.reference else "")
        dest.write_text(page("relprop explain", sub, "", "".join(body)), encoding="utf-8")
    else:  # another of TEXT_OUT (_check_explain_outputs refused any other suffix before the model ran)
        _need_report_deps("matplotlib")
        from .visualize import tokens_figure

        drawn = [
            (desc if len(sections) > 1 else "", model.tokenizer.convert_ids_to_tokens(inp["input_ids"][0].tolist()),
             {k: v[0].tolist() for k, v in res.items()})
            for _, inp, res, desc in sections
        ]  # fmt: skip
        try:  # both sentences of a pair, word pieces merged, one colour scale per method
            title = f"{model.name}: " + ("similarity of sentence A and B" if len(drawn) > 1 else target_desc)
            fig = tokens_figure(drawn, title=title, cmap=args.cmap, sign=args.sign)
        except (KeyError, ValueError) as ex:  # an unknown colour map
            raise CLIError(f"--cmap {args.cmap}: {str(ex).splitlines()[0][:200]}") from None
        fig.savefig(dest, dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
    print(f"token scores saved to {dest}")
    if args.save:
        saved = {k: v[0] for k, v in sections[0][2].items()}
        if len(sections) > 1:
            saved = {f"A/{k}": v for k, v in saved.items()} | {f"B/{k}": v[0] for k, v in sections[1][2].items()}
        _save_attributions(args.save, saved)
    return 0


def _save_attributions(path: str, maps: dict) -> None:
    """``--save``: one entry per method (.pt: a dict, .safetensors: one key each, .npy: stacked in the
    printed order, which needs maps of one shape)."""
    import torch

    from .report.store import attribution_format, save_tensor

    fmt = attribution_format(path)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save({k: v.detach().cpu() for k, v in maps.items()}, dest)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in maps.items()}, str(dest))
    else:
        shapes = {tuple(v.shape) for v in maps.values()}
        if len(shapes) > 1:
            raise CLIError(f"--save {path}: the maps differ in shape {sorted(shapes)}; use .pt or .safetensors")
        save_tensor(dest, torch.stack(list(maps.values())))
    print(f"attributions saved to {dest} ({', '.join(maps)})")


def _print_token_scores(tokens: list[str], scores: dict[str, list[float]], title: str) -> None:
    """Coloured words (rich) with the scores at a readable scale; plain text without rich or a terminal."""
    from .visualize import merge_wordpieces, print_tokens, readable_scale

    try:
        from rich.console import Console

        print_tokens(tokens, scores, title=title, console=Console(highlight=False))
        return
    except ImportError:
        pass
    merged = {k: merge_wordpieces(tokens, v)[1] for k, v in scores.items()}
    words = merge_wordpieces(tokens, next(iter(scores.values())))[0]
    factors = {k: readable_scale(v) for k, v in merged.items()}
    heads = {k: f"{k} {factors[k][1]}".strip() for k in merged}
    width = max(len(w) for w in words) + 2
    print(title)
    print("word".ljust(width) + "".join(f"{h:>{max(len(h), 8) + 2}}" for h in heads.values()))
    for i, w in enumerate(words):
        print(
            w.ljust(width) + "".join(f"{merged[k][i] / factors[k][0]:>{max(len(heads[k]), 8) + 2}.2f}" for k in merged)
        )


def cmd_layers(args) -> int:
    import torch

    from .specs import check_forward, image_batch, list_layers, read_image, text_batch

    spec = args.model or args.model_pos
    if not spec:
        raise CLIError("give a model: relprop layers MODEL (e.g. relprop layers zoo:resnet_digits)")
    weights = _weights_map(args.weights, [spec])
    _preprocess_overrides(args)
    model = _loader(args, weights)(spec)
    x: torch.Tensor | dict  # an image batch, or the tokenizer's dict of tensors
    if model.kind == "image":
        if args.input:
            x, _ = image_batch(model, [read_image(Path(args.input).expanduser())])
        else:
            pre = model.preprocess
            if pre is None or pre.size is None or pre.channels is None:
                raise CLIError(
                    f"model '{model.name}' does not declare its input size; pass --input IMAGE or --image-size H W "
                    f"and --channels C"
                )
            x = pre.normalize(torch.zeros(1, pre.channels, *pre.size))
    else:
        if model.kind == "similarity":
            raise CLIError(f"{spec}: relprop layers takes classifiers; this is a sentence-similarity model")
        x = text_batch(model, [args.input or "a short example sentence"])
    check_forward(model, x)
    rows = list_layers(model.module, x)
    width = max((len(n) for n, _, _ in rows), default=10) + 2
    tw = max((len(t) for _, t, _ in rows), default=8) + 2
    print(f"{'layer':<{width}}{'type':<{tw}}output shape")
    for name, typ, shape in rows:
        print(f"{name:<{width}}{typ:<{tw}}{'x'.join(map(str, shape)) if shape else '–'}")
    if model.kind == "image":
        try:
            from .specs import default_cam_layer

            print(f"gradcam default layer (last spatial layer): {default_cam_layer(model.module, x)}")
        except SpecError as e:
            print(f"gradcam: {e}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from .specs import load_data

    _need_report_deps("PIL")
    from PIL import Image

    suffix = Path(args.out).suffix.lower()
    if suffix not in Image.registered_extensions():  # before the data is read, not PIL's error after
        raise CLIError(f"--out {args.out}: give an image file name (.png, or another format Pillow writes)")
    data = load_data(args.data, split=args.split)
    if data.kind != "image":
        raise CLIError(f"relprop sample writes images; {data.spec} holds {data.kind}s")
    if not 0 <= args.index < len(data):
        raise CLIError(
            f"--index {args.index} is out of range: {data.spec} has {len(data)} examples (0..{len(data) - 1})"
        )
    if data.images is None:
        raise CLIError(f"{data.spec}: image data without decoded images")
    im = data.images[args.index].float().clamp(0, 1)
    a = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(dest)
    label = data.class_names[int(data.labels[args.index])]
    print(f"saved {dest}: example {args.index} of {data.spec}, label {label}, {a.shape[1]}x{a.shape[0]} px")
    return 0


def cmd_list(args) -> int:
    import relprop

    from . import zoo
    from .rules.composites import NAMES as COMPOSITES
    from .specs import KINDS, TEXT_ZOO
    from .specs.models import FILE_FORMS

    by_data: dict[str, list[str]] = {}
    for m in zoo.list_models():
        by_data.setdefault(str(zoo.model_info(m).get("dataset")), []).append(f"zoo:{m}")
    print("zoo models (by the zoo dataset they were trained on):")
    for d, ms in by_data.items():
        print(f"  zoo:{d:<12} {', '.join(ms)}")
    print(f"  {'(text)':<16} " + ", ".join(f"zoo:{m}" for m in TEXT_ZOO) + "  (explain --reference only)")
    print("default:      " + ", ".join(f"zoo:{m}" for m in zoo.DEFAULT_MODELS) + f" on zoo:{zoo.DEFAULT_DATASET}")
    print("zoo datasets: " + ", ".join(f"zoo:{d}" for d in zoo.list_datasets()))
    print("methods:      " + ", ".join(sorted(relprop.METHODS)))
    print("default methods for compare: " + ", ".join(default_methods()))
    print("LRP composites (lrp:composite=NAME): " + ", ".join(COMPOSITES))
    print("model specs:")  # each form once, with what it means
    rows = [(k.example, k.help) for k in KINDS.values()] + list(FILE_FORMS)  # the forms spec_forms() names
    width = max(len(r[0]) for r in rows) + 2
    for example, text in rows:
        print(f"  {example:<{width}} {text}")
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
