"""relprop.visualize: overlays, sign modes, shared scales, colour maps, word pieces, terminal output."""

import io

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from relprop import visualize as V  # noqa: E402


def test_overlay_shows_the_input_where_the_map_is_zero_and_the_colour_where_it_is_strong():
    from matplotlib import colormaps

    img = torch.linspace(0, 1, 16).reshape(1, 4, 4)
    a = np.zeros((4, 4))
    a[0, 0], a[3, 3] = 2.0, -2.0
    rgb, sc = V.overlay(a, img, sign="all", scale=2.0, alpha=1.0)
    assert (sc.vmin, sc.vmax) == (-2.0, 2.0)
    g = img[0].numpy()
    np.testing.assert_allclose(rgb[1, 1], [0.2 + 0.6 * g[1, 1]] * 3)  # dimmed grey input
    np.testing.assert_allclose(rgb[0, 0], colormaps["bwr"](1.0)[:3])  # full red: +scale
    np.testing.assert_allclose(rgb[3, 3], colormaps["bwr"](0.0)[:3])  # full blue: -scale


def test_sign_modes_and_a_diverging_map_centred_on_zero():
    a = np.array([[-1.0, 0.0, 3.0]])
    rgba, sc = V.heatmap_rgba(a, sign="all", percentile=100)
    assert (sc.vmin, sc.vmax) == (-3.0, 3.0)  # symmetric even though the map is mostly positive
    from matplotlib import colormaps

    np.testing.assert_allclose(rgba[0, 1], colormaps["bwr"](0.5))  # zero is the centre colour
    _, sc = V.heatmap_rgba(a, sign="positive", percentile=100)
    assert (sc.vmin, sc.vmax) == (0.0, 3.0)
    neg, sc = V.heatmap_rgba(a, sign="negative", percentile=100)
    assert (sc.vmin, sc.vmax) == (0.0, 1.0)
    np.testing.assert_allclose(neg[0, 0], colormaps["Blues"](1.0))  # the evidence against, at full strength
    np.testing.assert_allclose(neg[0, 2], colormaps["Blues"](0.0))  # positive evidence is not "negative"
    ab, _ = V.heatmap_rgba(a, sign="absolute", cmap="viridis", percentile=100)
    np.testing.assert_allclose(ab[0, 2], colormaps["viridis"](1.0))
    with pytest.raises(ValueError, match="sign must be one of"):
        V.heatmap_rgba(a, sign="pos")


def test_shared_scale_keeps_magnitudes_comparable_per_image_does_not():
    a = np.random.default_rng(0).normal(size=(8, 8))
    fig = V.image([a, 10 * a], method="heatmap", scale="shared", percentile=100)
    assert fig._relprop_scale.vmax == pytest.approx(np.abs(10 * a).max())
    ax0, ax1 = fig.axes[0], fig.axes[1]
    small, big = ax0.images[0].get_array(), ax1.images[0].get_array()
    assert np.abs(small[..., 0] - small[..., 2]).mean() < np.abs(big[..., 0] - big[..., 2]).mean() / 3  # paler
    fig = V.image([a, 10 * a], method="heatmap", scale="per-image", percentile=100)
    drawn = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    np.testing.assert_allclose(drawn[0], drawn[1])
    # one colour bar for the shared scale, one per image otherwise
    assert len(V.image([a, a], method="heatmap", scale="shared").axes) == 3
    assert len(V.image([a, a], method="heatmap", scale="per-image").axes) == 4


