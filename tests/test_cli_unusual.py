"""Unusual command lines get one clear error before any work (no traceback, no report written after minutes
of computing): an existing file as the report folder, a --models/--methods list that names nothing (it used to
run the defaults), a zero or non-finite --std (every input became infinite and each method failed)."""

from __future__ import annotations

import pytest
import torch

import relprop.cli as cli
from relprop.cli import main

FAST = ["--methods", "saliency", "--samples", "2", "--grid", "1", "--sensitivity-samples", "0",
        "--randomisation-samples", "0", "--bootstrap", "10", "--quiet", "--no-cache"]  # fmt: skip


def _no_work(monkeypatch):
    """Fail the test if the data or a model is loaded: the error must come first."""
    monkeypatch.setattr("relprop.specs.load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    monkeypatch.setattr(cli, "_loader", lambda *a, **k: pytest.fail("a model was loaded"))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("relprop: error: "), err
    return err


def test_an_existing_file_as_the_report_folder_is_refused_first(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "report.html").write_text("mine")
    err = _error(capsys, ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "report.html")])
    assert "report.html is a file" in err
    assert (tmp_path / "report.html").read_text() == "mine"


@pytest.mark.parametrize(("flag", "message"), [("--models", "names no model"), ("--methods", "no method named in ','")])
def test_a_list_naming_nothing_is_an_error_not_the_defaults(tmp_path, capsys, monkeypatch, flag, message):
    _no_work(monkeypatch)
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "r")]
    argv[argv.index(flag) + 1] = ","
    assert message in _error(capsys, argv)


def test_explain_with_no_method_named_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_loader", lambda *a, **k: pytest.fail("a model was loaded"))
    err = _error(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", "x.png", "--method", " , "])
    assert "no method named in ' , '" in err


@pytest.mark.parametrize("std", ["0", "-0.5", "inf", "nan"])
def test_a_zero_or_non_finite_std_is_refused_before_loading(tmp_path, capsys, monkeypatch, std):
    _no_work(monkeypatch)
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "r"), "--std", std]
    assert "--std must be positive and finite" in _error(capsys, argv)
    monkeypatch.undo()
    monkeypatch.setattr(cli, "_loader", lambda *a, **k: pytest.fail("a model was loaded"))
    assert "--mean must be finite" in _error(
        capsys, ["explain", "--model", "zoo:resnet_digits", "--input", "x.png", "--mean", "nan"]
    )


def test_sample_to_a_non_image_name_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    err = _error(capsys, ["sample", "zoo:digits", "--out", str(tmp_path / "s.txt")])
    assert "s.txt: give an image file name" in err and not (tmp_path / "s.txt").exists()


def test_a_file_that_is_no_image_is_named_plainly(tmp_path):
    from relprop.specs import SpecError, read_image

    bad = tmp_path / "b.png"
    bad.write_bytes(b"junk")
    with pytest.raises(SpecError, match=r"^cannot read image .*b\.png: not an image file Pillow can read"):
        read_image(bad)


