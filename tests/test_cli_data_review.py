"""CLI checks from the new-user review of data and output options: each refuses before any work."""

from relprop.cli import main


def test_compare_refuses_a_memory_url_before_computing(capsys, monkeypatch):
    import relprop.specs

    def no_data(*a, **k):
        raise AssertionError("data loaded")

    monkeypatch.setattr(relprop.specs, "load_data", no_data)
    rc = main(["compare", "--models", "zoo:resnet_digits", "--methods", "saliency", "--out", "memory://run"])
    err = capsys.readouterr().err
    assert rc != 0 and "--out memory://run: a memory:// file system lives in this process" in err
    assert len(err.strip().splitlines()) == 1


def test_help_names_every_data_source_and_where_options_apply(capsys):
    from relprop.cli import build_parser

    top = build_parser().format_help()
    assert all(s in top for s in ("FILE.parquet", "save_to_disk", "tar shards", "--image-column"))
    subparsers = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    text = " ".join(subparsers["compare"].format_help().split())
    assert "split of a zoo dataset or a saved DatasetDict" in text
    assert "text column of a table/saved dataset" in text and "CSV/JSONL (default" not in text


def test_an_interrupted_ray_run_says_its_shards_are_kept(capsys, monkeypatch, tmp_path):
    import relprop.report

    def stopped(*a, **k):
        return {"status": "interrupted", "models": [], "cells_done": 0, "cells_total": 1, "seconds": 0.0,
                "ranking": [], "warnings": []}  # fmt: skip

    monkeypatch.setattr(relprop.report, "run_compare", stopped)
    argv = ["compare", "--models", "zoo:resnet_digits", "--methods", "saliency", "--samples", "2", "--limit", "8"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--engine", "ray"]) == 130
    err = capsys.readouterr().err
    assert f"finished cells are kept in {tmp_path / 'r' / 'cache'} and finished shards in " in err
    assert "(resumed, not recomputed); run the same command again" in err