def test_image_takes_batches_channels_any_cmap_and_dollar_titles():
    x = torch.rand(2, 3, 6, 6)
    a = torch.randn(2, 3, 6, 6)
    fig = V.image(a, x, method="overlay", cmap="coolwarm", titles=["$5 bill", "cat"])
    assert fig.axes[0].get_title() == r"\$5 bill"
    fig.canvas.draw()  # mathtext would fail on an unbalanced $
    np.testing.assert_allclose(V.reduce_channels(a[0]), a[0].sum(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the inputs"):
        V.image(a, method="overlay")


def test_word_pieces_merge_into_words_with_summed_scores():
    toks = ["[CLS]", "un", "##believ", "##able", "film", "[SEP]"]
    words, vals, groups = V.merge_wordpieces(toks, [0.1, 1.0, 2.0, -0.5, 0.25, 0.0])
    assert words == ["[CLS]", "unbelievable", "film", "[SEP]"]
    assert vals == pytest.approx([0.1, 2.5, 0.25, 0.0])
    assert groups[1] == [1, 2, 3]
    words, vals, _ = V.merge_wordpieces(["▁A", "▁gui", "tar", "▁plays"], [1, 2, 3, 4])
    assert words == ["A", "guitar", "plays"] and vals == [1, 5, 4]
    html = V.tokens_html(toks, [0.1, 1.0, 2.0, -0.5, 0.25, 0.0])
    assert ">unbelievable<" in html and "un +1" in html and "##able -0.5" in html  # raw pieces on hover


def test_terminal_scores_are_readable_and_coloured():
    rich = pytest.importorskip("rich")
    from rich.console import Console

    assert V.readable_scale([3e-5, -1e-5]) == (pytest.approx(1e-5), "×1e-5")
    assert V.readable_scale([0.5, 2.0]) == (1.0, "")
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, color_system="truecolor", width=100)
    V.print_tokens(["a", "gui", "##tar"], {"lrp": [3e-5, -1e-5, 0.5e-5]}, console=con)
    out = buf.getvalue()
    assert rich.__version__ if hasattr(rich, "__version__") else True
    assert "×1e-5" in out and "+3.00" in out and "-0.50" in out and "guitar" in out
    assert "0.0000" not in out and "\x1b[" in out  # colour codes


def test_tokens_figure_draws_every_section_with_merged_words_and_one_scale_per_method(tmp_path):
    from matplotlib import colormaps
    from PIL import Image

    a = ["[CLS]", "a", "man", "plays", "a", "gui", "##tar", "[SEP]"]
    b = ["[CLS]", "some", "##one", "makes", "music", "$5", "[SEP]"]
    sections = [
        ("sentence A", a, {"lrp": [0, 0.1, 0.5, 0.2, 0.0, 1.0, 1.0, 0], "gradient": [0, 1, 2, 3, 4, 5, 6, 7]}),
        ("sentence B", b, {"lrp": [0, 0.5, 0.5, -4.0, 0.3, 0.1, 0], "gradient": [1, 1, 1, 1, 1, 1, 1]}),
    ]
    fig = V.tokens_figure(sections, title="pair")
    rows = fig.relprop_rows
    assert [(r.section, r.method) for r in rows] == [
        ("sentence A", "lrp"), ("sentence A", "gradient"), ("sentence B", "lrp"), ("sentence B", "gradient")
    ]  # fmt: skip
    assert rows[0].words == ["[CLS]", "a", "man", "plays", "a", "guitar", "[SEP]"]
    assert rows[0].scores[5] == pytest.approx(2.0)  # gui + ##tar
    assert rows[2].words == ["[CLS]", "someone", "makes", "music", "$5", "[SEP]"]
    # one colour scale per method over both sentences: A and B compare (|-4| in B sets lrp's scale)
    assert rows[0].scale == rows[2].scale == V.Scale(-4.0, 4.0)
    assert rows[1].scale == rows[3].scale == V.Scale(-11.0, 11.0)  # merged gui + ##tar = 5 + 6
    drawn: dict = {}
    for t in fig.texts:  # the first drawing of each word: the lrp row of its sentence
        drawn.setdefault(t.get_text(), t)
    assert {"pair", "sentence A", "sentence B", "guitar", "someone", "music", "$5"} <= set(drawn)
    assert "##tar" not in drawn and "gui" not in drawn
    red = drawn["makes"].get_bbox_patch().get_facecolor()
    np.testing.assert_allclose(red[:3], colormaps["bwr"](0.0)[:3])  # -4: full blue ("against")
    # the whole pair is in the picture: sentence B's lines lie below sentence A's, inside the figure
    fig.canvas.draw()
    ya, yb = drawn["guitar"].get_window_extent().y0, drawn["music"].get_window_extent().y0
    assert 0 < yb < ya < fig.bbox.height
    fig.savefig(tmp_path / "t.png", dpi=100)
    one = V.tokens_figure(sections[:1], title="pair")
    one.savefig(tmp_path / "one.png", dpi=100)
    h2, h1 = Image.open(tmp_path / "t.png").size[1], Image.open(tmp_path / "one.png").size[1]
    assert h2 > 1.6 * h1
    # long texts wrap inside the width instead of running off the picture
    long = V.tokens_figure([("", [f"word{i}" for i in range(60)], {"lrp": list(range(60))})], width=6)
    long.canvas.draw()
    assert max(t.get_window_extent().x1 for t in long.texts) <= long.bbox.width
    assert len({round(t.get_position()[1], 3) for t in long.texts}) > 3  # several lines
    with pytest.raises(ValueError, match="scale must be"):
        V.tokens_figure(sections, scale="shared")