def test_empty_label_cells_are_named_as_such_and_still_run_with_labels_ignore(tmp_path):
    from relprop.specs import SpecError, load_data
    from relprop.specs.labels import map_labels

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,positive\nthe movie,\nbad,negative\n")
    data = load_data(str(path))
    with pytest.raises(SpecError, match=r"^data labels '' \(empty label cells\) match no class .*--labels ignore"):
        map_labels(data.class_names, ["negative", "positive"], 2, policy="names", model_name="m")
    lm = map_labels(data.class_names, ["negative", "positive"], 2, policy="ignore", model_name="m")
    assert lm.warnings and "(empty label cells)" in lm.warnings[0]


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_names_the_option(tmp_path, capsys, monkeypatch, seed):
    _no_work(monkeypatch)
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "r"), "--seed", seed]
    assert f"--seed must be between 0 and 2**32 - 1, got {seed}" in _error(capsys, argv)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"std": [0.0]}, "--std must be positive and finite"),
        ({"std": [0.5, -0.5, 0.5]}, "--std must be positive and finite"),
        ({"std": [float("nan")]}, "--std must be positive and finite"),
        ({"mean": [float("nan")]}, "--mean must be finite"),
        ({"mean": [0.1, 0.2], "std": [0.3, 0.3, 0.3]}, r"^--mean has 2 values and --std 3;"),
        ({"mean": [0.1, 0.2, 0.3], "channels": 1}, r"^--mean has 3 values but --channels gives 1 channel;"),
        ({"std": 0.0}, "--std must be positive and finite, got 0.0"),
    ],
)
def test_run_compare_refuses_bad_normalisation_before_any_work(tmp_path, monkeypatch, over, message):
    """The checks live in specs.preprocess, so Python callers get the CLI's error, before a model is loaded."""
    from relprop.report import run_compare
    from relprop.specs import SpecError

    monkeypatch.setattr("relprop.specs.load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    monkeypatch.setattr("relprop.specs.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SpecError, match=message):
        run_compare(["zoo:resnet_digits"], "zoo:digits", ["saliency"], tmp_path / "r", preprocess_overrides=over)
    assert not (tmp_path / "r").exists()


def test_override_preprocess_checks_the_counts_against_the_model_channels():
    from relprop.specs import Preprocess, SpecError, override_preprocess

    rgb = Preprocess(size=(8, 8), channels=3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), source="model")
    with pytest.raises(SpecError, match=r"^--mean has 2 values but the model takes 3 channels; give"):
        override_preprocess(rgb, mean=[0.1, 0.2])  # the model's own std fits: not named
    with pytest.raises(SpecError, match=r"^--std must be positive and finite, got 0"):
        override_preprocess(rgb, std=[0])
    assert rgb.mean == (0.5, 0.5, 0.5)  # the model's own preprocessing is untouched
    ok = override_preprocess(rgb, mean=[0.1], std=[2.0])
    assert (ok.mean, ok.std, ok.source) == ((0.1,), (2.0,), "model + flags")
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(ok(x), (x - 0.1) / 2.0, rtol=0, atol=0)


def test_a_number_for_mean_or_std_is_one_value_and_messages_name_only_what_was_given():
    """``std=0.5`` was ``TypeError: object of type 'float' has no len()``; ``--mean 0.5 0.5`` alone on a
    one-channel model said "mean/std have 2/1 values" (a std nobody gave)."""
    from relprop.specs import Preprocess, SpecError, override_preprocess

    gray = Preprocess(size=(8, 8), channels=1, source="model")
    ok = override_preprocess(gray, mean=0.25, std=0.5)
    assert (ok.mean, ok.std) == ((0.25,), (0.5,))
    x = torch.rand(1, 8, 8)
    torch.testing.assert_close(ok(x), (x - 0.25) / 0.5, rtol=0, atol=0)
    with pytest.raises(SpecError, match=r"^--mean has 2 values but the model takes 1 channel; give --mean/--std"):
        override_preprocess(gray, mean=[0.5, 0.5])
    rgb = Preprocess(channels=1, std=(0.2, 0.2, 0.2), source="model")
    with pytest.raises(SpecError, match=r"^the model's own std has 3 values but the model takes 1 channel;"):
        override_preprocess(rgb, mean=0.5)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.fc = torch.nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize("as_dataset", [False, True])
def test_run_compare_refuses_overrides_on_tensors_before_any_work(tmp_path, as_dataset):
    """Tensors (and datasets) are the models' inputs as given: overrides used to change nothing, silently."""
    from relprop.report import run_compare
    from relprop.specs import SpecError

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    data = list(zip(x, y.tolist())) if as_dataset else (x, y)
    with pytest.raises(SpecError, match=r"^preprocess_overrides \(mean, std\) cannot apply to tensors:.*as given"):
        run_compare({"m": _Tiny()}, data, ["saliency"], tmp_path / "r", preprocess_overrides={"mean": [0.5], "std": 2})
    assert not (tmp_path / "r").exists()


