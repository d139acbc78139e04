"""Attribution rendering: HTML token heatmaps, series and matrix PNGs, byte-level display tokens."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fulcrum.platform.attribution import report

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SPAN = re.compile(r'<span class="tok" style="([^"]*)" title="([^"]*)">(.*?)</span>', re.DOTALL)
_RGBA = re.compile(r"rgba\((\d+), (\d+), (\d+), ([0-9.]+)\)")


def _spans(page: str) -> list[tuple[str, str, str]]:
  return _SPAN.findall(page)


def _colour(style: str) -> tuple[tuple[int, int, int], float]:
  match = _RGBA.search(style)
  assert match, style
  r, g, b, a = match.groups()
  return (int(r), int(g), int(b)), float(a)


def _assert_png(path: Path) -> None:
  assert path.is_file()
  data = path.read_bytes()
  assert data[:8] == _PNG_SIGNATURE
  assert len(data) > 2000


def test_html_is_a_self_contained_document_with_one_span_per_token():
  page = report.html_heatmap(["a", "b", "c"], np.array([0.1, 0.2, 0.3]), title="T", subtitle="S")
  assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
  assert len(_spans(page)) == 3
  assert "<script" not in page and "http://" not in page and "https://" not in page
  assert "white-space: pre-wrap" in page
  assert "<h1>T</h1>" in page and "S" in page


def test_html_escapes_tokens_and_title():
  page = report.html_heatmap(
    ["<script>", "&", ' "q" '], np.array([1.0, -1.0, 0.5]), title="<b>x & y</b>"
  )
  assert "<script>" not in page
  contents = [content for _, _, content in _spans(page)]
  assert contents == ["&lt;script&gt;", "&amp;", " &quot;q&quot; "]
  assert "&lt;b&gt;x &amp; y&lt;/b&gt;" in page


def test_html_colour_sign_and_scale():
  page = report.html_heatmap(["p", "n", "z", "h"], np.array([2.0, -4.0, 0.0, 1.0]), title="t")
  (p, _, _), (n, _, _), (z, _, _), (h, _, _) = _spans(page)
  assert _colour(p) == ((220, 38, 38), pytest.approx(0.5))
  assert _colour(n) == ((37, 99, 235), pytest.approx(1.0))
  assert _colour(z)[1] == 0.0
  assert _colour(h) == ((220, 38, 38), pytest.approx(0.25))


def test_html_all_zero_scores_give_no_colour():
  page = report.html_heatmap(["a", "b"], np.zeros(2), title="t")
  assert [_colour(style)[1] for style, _, _ in _spans(page)] == [0.0, 0.0]
  assert "nan" not in page.lower()


def test_html_tooltip_holds_index_and_score():
  scores = np.array([0.0, 0.123456789, -3.5e-7])
  page = report.html_heatmap(["a", "b", "c"], scores, title="t")
  titles = [tooltip for _, tooltip, _ in _spans(page)]
  for i, (tooltip, score) in enumerate(zip(titles, scores, strict=True)):
    assert f"#{i} " in tooltip
    assert format(score, ".4g") in tooltip
  assert "0.1235" in titles[1] and "-3.5e-07" in titles[2]


def test_html_renders_whitespace_and_control_characters():
  page = report.html_heatmap(
    ["a b", "\n", "\t", "\x00", "\udcff"], np.array([1.0, 1.0, 1.0, 1.0, 1.0]), title="t"
  )
  contents = [content for _, _, content in _spans(page)]
  assert contents == ["a b", "⏎<br>", "⇥", "\\x00", "\\xff"]


def test_html_outlines_the_target():
  page = report.html_heatmap(["a", "b", "c"], np.ones(3), title="t", target_index=-2)
  outlined = ["outline" in style for style, _, _ in _spans(page)]
  assert outlined == [False, True, False]
  with pytest.raises(ValueError, match="target_index"):
    report.html_heatmap(["a"], np.ones(1), title="t", target_index=1)


def test_html_metrics_table_and_legend():
  page = report.html_heatmap(
    ["a"], np.array([-2.5]), title="t", metrics={"deletion AUC": 0.123456, "loss<": 2.0}
  )
  assert '<table class="metrics">' in page
  assert "<th>deletion AUC</th><td>0.1235</td>" in page
  assert "<th>loss&lt;</th><td>2</td>" in page
  assert 'class="legend"' in page and "2.5" in page
  assert "<table" not in report.html_heatmap(["a"], np.ones(1), title="t")


def test_html_shape_errors():
  with pytest.raises(ValueError, match="2 tokens but 3 scores"):
    report.html_heatmap(["a", "b"], np.ones(3), title="t")
  with pytest.raises(ValueError, match="1-D"):
    report.html_heatmap(["a", "b"], np.ones((2, 1)), title="t")


def test_write_html_creates_directories(tmp_path):
  page = report.html_heatmap(["é", "😀"], np.array([1.0, -1.0]), title="t")
  path = report.write_html(tmp_path / "a" / "b" / "page.html", page)
  assert path == tmp_path / "a" / "b" / "page.html"
  assert path.read_text(encoding="utf-8") == page


@pytest.mark.parametrize(
  ("shape", "with_forecast"),
  [((24,), False), ((24,), True), ((24, 3), False), ((24, 3), True)],
)
def test_series_png_writes_a_png(tmp_path, shape, with_forecast):
  rng = np.random.default_rng(0)
  series = rng.normal(size=shape).cumsum(axis=0)
  scores = rng.normal(size=shape)
  forecast = rng.normal(size=(8, *shape[1:])) if with_forecast else None
  names = [f"c{i}" for i in range(shape[1])] if len(shape) == 2 else None
  path = report.series_png(
    tmp_path / "out" / "series.png",
    series,
    scores,
    forecast=forecast,
    title="series $x$",
    channel_names=names,
  )
  assert path == tmp_path / "out" / "series.png"
  _assert_png(path)


def test_series_png_handles_many_channels_and_zero_scores(tmp_path):
  series = np.linspace(0, 1, 60).reshape(10, 6)
  _assert_png(report.series_png(tmp_path / "s.png", series, np.zeros_like(series)))


def test_series_png_rejects_shape_mismatches(tmp_path):
  series = np.zeros((10, 2))
  with pytest.raises(ValueError, match="scores shape"):
    report.series_png(tmp_path / "a.png", series, np.zeros((10, 3)))
  with pytest.raises(ValueError, match="forecast"):
    report.series_png(tmp_path / "b.png", series, np.zeros((10, 2)), forecast=np.zeros((4, 3)))
  with pytest.raises(ValueError, match="channel names"):
    report.series_png(tmp_path / "c.png", series, np.zeros((10, 2)), channel_names=["x"])
  assert not list(tmp_path.iterdir())


def test_matrix_png_small_with_labels_and_large_without(tmp_path):
  rng = np.random.default_rng(0)
  small = report.matrix_png(
    tmp_path / "m" / "small.png",
    rng.uniform(size=(5, 5)),
    labels=["a", "\n", "$", "é", "\x01"],
    title="rollout",
  )
  _assert_png(small)
  large = report.matrix_png(tmp_path / "large.png", rng.normal(size=(100, 100)))
  _assert_png(large)
  with pytest.raises(ValueError, match="square"):
    report.matrix_png(tmp_path / "bad.png", np.zeros((3, 4)))
  with pytest.raises(ValueError, match="labels"):
    report.matrix_png(tmp_path / "bad.png", np.zeros((3, 3)), labels=["a"])


def test_display_tokens_byte_level():
  assert report.display_tokens(b"a\xc3\xa9b\xff") == ["a", "é", "", "b", "\\xff"]
  assert report.display_tokens(b"x\n\t ") == ["x", "\n", "\t", " "]
  assert report.display_tokens("😀".encode()) == ["😀", "", "", ""]
  # A stray continuation byte, a truncated sequence, an overlong encoding and a control byte.
  assert report.display_tokens(b"\x80\xe2\x82") == ["\\x80", "\\xe2", "\\x82"]
  assert report.display_tokens(b"\xc0\xaf\x07") == ["\\xc0", "\\xaf", "\\x07"]


def test_display_tokens_feed_the_heatmap():
  data = "a<é\n".encode()
  tokens = report.display_tokens(data)
  page = report.html_heatmap(tokens, np.arange(len(data), dtype=float), title="t")
  contents = [content for _, _, content in _spans(page)]
  assert contents == ["a", "&lt;", "é", "", "⏎<br>"]
