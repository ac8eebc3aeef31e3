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
