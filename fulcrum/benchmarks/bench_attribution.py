"""Attribution: cost per explained sequence and faithfulness, across the architectures.

`fulcrum bench attribution --json` trains (or reuses, in runs/bench_attribution/) four
byte-level LMs of the `demo` recipe's size on the Python standard library — transformer,
mamba (6 layers: 4 give only 1.06M parameters), hawk and griffin (local attention, window
32) — for the same 300 steps of batch 16 × 64 bytes each, and the `forecast` recipe's DLinear
for 300 steps. Each model explains its own prediction on 8 validation sequences (64 bytes for
the LMs, spread evenly over the validation set; 336-step CO2 windows for DLinear) with every
method of `fulcrum.platform.attribution` that applies to it: the gradient methods everywhere,
`layer` (integrated gradients at the output of the middle block, `blocks_{L/2-1}/output`) on
the LMs, `rollout` on the LMs and `hidden_attention` on mamba, hawk and griffin. The target is
the engine's default: log p of the model's top next byte at the last position (DLinear: the
first forecast step). Integrated gradients uses its defaults (64 points, adaptive to a 0.2%
completeness gap); their mean points used and gap are reported.

Cost, per architecture and method (`timing`):

- `seconds_per_sequence`: median over the sequences of the wall time of `attribute(...)` on a
  sequence once its compiled functions exist (each sequence is attributed twice; the second
  call is timed), i.e. the method's compute, not XLA's compile time.
- `peak_memory_mb`: XLA's compiled memory analysis (arguments + outputs + temporaries) of the
  largest compiled call the method makes: the batched forward/backward of
  `core.evaluate_batch` — 1 point for saliency and gradient × input, a chunk of 32 points
  (`batch_size`) for integrated gradients, SmoothGrad and layer — or, for the map methods, the
  larger of the forward pass that collects attention weights and taps (`maps.collect`) and
  each recurrent layer's hidden-attention materialisation (compiled here as one call; the
  engine runs it op by op). Parameters count as arguments. Host-side numpy copies between
  calls are not included, and on a CPU the process RSS is no honest alternative: XLA keeps
  freed buffers resident, so RSS deltas run from 0 to the full footprint for the same call.
- `recompile_seconds_per_sequence` (per architecture): the mean, over the sequences after the
  first, of Σ first-call − Σ second-call time over the methods: the compile time a new
  sequence of the same length still costs. The engine passes the explained token and position
  into its compiled functions as data and pads batches to powers of two, so this is about a
  second at most (integrated gradients' refinement can meet a new batch size); it was 15–20 s
  while `Target` was a static argument. `models[arch]["targets"]` lists the explained bytes;
  the markdown counts the distinct ones.

Faithfulness on the transformer (the headline) and on mamba (`faithfulness[arch]`): deletion
and insertion AUC as `faithfulness.faithfulness` computes them (curves normalised so F(x) ↦ 1 and
F(pad baseline) ↦ 0; deletion lower is better, insertion higher), against the same curves
under 8 random orderings (`random`). `layer` is scored where it attributes, by deleting /
inserting the block output at the ranked positions (the layer activation of the pad input
replaces it), against its own random orderings at that layer (`random_layer`). The tables
give the median over the sequences, and per method on how many sequences it beats that
sequence's random orderings; the JSON also has each sequence's AUC, the means and F(x),
F(pad). Why the median: when the pad input already predicts the explained byte (a space
after a newline and indentation), F(x) − F(pad) is a fraction of a nat while partly deleted
inputs move F by several, so that sequence's normalised AUCs fall far below 0 and swamp a mean.
`randomisation_spearman` (transformer): mean Spearman ρ of |scores| between the trained
weights and freshly initialised ones (Adebayo et al. 2018; near 1 = the method ignores the
model). On mamba, hawk and griffin `rollout` and `hidden_attention` are the same computation
(rollout rolls out the recurrent layers' hidden attention), so their rows agree.

JSON keys: `deletion_auc` and `insertion_auc` (method → median AUC on the transformer, with
`random` and `random_layer`), `randomisation_spearman`, `faithfulness`, `timing`,
`recompile_seconds_per_sequence`, `models` (parameters, validation metric, layer, explained
bytes). About 27 minutes on 2 CPU cores, 14 of them training (13 when runs/ holds the
checkpoints). `--quick` trains narrow 2-layer models for 20 steps, explains 2 sequences of 24
bytes and writes no files (about 2 minutes once its checkpoints exist).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fulcrum import recipes
from fulcrum.benchmarks.common import (
  checkout_root,
  device_description,
  results_dir,
  write_results,
)
from fulcrum.modules import blocks
from fulcrum.modules.model_config import ModelConfig
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.attribution import (
  METHODS,
  Subject,
  attribute,
  core,
  faithfulness,
  maps,
  randomisation_check,
)
from fulcrum.platform.attribution.faithfulness import curves
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.training import trainer

RUNS = checkout_root() / "runs" / "bench_attribution"
# Architecture: (recipe, overrides). Every model trains the same steps on the same batches.
ARCHS = {
  "transformer": ("demo", {}),
  "mamba": ("demo", {"model.arch": "mamba", "model.num_layers": 6}),
  "hawk": ("demo", {"model.arch": "hawk"}),
  "griffin": ("demo", {"model.arch": "griffin", "model.window": 32}),
  "dlinear": ("forecast", {}),
}
LMS = tuple(arch for arch in ARCHS if arch in blocks.BLOCK_ARCHS)  # The block-stack LMs.
HEADLINE = "transformer"
FAITHFULNESS_ARCHS = ("transformer", "mamba")
GRADIENT_POINTS = {"saliency": 1, "grad_x_input": 1}  # Points per compiled call; others 32.
BATCH_SIZE = 32  # `attribute`'s default: points per compiled forward/backward pass.


def _sizes(quick: bool) -> dict[str, int]:
  if quick:
    return dict(steps=20, sequences=2, seq_len=24, random_orders=2)
  return dict(steps=300, sequences=8, seq_len=64, random_orders=8)


def _config(arch: str, quick: bool):
  """The recipe config of `arch`, with the benchmark's training length (and quick sizes)."""
  recipe, overrides = ARCHS[arch]
  config = recipes.get(recipe)
  steps = _sizes(quick)["steps"]
  overrides = {
    **overrides,
    "train.steps": steps,
    "train.eval_every": 0,
    "train.checkpoint_every": steps,
    "train.progress": False,
  }
  if arch in LMS:
    overrides |= {"train.seq_len": 64, "optimizer.warmup_steps": 50}
    if quick:
      layers = 3 if arch == "griffin" else 2  # Griffin: recurrent, recurrent, attention.
      overrides |= {
        "model.d_model": 64,
        "model.num_layers": layers,
        "train.batch_size": 8,
        "train.seq_len": 32,
        "optimizer.warmup_steps": 5,
      }
  elif quick:
    overrides["optimizer.warmup_steps"] = 5
  with config.unlocked():
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


