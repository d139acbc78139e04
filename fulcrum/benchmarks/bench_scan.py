"""Scan implementations against the `lax.scan` reference: time and temporary memory.

`fulcrum bench scan --json`: for the linear scan (RG-LRU; b 2, d 512) and the selective scan
(Mamba S6; b 1, e 256, n 16) at L = 2048 and 8192, every `ScanImpl` computes the forward and
backward pass of a scalar loss (a random linear functional of y and h_last) under `jax.jit`,
timed side by side in one process (interleaved rounds, median). Reported per case:

- `time_s` and `speedup` = reference time ÷ this time;
- `temp_bytes`, XLA's peak temporary buffer size for the compiled step
  (`compiled.memory_analysis().temp_size_in_bytes`), and `memory_ratio` = this ÷ reference.

On CPU one more row, `chunked_associative`, times CHUNKED with the accelerators' associative
scan inside its chunks (128 steps) in place of CPU's fused sequential pass.

`best_speedup` is the largest speedup of a non-reference implementation over the reference,
across both scans and lengths; `best_speedup_by_scan` splits it per scan. `auto` names what
`ScanImpl.AUTO` picks on this backend. PALLAS runs only interpreted on CPU (a correctness
tool, orders of magnitude slow), so on CPU its rows carry `note: "interpret-only"` and no
time. `--quick` times short sequences (L = 512) with fewer repeats and writes no files.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.benchmarks.common import device_description, results_dir, time_call, write_results
from fulcrum.modules import scan
from fulcrum.modules.scan import ScanImpl, chunked

IMPLS = [ScanImpl.REFERENCE, ScanImpl.ASSOCIATIVE, ScanImpl.CHUNKED, ScanImpl.PALLAS]
# Also timed on CPU: CHUNKED with the accelerators' associative scan inside its chunks (128
# steps), the evidence for `chunked.intra_chunk_order` choosing the sequential pass there.
CHUNKED_ASSOCIATIVE = "chunked_associative"
SIZES = {"linear": {"b": 2, "d": 512}, "selective": {"b": 1, "e": 256, "n": 16}}


def _inputs(kind: str, length: int, rng: np.random.Generator) -> tuple:
  """Inputs shaped as in an RG-LRU (decays in (0.5, 1)) or a Mamba layer (Δ = softplus)."""
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  if kind == "linear":
    b, d = SIZES["linear"]["b"], SIZES["linear"]["d"]
    a = jnp.asarray(rng.uniform(0.5, 1.0, (b, length, d)).astype(np.float32))
    return a, normal(b, length, d), normal(b, d)
  b, e, n = (SIZES["selective"][k] for k in "ben")
  dt = jax.nn.softplus(normal(b, length, e) - 3.0)
  A = -jnp.exp(normal(e, n))
  return normal(b, length, e), dt, A, normal(b, length, n), normal(b, length, n), normal(e)


def _scan(kind: str, impl: str):
  if impl == CHUNKED_ASSOCIATIVE:
    fn = chunked.linear_scan if kind == "linear" else chunked.selective_scan
    return functools.partial(fn, order="associative")
  fn = scan.linear_scan if kind == "linear" else scan.selective_scan
  return functools.partial(fn, impl=impl)


def _step(kind: str, impl: str, args: tuple, rng: np.random.Generator):
  """jit(grad) of a random linear functional of (y, h_last), compiled for `args`."""
  fn = _scan(kind, impl)
  y, h_last = jax.eval_shape(fn, *args)
  wy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  wh = jnp.asarray(rng.standard_normal(h_last.shape, np.float32))

  def loss(*z):
    y, h_last = fn(*z)
    return jnp.sum(y * wy) + jnp.sum(h_last * wh)

  step = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  return step.lower(*args).compile()


def _measure(kind: str, length: int, repeats: int, impls, interpret_only: bool) -> list[dict]:
  rng = np.random.default_rng(0)
  args = _inputs(kind, length, rng)
  rows, timed = [], {}
  for impl in impls:
    compiled = _step(kind, impl, args, rng)
    row = {
      "scan": f"{kind}_scan",
      "impl": str(impl),
      "length": length,
      "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
      "time_s": None,
      "speedup": None,
    }
    if impl == ScanImpl.PALLAS and interpret_only:
      row["note"] = "interpret-only"
    else:
      timed[impl] = functools.partial(lambda c: jax.block_until_ready(c(*args)), compiled)
      timed[impl]()  # Warm up outside the timed rounds.
    rows.append(row)
  # Interleaved rounds: a busy machine slows every implementation alike.
  times: dict[str, list[float]] = {impl: [] for impl in timed}
  for _ in range(repeats):
    for impl, call in timed.items():
      times[impl].append(time_call(call, repeats=1, warmup=0))
  ref_time, ref_bytes = float(np.median(times[ScanImpl.REFERENCE])), rows[0]["temp_bytes"]
  for row in rows:
    impl = row["impl"]
    if impl in times:
      row["time_s"] = float(np.median(times[impl]))
      row["speedup"] = ref_time / row["time_s"]
    row["memory_ratio"] = row["temp_bytes"] / max(ref_bytes, 1)
  return rows


def _markdown(result: dict) -> str:
  lines = [
    f"Scans, forward + backward under jit ({result['device']}); linear: b 2, d 512; "
    "selective: b 1, e 256, n 16. AUTO here: "
    + ", ".join(f"{k} → {v}" for k, v in result["auto"].items()),
    "",
    "| scan | L | impl | time (ms) | speedup | temp memory (MiB) | memory ÷ reference |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    time_ms = f"{1e3 * r['time_s']:.1f}" if r["time_s"] is not None else r.get("note", "-")
    speedup = f"{r['speedup']:.2f}×" if r["speedup"] is not None else "-"
    lines.append(
      f"| {r['scan']} | {r['length']} | {r['impl']} | {time_ms} | {speedup} "
      f"| {r['temp_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
    )
  by_scan = ", ".join(f"{k} {v:.2f}×" for k, v in result["best_speedup_by_scan"].items())
  lines += ["", f"best_speedup {result['best_speedup']:.2f}× ({by_scan})"]
  return "\n".join(lines)


def _plot(result: dict, path) -> None:
  """Time and temporary memory per case, one bar per implementation (log scale)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  cases = sorted({(r["scan"], r["length"]) for r in rows})
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / len(impls)
  for ax, key, scale, label in (
    (axes[0], "time_s", 1e3, "time per step (ms)"),
    (axes[1], "temp_bytes", 2**-20, "temporary memory (MiB)"),
  ):
    for k, impl in enumerate(impls):
      values = []
      for case in cases:
        match = [r for r in rows if (r["scan"], r["length"]) == case and r["impl"] == impl]
        value = match[0][key] if match else None
        values.append(np.nan if value is None else value * scale)
      ax.bar(np.arange(len(cases)) + k * width, values, width, label=impl)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s.split('_')[0]}\nL={length}" for s, length in cases])
    ax.set_yscale("log")
    ax.set_ylabel(label)
  axes[0].legend()
  note = "; Pallas interpret-only on CPU: memory, no time" if "cpu" in result["device"] else ""
  fig.suptitle(f"Scans, forward + backward ({result['device']}{note})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(quick: bool = False) -> dict:
  lengths, repeats = ((512,), 3) if quick else ((2048, 8192), 5)
  interpret_only = jax.default_backend() == "cpu"
  impls = [str(i) for i in IMPLS]
  if interpret_only and not quick:  # Quick runs skip the CPU-only evidence and Pallas's
    impls.insert(3, CHUNKED_ASSOCIATIVE)  # interpreter, whose compilation would dominate them.
  if quick and interpret_only:
    impls.remove(ScanImpl.PALLAS)
  rows = [
    row
    for kind in ("linear", "selective")
    for length in lengths
    for row in _measure(kind, length, repeats, impls, interpret_only)
  ]
  fast = [r for r in rows if r["impl"] != ScanImpl.REFERENCE and r["speedup"] is not None]
  by_scan = {
    s: max(r["speedup"] for r in fast if r["scan"] == s) for s in sorted({r["scan"] for r in fast})
  }
  result = {
    "device": device_description(),
    "config": {"lengths": list(lengths), "repeats": repeats, **SIZES},
    "auto": {f"{k}_scan": scan.resolve("auto", k).value for k in ("linear", "selective")},
    "rows": rows,
    "best_speedup": max(by_scan.values()),
    "best_speedup_by_scan": by_scan,
  }
  md = _markdown(result)
  if quick:
    return {**result, "markdown": md}
  out = write_results("scan", result, md)
  _plot(result, results_dir() / "scan.png")
  return out