def test_run_compare_checks_a_module_channels_against_the_overrides_before_any_work(tmp_path):
    """A mean count that does not fit a model in memory was a failed "could not load the model" later."""
    from relprop.report import run_compare
    from relprop.specs import Data, SpecError

    data = Data(spec="folder:x", name="x", kind="image", labels=torch.tensor([0, 1]), class_names=["a", "b", "c"],
                images=torch.rand(2, 1, 8, 8))  # fmt: skip
    with pytest.raises(SpecError, match=r"^--mean has 3 values but the model takes 1 channel;"):
        run_compare({"m": _Tiny()}, data, ["saliency"], tmp_path / "r", preprocess_overrides={"mean": [0.1, 0.2, 0.3]})
    assert not (tmp_path / "r").exists()


def test_an_unwritable_report_folder_is_refused_before_any_model_loads(capsys, monkeypatch):
    """It loaded the models, then failed with a bare "No such file or directory"."""
    _no_work(monkeypatch)
    err = _error(capsys, ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", "/proc/nope/x"])
    assert "--out /proc/nope/x: the report folder cannot be made there (/proc is not a writable folder" in err
    assert not list(__import__("pathlib").Path("/proc").glob(".relprop-check-*"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--engine", "ray", "--workers", "-2"], "--workers must be at least 1, got -2"),
        (["--model-files-limit", "-1"], "--model-files-limit must be >= 0 (MiB), got -1"),
    ],
)
def test_ray_numbers_out_of_range_are_refused_first(tmp_path, capsys, monkeypatch, extra, message):
    _no_work(monkeypatch)
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "r"), *extra]
    assert message in _error(capsys, argv)


def test_ray_options_on_a_local_run_are_said_once(tmp_path, capsys, monkeypatch):
    """--model-files shared / --workers 3 without --engine ray were silently ignored."""
    monkeypatch.setattr("relprop.specs.load_data", lambda *a, **k: (_ for _ in ()).throw(SystemExit(7)))
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(tmp_path / "r"), "--workers", "3",
            "--model-files=shared"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "relprop: WARNING: --workers, --model-files only apply with --engine ray; ignored" in err
    with pytest.raises(SystemExit):
        main([*argv, "--engine", "ray"])
    assert "WARNING" not in capsys.readouterr().err


def test_run_compare_checks_a_spec_strings_channels_against_the_overrides_before_any_work(tmp_path, monkeypatch):
    """Spec strings from Python: a mean count that does not fit the model's channels was a failed model
    ("could not load the model") after the models before it had run; now one error before any cell, through
    the same check (override_preprocess) as models in memory. One value fits any model: nothing loaded early."""
    from relprop.report import compare, run_compare
    from relprop.specs import SpecError

    cells: list = []
    monkeypatch.setattr(compare.Job, "compute_cell", lambda *a, **k: cells.append(1))
    with pytest.raises(SpecError, match=r"^--mean has 3 values but the model takes 1 channel;"):
        run_compare(["zoo:resnet_digits", "zoo:vgg_digits"], "zoo:digits", ["saliency"], tmp_path / "r",
                    preprocess_overrides={"mean": [0.1, 0.2, 0.3]})  # fmt: skip
    assert cells == [] and not (tmp_path / "r").exists()
    loaded: list = []
    import relprop.specs as specs

    real = specs.load_model
    monkeypatch.setattr(specs, "load_model", lambda spec, **k: loaded.append(spec) or real(spec, **k))
    from relprop.specs import load_data
    from relprop.specs.adapters import check_overrides_fit

    data = load_data("zoo:digits")
    check_overrides_fit({"mean": 0.2, "std": [0.5]}, data, ["zoo:resnet_digits"], load=specs.load_model)
    assert loaded == []  # one value: no model loaded to check it
    check_overrides_fit({"mean": [0.2, 0.2, 0.2]}, data, ["nope:missing"], load=specs.load_model)  # left to its turn
