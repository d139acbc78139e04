"""Rendering of attribution results: token heatmaps as HTML, series and matrices as PNG.

Everything here takes plain numpy arrays (a jax array converts on the way in) and writes files
(local paths or object-store URLs such as gs://, through `etils.epath`) or returns strings, so
it can run after the model is gone. Plots use matplotlib's object API with the Agg canvas, never
`pyplot`, so rendering leaves no global figure state behind and needs no display.

- `html_heatmap` / `write_html`: one coloured `<span>` per token, red for positive attribution,
  blue for negative, with a legend and an optional metrics table; a self-contained HTML5 page.
- `series_png`: a forecasting input coloured by its attribution, with bars per time step.
- `matrix_png`: a [t, t] map such as an attention rollout (rows = outputs, columns = inputs).
- `display_tokens`: the display strings of a byte-level tokenised text.
"""

from __future__ import annotations

import html
import io
import unicodedata
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

_POSITIVE_RGB = (220, 38, 38)
_NEGATIVE_RGB = (37, 99, 235)
_MAX_CHANNELS = 4
_MAX_MATRIX_LABELS = 64
_DPI = 110

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #111; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
.subtitle { color: #555; margin-top: 0; }
.text {
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd; border-radius: 4px;
  padding: 0.8em; word-break: break-all;
}
.tok { border-radius: 2px; padding: 1px 0; }
.legend { display: flex; align-items: center; gap: 0.6em; margin: 1em 0; font-size: 0.9em; }
.legend .bar {
  display: inline-block; width: 16em; height: 1em; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba(37, 99, 235, 1), rgba(37, 99, 235, 0) 50%,
    rgba(220, 38, 38, 0) 50%, rgba(220, 38, 38, 1));
}
table.metrics { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 0.2em 0.7em; }
table.metrics th { text-align: left; font-weight: normal; color: #333; }
table.metrics td { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
"""


def _escape_char(ch: str) -> str:
  """Returns a visible stand-in for a control character or an undecodable byte, else `ch`.

  Undecodable bytes arrive as lone surrogates U+DC80..U+DCFF (Python's `surrogateescape`) and are
  shown as the original byte, `\\xNN`.
  """
  code = ord(ch)
  if 0xDC80 <= code <= 0xDCFF:
    return f"\\x{code - 0xDC00:02x}"
  category = unicodedata.category(ch)
  if category == "Cc":  # C0 and C1 controls and DEL: all below 256.
    return f"\\x{code:02x}"
  if category == "Cs":
    return f"\\u{code:04x}"
  return ch


def _as_text(token: str | bytes) -> str:
  if isinstance(token, bytes | bytearray):
    return bytes(token).decode("utf-8", errors="surrogateescape")
  return str(token)


def _printable(token: str | bytes) -> str:
  """A one-line plain-text form of a token: newline as "⏎", tab as "⇥", controls as `\\xNN`."""
  out = []
  for ch in _as_text(token):
    if ch == "\n":
      out.append("⏎")
    elif ch == "\t":
      out.append("⇥")
    else:
      out.append(_escape_char(ch))
  return "".join(out)


def _token_html(token: str | bytes) -> str:
  """The HTML content of a token's span: escaped, newline as "⏎<br>", tab as "⇥"."""
  out = []
  for ch in _as_text(token):
    if ch == "\n":
      out.append("⏎<br>")
    elif ch == "\t":
      out.append("⇥")
    else:
      out.append(html.escape(_escape_char(ch)))
  return "".join(out)


def _finite_abs_max(values: np.ndarray) -> float:
  finite = np.abs(values[np.isfinite(values)])
  return float(finite.max()) if finite.size else 0.0


def html_heatmap(
  tokens: Sequence[str],
  scores: np.ndarray,
  *,
  title: str,
  subtitle: str = "",
  metrics: Mapping[str, float] | None = None,
  target_index: int | None = None,
) -> str:
  """Renders per-token attribution scores as a self-contained HTML5 page.

  Each token becomes a `<span>` whose background is red (`rgba(220, 38, 38, a)`) for a positive
  score and blue (`rgba(37, 99, 235, a)`) for a negative one, with `a = |score| / max |score|`.
  When every score is zero (or not finite) all alphas are 0. The tooltip of a span holds the
  token's index and its score (`%.4g`).

  Args:
    tokens: the display string of each token (see `display_tokens` for byte-level text). Spaces
      are kept, a newline shows as "⏎" followed by a line break, a tab as "⇥" and other control
      characters or undecodable bytes as `\\xNN`.
    scores: [n] attribution of each token.
    title: page and heading title.
    subtitle: an optional line under the title.
    metrics: optional name -> value pairs shown in a table (`%.4g`).
    target_index: the position whose prediction is explained; its span gets an outline. Negative
      values count from the end.

  Returns:
    The HTML document as a string; no scripts and no external resources.

  Raises:
    ValueError: if `scores` is not 1-D, its length differs from `tokens`, or `target_index` is
      out of range.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D (one per token), got shape {scores.shape}")
  n = len(tokens)
  if scores.shape[0] != n:
    raise ValueError(f"got {n} tokens but {scores.shape[0]} scores; they must match one to one")
  if target_index is not None:
    if not -n <= target_index < n:
      raise ValueError(f"target_index {target_index} is out of range for {n} tokens")
    target_index %= n

  peak = _finite_abs_max(scores)
  spans = []
  for i, (token, score) in enumerate(zip(tokens, scores, strict=True)):
    alpha = abs(score) / peak if peak > 0 and np.isfinite(score) else 0.0
    alpha = min(max(alpha, 0.0), 1.0)
    rgb = _NEGATIVE_RGB if score < 0 else _POSITIVE_RGB
    style = f"background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f});"
    if alpha > 0.6:
      style += " color: #fff;"
    if i == target_index:
      style += " outline: 2px solid #111; outline-offset: 1px;"
    tooltip = html.escape(f"#{i} score={score:.4g}", quote=True)
    spans.append(f'<span class="tok" style="{style}" title="{tooltip}">{_token_html(token)}</span>')

  parts = [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    f"<title>{html.escape(title)}</title>",
    f"<style>{_CSS}</style>",
    "</head>",
    "<body>",
    f"<h1>{html.escape(title)}</h1>",
  ]
  if subtitle:
    parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
  parts.append(
    '<div class="legend"><span>negative</span>'
    f"<span>{-peak:.4g}</span>"
    '<span class="bar" title="attribution colour scale"></span>'
    f"<span>{peak:.4g}</span><span>positive</span>"
    f"<span>(0 = uncoloured; max |score| = {peak:.4g})</span></div>"
  )
  if target_index is not None:
    parts.append(f'<p class="subtitle">Outlined: the explained position, #{target_index}.</p>')
  parts.append(f'<div class="text">{"".join(spans)}</div>')
  if metrics:
    rows = "".join(
      f"<tr><th>{html.escape(str(name))}</th><td>{float(value):.4g}</td></tr>"
      for name, value in metrics.items()
    )
    parts.append(f'<table class="metrics"><tbody>{rows}</tbody></table>')
  parts += ["</body>", "</html>", ""]
  return "\n".join(parts)


def write_html(path: epath.PathLike, html: str) -> epath.Path:
  """Writes an HTML document as UTF-8, creating parent directories.

  Args:
    path: destination file (a local path or a URL such as gs://bucket/report.html).
    html: the document, e.g. from `html_heatmap`.

  Returns:
    The path written, as an `epath.Path`.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(html, encoding="utf-8")
  return path


def _new_figure(figsize: tuple[float, float], *, constrained: bool = True):
  """A fresh Agg-backed figure that is not registered with pyplot."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: epath.PathLike) -> epath.Path:
  """Renders `fig` as a PNG into memory, then writes it with one upload (any epath URL)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  png = io.BytesIO()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
      fig.savefig(png, format="png", dpi=_DPI)
  finally:
    fig.clear()
  path.write_bytes(png.getvalue())
  return path


def _symmetric_norm(values: np.ndarray):
  from matplotlib.colors import Normalize

  peak = _finite_abs_max(values)
  peak = peak if peak > 0 else 1.0
  return Normalize(vmin=-peak, vmax=peak)


def _mathtext_safe(label: str) -> str:
  return label.replace("$", r"\$")


def series_png(
  path: epath.PathLike,
  series: np.ndarray,
  scores: np.ndarray,
  *,
  forecast: np.ndarray | None = None,
  title: str = "",
  channel_names: Sequence[str] | None = None,
) -> epath.Path:
  """Plots a time series coloured by its attribution, with an optional forecast, as a PNG.

  Each channel (at most the first 4) gets two stacked panels sharing the x axis: on top the input
  series, each point and segment coloured by its attribution on a diverging map symmetric around 0,
  followed by the forecast as a dashed grey line; below, the attribution of each step as bars in
  the same colours. One colorbar serves all channels.

  Args:
    path: destination PNG; parent directories are created.
    series: [l, c] input, or [l] for one channel.
    scores: attribution with the same shape as `series`.
    forecast: optional [o, c] prediction ([o] allowed for one channel), drawn at steps l..l+o-1.
    title: figure title.
    channel_names: optional name per channel (length c).

  Returns:
    The path written, as an `epath.Path`.

  Raises:
    ValueError: on any shape mismatch between the arrays or with `channel_names`.
  """
  from matplotlib import colormaps
  from matplotlib.cm import ScalarMappable
  from matplotlib.collections import LineCollection

  series = np.asarray(series, dtype=np.float64)
  scores = np.asarray(scores, dtype=np.float64)
  if series.ndim == 1:
    series = series[:, None]
    if scores.ndim == 1:
      scores = scores[:, None]
  if series.ndim != 2 or series.shape[0] == 0:
    raise ValueError(f"series must be [l] or [l, c] with l > 0, got shape {series.shape}")
  length, channels = series.shape
  if scores.shape != series.shape:
    raise ValueError(f"scores shape {scores.shape} must match series shape {series.shape}")
  if forecast is not None:
    forecast = np.asarray(forecast, dtype=np.float64)
    if forecast.ndim == 1 and channels == 1:
      forecast = forecast[:, None]
    if forecast.ndim != 2 or forecast.shape[1] != channels:
      raise ValueError(f"forecast must be [o, {channels}] to match series, got {forecast.shape}")
  if channel_names is not None and len(channel_names) != channels:
    raise ValueError(f"got {len(channel_names)} channel names for {channels} channels")

  shown = min(channels, _MAX_CHANNELS)
  cmap = colormaps["RdBu_r"]
  norm = _symmetric_norm(scores[:, :shown])
  # A fixed layout (margins in inches) is much cheaper to draw than a constrained one.
  height = 3.4 * shown + 1.0
  fig = _new_figure((10.0, height), constrained=False)
  bottom_margin, top_margin = 0.6 / height, 1.0 - 0.6 / height
  fig.subplots_adjust(left=0.08, right=0.86, bottom=bottom_margin, top=top_margin)
  outer = fig.add_gridspec(shown, 1, hspace=0.22)
  axes = []
  steps = np.arange(length)
  for ch in range(shown):
    pair = outer[ch].subgridspec(2, 1, height_ratios=[2.2, 1.0], hspace=0.08)
    top = fig.add_subplot(pair[0])
    bottom = fig.add_subplot(pair[1], sharex=top)
    axes += [top, bottom]
    values, attribution = series[:, ch], np.nan_to_num(scores[:, ch])
    colours = cmap(norm(attribution))
    name = channel_names[ch] if channel_names is not None else f"channel {ch}"
    name = _mathtext_safe(_printable(name))

    # A grey underlay keeps near-zero (near-white) stretches of the series visible.
    top.plot(steps, values, color="0.85", linewidth=3.5, zorder=1, solid_capstyle="round")
    if length > 1:
      points = np.stack([steps, values], axis=1)
      segments = np.stack([points[:-1], points[1:]], axis=1)
      line = LineCollection(segments, colors=cmap(norm((attribution[:-1] + attribution[1:]) / 2)))
      line.set_linewidth(2.0)
      top.add_collection(line)
    top.scatter(steps, values, c=colours, s=14, zorder=3, edgecolors="none")
    if forecast is not None and forecast.shape[0] > 0:
      future = np.arange(length - 1, length + forecast.shape[0])
      continued = np.concatenate([values[-1:], forecast[:, ch]])
      top.plot(future, continued, linestyle="--", color="0.45", linewidth=1.6, label="forecast")
      top.axvline(length - 0.5, color="0.7", linestyle=":", linewidth=1.0)
      top.legend(loc="upper left", fontsize="small", frameon=False)
    top.autoscale_view()
    top.set_ylabel(name)
    top.tick_params(labelbottom=False)
    top.grid(alpha=0.25)

    bottom.bar(steps, attribution, color=colours, width=0.9)
    bottom.axhline(0.0, color="0.3", linewidth=0.6)
    bottom.set_ylabel("attribution")
    bottom.grid(alpha=0.25, axis="y")
    if ch == shown - 1:
      bottom.set_xlabel("time step")
    else:
      bottom.tick_params(labelbottom=False)

  span = top_margin - bottom_margin
  colorbar_axes = fig.add_axes((0.885, bottom_margin + 0.1 * span, 0.015, 0.8 * span))
  fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_axes, label="attribution")
  heading = _mathtext_safe(title)
  if channels > shown:
    heading = f"{heading} (first {shown} of {channels} channels)".strip()
  if heading:
    fig.suptitle(heading)
  return _save(fig, path)


def matrix_png(
  path: epath.PathLike,
  matrix: np.ndarray,
  *,
  labels: Sequence[str] | None = None,
  title: str = "",
) -> epath.Path:
  """Plots a [t, t] map (rows = queries / outputs, columns = inputs) as a PNG heatmap.

  A non-negative matrix (e.g. an attention rollout) uses a sequential colormap; one with negative
  entries uses a diverging map symmetric around 0.

  Args:
    path: destination PNG; parent directories are created.
    matrix: [t, t] values.
    labels: optional display string per position (length t), used as tick labels when t <= 64
      (newline as "⏎", tab as "⇥", controls as `\\xNN`); larger maps get no tick labels.
    title: figure title.

  Returns:
    The path written, as an `epath.Path`.

  Raises:
    ValueError: if `matrix` is not square 2-D or `labels` has the wrong length.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
    raise ValueError(f"matrix must be square [t, t] with t > 0, got shape {matrix.shape}")
  t = matrix.shape[0]
  if labels is not None and len(labels) != t:
    raise ValueError(f"got {len(labels)} labels for a [{t}, {t}] matrix")

  finite = matrix[np.isfinite(matrix)]
  if finite.size and finite.min() < 0:
    cmap, norm = "RdBu_r", _symmetric_norm(matrix)
  else:
    cmap, norm = "viridis", None
  side = float(np.clip(2.5 + 0.2 * t, 5.0, 14.0))
  fig = _new_figure((side + 1.2, side))
  ax = fig.subplots()
  image = ax.imshow(matrix, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
  fig.colorbar(image, ax=ax, shrink=0.8)
  if labels is not None and t <= _MAX_MATRIX_LABELS:
    shown = [_mathtext_safe(_printable(label)) for label in labels]
    fontsize = 9 if t <= 24 else 7 if t <= 40 else 5
    ax.set_xticks(np.arange(t), shown, rotation=90, fontsize=fontsize)
    ax.set_yticks(np.arange(t), shown, fontsize=fontsize)
  elif t > _MAX_MATRIX_LABELS:
    ax.set_xticks([])
    ax.set_yticks([])
  ax.set_xlabel("input position")
  ax.set_ylabel("output position")
  if title:
    ax.set_title(_mathtext_safe(title))
  return _save(fig, path)


def _utf8_length(lead: int) -> int:
  """The byte length a UTF-8 sequence starting with `lead` claims; 0 if `lead` cannot start one."""
  if 0xC2 <= lead <= 0xDF:
    return 2
  if 0xE0 <= lead <= 0xEF:
    return 3
  if 0xF0 <= lead <= 0xF4:
    return 4
  return 0


def display_tokens(data: bytes) -> list[str]:
  """Display strings for byte-level tokens, one per byte of `data`.

  Printable ASCII, "\\n" and "\\t" map to themselves (`html_heatmap` renders the last two); other
  ASCII controls become `\\xNN`. A valid multi-byte UTF-8 character is put whole on its first byte,
  with "" on the continuation bytes, so a heatmap reads as the original text. Invalid bytes
  (stray continuations, truncated or overlong sequences) become `\\xNN`.

  Args:
    data: the raw bytes of the text.

  Returns:
    A list with `len(data)` strings.
  """
  data = bytes(data)
  out: list[str] = []
  i = 0
  while i < len(data):
    byte = data[i]
    if byte < 0x80:
      out.append(chr(byte) if chr(byte) in "\n\t" else _escape_char(chr(byte)))
      i += 1
      continue
    size = _utf8_length(byte)
    try:
      char = data[i : i + size].decode("utf-8") if size else None
    except UnicodeDecodeError:
      char = None
    if char is None or len(char) != 1:
      out.append(f"\\x{byte:02x}")
      i += 1
      continue
    out.append(_escape_char(char))
    out.extend([""] * (size - 1))
    i += size
  return out