def _train(arch: str, quick: bool):
  """(experiment, train state, final validation metrics) of `arch`, trained once and reused."""
  workdir = RUNS / ("quick" if quick else "full") / arch
  metrics = trainer.train(_config(arch, quick), workdir)
  exp, state, _ = workdir_lib.load(workdir)
  return exp, state, metrics


def _sequences(exp, count: int, length: int) -> list[np.ndarray]:
  """`count` validation inputs spread evenly over the validation set (LM: the first `length`
  bytes of a row; forecaster: a whole input window)."""
  batches = exp.task.eval_sets(0, 1)[""]
  rows = np.concatenate([np.asarray(b["inputs"]) for b in batches])
  picked = rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]
  if np.issubdtype(picked.dtype, np.integer):
    return [row[:length].astype(np.int32) for row in picked]
  return [row.astype(np.float32) for row in picked]


def _layer_name(exp) -> str:
  """The middle block's tapped output: blocks_{L/2-1}/output, or blocks/block/output[i]."""
  config = ModelConfig.from_mapping(exp.config.model)
  layer = blocks.layer_paths(config)[max(config.num_layers // 2 - 1, 0)]
  index = "" if layer.stacked is None else f"[{layer.stacked}]"
  return "/".join((*layer.path, "output")) + index


def _methods(arch: str, exp) -> list[str]:
  """The methods that apply to `arch`, in `METHODS` order."""
  if arch not in LMS:  # DLinear taps no activations and mixes no tokens.
    return [m for m in METHODS if m in core.GRADIENT_METHODS and m != "layer"]
  return [m for m in METHODS if not (m == "hidden_attention" and arch == "transformer")]


def _attribute(exp, params, x, method: str):
  layer = _layer_name(exp) if method == "layer" else None
  return attribute(exp.model, params, x, method, layer=layer)


def _megabytes(compiled) -> float:
  m = compiled.memory_analysis()
  used = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return (used - m.alias_size_in_bytes) / 2**20


def _peak_memory_mb(exp, params, x, method: str) -> float:
  """XLA's memory footprint of the largest compiled call `method` makes on input `x`."""
  model = exp.model
  params = nn.meta.unbox(params)
  if method in core.GRADIENT_METHODS:
    s = Subject(model, params, x, layer=_layer_name(exp) if method == "layer" else None)
    m = GRADIENT_POINTS.get(method, BATCH_SIZE)
    z = jnp.broadcast_to(s.z[None], (m, *s.z.shape))
    inputs = jnp.broadcast_to(s.inputs, (m, *s.inputs.shape[1:]))
    target = (s.target.kind, s.target.indices())
    args = (model, s.params, inputs, z, s.z[None], *target, s.address, True)  # As `evaluate`.
    return _megabytes(core.evaluate_batch.lower(*args).compile())
  inputs = jnp.asarray(np.asarray(x)[None])
  peak = _megabytes(maps.collect.lower(model, params, inputs).compile())
  inter, _ = maps.collect(model, params, inputs)
  for layer in maps.model_layers(model):
    if layer.mixer != "attention":
      fn = lambda p, i, layer=layer: maps.hidden_attention_of_layer(p, i, layer)[0]
      peak = max(peak, _megabytes(jax.jit(fn).lower(params, inter).compile()))
  return peak


def _timing(arch: str, exp, state, sequences: list[np.ndarray]) -> tuple[dict, dict, float]:
  """Per method: cost figures, and the scores of every sequence; and the recompile overhead."""
  methods = _methods(arch, exp)
  warm = {m: [] for m in methods}
  cold = {m: [] for m in methods}
  scores = {m: [] for m in methods}
  extra = {m: {"steps": [], "gap": []} for m in methods}
  for x in sequences:
    for method in methods:
      start = time.perf_counter()
      _attribute(exp, state.params, x, method)  # Compiles whatever this target needs.
      cold[method].append(time.perf_counter() - start)
      start = time.perf_counter()
      result = _attribute(exp, state.params, x, method)
      warm[method].append(time.perf_counter() - start)
      scores[method].append(np.asarray(result.scores))
      if result.steps is not None:
        extra[method]["steps"].append(result.steps)
        extra[method]["gap"].append(result.completeness_gap)
  timing = {}
  for method in METHODS:
    if method not in methods:
      timing[method] = None
      continue
    row = {
      "seconds_per_sequence": statistics.median(warm[method]),
      "peak_memory_mb": _peak_memory_mb(exp, state.params, sequences[0], method),
    }
    if extra[method]["steps"]:
      row["mean_steps"] = float(np.mean(extra[method]["steps"]))
      row["mean_completeness_gap"] = float(np.mean(extra[method]["gap"]))
    timing[method] = row
  overhead = [
    sum(cold[m][i] - warm[m][i] for m in methods) for i in range(1, len(sequences))
  ]  # fmt: skip
  recompile = float(np.mean(overhead)) if overhead else 0.0
  return timing, scores, recompile


def _aucs(subject: Subject, scores: np.ndarray) -> tuple[float, float]:
  """Deletion and insertion AUC of the ranking by `scores` (as `faithfulness` computes them)."""
  order = np.argsort(-np.asarray(scores, np.float64).reshape(-1), kind="stable")
  deletion, insertion = curves(subject, order)
  x = np.linspace(0.0, 1.0, len(deletion))
  return float(np.trapezoid(deletion, x)), float(np.trapezoid(insertion, x))


def _faithfulness(exp, state, sequences, scores: dict, random_orders: int) -> dict:
  """Deletion / insertion AUC per method and of random orderings (inputs and layer): the median
  over the sequences, the mean, each sequence's, and on how many the method beats random."""
  rows: dict[str, list[tuple[float, float]]] = {m: [] for m in scores}
  rows["random"], rows["random_layer"] = [], []
  ends = []
  for i, x in enumerate(sequences):
    subject = Subject(exp.model, state.params, x)
    first = next(m for m in scores if m != "layer")
    ref = faithfulness(subject, scores[first][i], random_orders=random_orders)
    rows["random"].append((ref["random_deletion_auc"], ref["random_insertion_auc"]))
    ends.append((ref["f_x"], ref["f_baseline"]))
    for method in scores:
      if method != "layer":
        rows[method].append(_aucs(subject, scores[method][i]))
    if "layer" in scores:
      at_layer = Subject(exp.model, state.params, x, layer=_layer_name(exp))
      f = faithfulness(at_layer, scores["layer"][i], random_orders=random_orders)
      rows["layer"].append((f["deletion_auc"], f["insertion_auc"]))
      rows["random_layer"].append((f["random_deletion_auc"], f["random_insertion_auc"]))
  table = {}
  for name, r in rows.items():
    if not r:
      continue
    deletion, insertion = (np.asarray(v) for v in zip(*r, strict=True))
    row = {
      "deletion_auc": float(np.median(deletion)),
      "insertion_auc": float(np.median(insertion)),
      "deletion_auc_mean": float(deletion.mean()),
      "insertion_auc_mean": float(insertion.mean()),
      "deletion_per_sequence": deletion.tolist(),
      "insertion_per_sequence": insertion.tolist(),
    }
    if not name.startswith("random"):
      ref_d, ref_i = (
        np.asarray(v)
        for v in zip(*rows["random_layer" if name == "layer" else "random"], strict=True)
      )
      row["beats_random_deletion"] = int((deletion < ref_d).sum())
      row["beats_random_insertion"] = int((insertion > ref_i).sum())
    table[name] = row
  table["random"]["f_x"] = [a for a, _ in ends]
  table["random"]["f_baseline"] = [b for _, b in ends]
  return table


def _randomisation(exp, state, sequences, methods: list[str]) -> dict[str, float]:
  """Mean Spearman ρ of |scores| between trained and freshly initialised weights."""
  out = {}
  for method in methods:
    layer = {"layer": _layer_name(exp)} if method == "layer" else {}
    rho = [
      randomisation_check(exp.model, state.params, x, method, **layer)["spearman"]
      for x in sequences
    ]
    out[method] = float(np.mean(rho))
  return out


def _fmt(value: float | None, digits: int = 3) -> str:
  return "—" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
  c = result["config"]
  archs = list(result["timing"])
  models = ", ".join(
    f"{a} {m['params_m']}M" + (f" ({m['metric']} {m['value']:.3f})" if m.get("value") else "")
    for a, m in result["models"].items()
  )
  lines = [
    f"Attribution of {c['sequences']} validation sequences per model: {c['seq_len']} bytes for "
    f"the LMs, {c['forecast_input_len']}-step windows for DLinear; {c['train_steps']} training "
    f"steps each; models: {models}. Layer attribution at the middle block's output. Device: "
    f"{result['device']}.",
    "",
    "Seconds per attributed sequence (compiled; median) / peak memory of the largest compiled "
    "call (MB):",
    "",
    "| method | " + " | ".join(archs) + " |",
    "|---|" + "---|" * len(archs),
  ]
  for method in METHODS:
    cells = []
    for arch in archs:
      t = result["timing"][arch][method]
      cells.append("—" if t is None else f"{t['seconds_per_sequence']:.3f} s / "
                   f"{t['peak_memory_mb']:.1f} MB")  # fmt: skip
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  recompile = " | ".join(
    f"{result['recompile_seconds_per_sequence'][a]:.1f} s"
    + (f" ({len(set(t))} bytes)" if (t := result["models"][a]["targets"]) else "")
    for a in archs
  )
  lines.append(f"| *recompiles per sequence (distinct explained bytes)* | {recompile} |")
  ig = "; ".join(
    f"{a} {t['mean_steps']:.0f} points, gap {t['mean_completeness_gap']:.1e}"
    for a in archs
    if (t := result["timing"][a]["integrated_gradients"])
  )
  lines += ["", f"Integrated gradients (mean points used, mean completeness gap): {ig}."]
  rho = result["randomisation_spearman"]
  for arch, table in result["faithfulness"].items():
    layer, n = result["models"][arch]["layer"], c["sequences"]
    random = table["random"]
    explained = ", ".join(
      f"{t!r} {fx - f0:.2f}"
      for t, fx, f0 in zip(
        result["models"][arch]["targets"], random["f_x"], random["f_baseline"], strict=True
      )
    )
    lines += [
      "",
      f"Faithfulness on `{arch}`: median over the {n} sequences of the deletion AUC (lower is "
      "better) and insertion AUC (higher is better); on how many sequences the method beats "
      "that sequence's random orderings; model-randomisation ρ (lower is better). Explained "
      f"byte and F(x) − F(pad) per sequence: {explained}.",
      "",
      "| method | deletion AUC | insertion AUC | beats random (deletion, insertion) | "
      "randomisation ρ |",
      "|---|---|---|---|---|",
    ]
    for name, r in table.items():
      label = {
        "random": "random ordering",
        "layer": f"layer (at `{layer}`)",
        "random_layer": f"random ordering (at `{layer}`)",
      }.get(name, name)
      spearman = rho.get(name) if arch == c["headline"] else None
      wins = (
        f"{r['beats_random_deletion']}/{n}, {r['beats_random_insertion']}/{n}"
        if "beats_random_deletion" in r
        else "—"
      )
      lines.append(
        f"| {label} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | {wins} | "
        f"{_fmt(spearman)} |"
      )
  return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  tables = result["faithfulness"]
  fig = Figure(figsize=(6 * len(tables), 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(1, len(tables), sharey=True))
  for ax, (arch, table) in zip(axes, tables.items(), strict=True):
    methods = [m for m in table if not m.startswith("random")]
    x = np.arange(len(methods))
    deletion = [table[m]["deletion_auc"] for m in methods]
    insertion = [table[m]["insertion_auc"] for m in methods]
    ax.bar(x - 0.2, deletion, 0.4, label="deletion AUC (lower better)", color="tab:red")
    ax.bar(x + 0.2, insertion, 0.4, label="insertion AUC (higher better)", color="tab:blue")
    for m_i, m in enumerate(methods):  # The random reference of each method's deletion game.
      ref = table["random_layer" if m == "layer" else "random"]
      ax.hlines(ref["deletion_auc"], m_i - 0.45, m_i + 0.05, colors="darkred", linestyles="--")
      ax.hlines(ref["insertion_auc"], m_i - 0.05, m_i + 0.45, colors="navy", linestyles="--")
    ax.plot([], [], "k--", label="random ordering")
    labels = [f"{m} (at {result['models'][arch]['layer']})" if m == "layer" else m for m in methods]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.set_title(f"{arch}: faithfulness (median of {result['config']['sequences']} sequences)")
    ax.set_ylabel("normalised AUC")
    ax.legend(fontsize=7, loc="upper left")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def run(quick: bool = False) -> dict:
  sz = _sizes(quick)
  timing, faith, recompile, models = {}, {}, {}, {}
  spearman: dict[str, float] = {}
  forecast_len = None
  for arch in ARCHS:
    exp, state, metrics = _train(arch, quick)
    sequences = _sequences(exp, sz["sequences"], sz["seq_len"])
    metric = "eval/bits_per_byte" if arch in LMS else "eval/mse"
    models[arch] = {
      "params_m": round(sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, 3),
      "metric": metric.removeprefix("eval/"),
      "value": metrics.get(metric),
      "layer": _layer_name(exp) if arch in LMS else None,
      "targets": [  # The explained next byte of each sequence.
        tokenizer_lib.get_tokenizer(exp.config.data.tokenizer).decode(
          [Subject(exp.model, state.params, x).target.token]
        )
        for x in sequences
      ]
      if arch in LMS
      else None,
    }
    timing[arch], scores, recompile[arch] = _timing(arch, exp, state, sequences)
    if arch not in LMS:
      forecast_len = int(sequences[0].shape[0])
    if arch in FAITHFULNESS_ARCHS:
      faith[arch] = _faithfulness(exp, state, sequences, scores, sz["random_orders"])
    if arch == HEADLINE:
      spearman = _randomisation(exp, state, sequences, _methods(arch, exp))
  head = faith[HEADLINE]
  result = {
    "device": device_description(),
    "config": {
      "headline": HEADLINE,
      "sequences": sz["sequences"],
      "seq_len": sz["seq_len"],
      "forecast_input_len": forecast_len,
      "train_steps": sz["steps"],
      "random_orders": sz["random_orders"],
    },
    "deletion_auc": {m: r["deletion_auc"] for m, r in head.items()},
    "insertion_auc": {m: r["insertion_auc"] for m, r in head.items()},
    "randomisation_spearman": spearman,
    "faithfulness": faith,
    "timing": timing,
    "recompile_seconds_per_sequence": recompile,
    "models": models,
  }
  md = markdown(result)
  if quick:
    return {**result, "markdown": md}
  _plot(result, results_dir() / "attribution.png")
  return write_results("attribution", result, md)
