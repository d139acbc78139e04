"""The architecture benchmarks' analysis: slopes, crossover and ratios from the measured times.

Timing itself is replaced by known cost models (time ∝ L for the recurrent models, ∝ L² for
the transformer), so the fitted numbers can be checked exactly without compiling a model and
without asserting any wall-clock time; the models' forward/backward and decode paths are tested
in tests/modules. `--quick` runs write no result files.
"""

from __future__ import annotations

import math

import pytest

from fulcrum.benchmarks import bench_decode_latency, bench_scaling

ARCHS = {"transformer", "mamba", "griffin", "hawk"}


def fake_step_time(model, length: int, repeats: int) -> float:
  """1 ms per token for the recurrent models; L² / 96 ms for the transformer."""
  del repeats
  if model.config.arch == "transformer":
    return 1e-3 * length**2 / 96
  return 1e-3 * length


def test_scaling_slopes_and_crossover(monkeypatch):
  monkeypatch.setattr(bench_scaling, "_step_time", fake_step_time)
  result = bench_scaling.run(quick=True)  # L = 64, 128, 256.
  assert set(result["slopes"]) == ARCHS
  assert result["slopes"]["mamba"] == pytest.approx(1.0)
  assert result["slopes"]["transformer"] == pytest.approx(2.0)
  # Mamba (L ms) beats the transformer (L²/96 ms) once L > 96: not at 64, but at 128.
  assert result["crossover_len"] == 128
  assert "| transformer |" in result["markdown"]


def test_scaling_skips_full_attention_past_the_cap(monkeypatch):
  monkeypatch.setattr(bench_scaling, "_step_time", fake_step_time)
  monkeypatch.setattr(bench_scaling, "MAX_FULL_ATTENTION_LEN", 128)
  result = bench_scaling.run(quick=True)
  assert result["step_time_s"]["transformer"][-1] is None
  assert result["step_time_s"]["mamba"][-1] == pytest.approx(0.256)
  assert result["slopes"]["transformer"] == pytest.approx(2.0)  # Fitted on what was measured.
  assert "—" in result["markdown"]


def test_scaling_never_faster_gives_no_crossover(monkeypatch):
  monkeypatch.setattr(
    bench_scaling, "_step_time", lambda m, n, r: 1.0 + (m.config.arch != "transformer")
  )
  assert bench_scaling.run(quick=True)["crossover_len"] is None


def test_decode_latency_ratio(monkeypatch):
  def fake_latency(model, context: int, repeats: int) -> float:
    del repeats
    grows = model.config.arch == "transformer"
    return 1e-3 * (1 + context / 16) if grows else 2e-3

  monkeypatch.setattr(bench_decode_latency, "_latency", fake_latency)
  result = bench_decode_latency.run(quick=True)  # Contexts 16 and 128.
  assert set(result["latency_ratio"]) == ARCHS
  assert result["latency_ratio"]["transformer"] == pytest.approx(9 / 2)
  for arch in ARCHS - {"transformer"}:
    assert result["latency_ratio"][arch] == pytest.approx(1.0)
  assert all(math.isfinite(v) for v in result["latency_ratio"].values())


def test_benchmark_models_attend_as_documented():
  """The transformer attends to the whole sequence; Griffin's attention is local."""
  assert bench_scaling._model("transformer", quick=False).config.window == 0
  assert bench_scaling._model("griffin", quick=False).config.window == 1024


def test_optim_ratios_and_table():
  """`bench optim`'s ratios divide each run's figures by AdamW's; the table shows every run."""
  from fulcrum.benchmarks import bench_optim

  def row(state, step, loss, peak=100.0):
    return {
      "learning_rate": 1e-3,
      "state_bytes": state,
      "peak_step_bytes": peak,
      "step_time_ms": step,
      "eval_loss": loss,
      "train_loss": [(1, 5.0), (2, loss)],
    }

  rows = {
    "adamw": row(1000, 10.0, 2.0),
    "galore": row(350, 11.0, 2.04, peak=90.0),
    "adam8bit": row(260, 10.5, 2.01),
    "galore8bit": row(150, 12.0, 2.05),
    "adamw_qat": row(1000, 20.0, 2.1),
  }
  ratios = bench_optim.analyse(rows)
  assert ratios["galore_state_ratio"] == pytest.approx(0.35)
  assert ratios["galore_loss_ratio"] == pytest.approx(1.02)
  assert ratios["galore_step_time_ratio"] == pytest.approx(1.1)
  assert ratios["galore_peak_memory_ratio"] == pytest.approx(0.9)
  assert ratios["adam8bit_state_ratio"] == pytest.approx(0.26)
  assert ratios["adam8bit_loss_ratio"] == pytest.approx(1.005)
  assert ratios["qat_loss_ratio"] == pytest.approx(1.05)
  config = dict(
    d_model=64,
    num_layers=2,
    params_m=0.1,
    seq_len=32,
    batch_size=4,
    steps=2,
    galore_rank=16,
    update_proj_gap=200,
  )
  md = bench_optim.markdown({"config": config, "optimizers": rows, "device": "test"})
  for name in bench_optim.OPTIMIZERS:
    assert f"| {name} |" in md
  assert "| galore | 0.001 | 0.00 | 0.35 |" in md


def test_decode_summary_goals_and_table():
  """`bench decode`'s headline keys are ratios of the measured rows, and the goals read them."""
  from fulcrum.benchmarks import bench_decode

  def strategy(tokens_per_s, per_call, draft=0.0, equal=None):
    r = {
      "tokens_per_s": tokens_per_s,
      "target_calls_per_token": 1 / per_call,
      "tokens_per_target_call": per_call,
      "draft_calls_per_token": draft,
      "target_loglik": -1.0,
      "tokens": 100,
    }
    if equal is not None:
      r["equals_greedy"] = equal
    return r

  decoding = {
    "greedy": strategy(100.0, 1.0),
    "lookahead": strategy(140.0, 2.5, equal=True),
    "speculative": strategy(160.0, 3.0, 1.5, equal=True),
    "cascade": strategy(170.0, 3.5, 1.2),
  }
  kv_row = lambda size, ppl: {"bytes_per_token": size, "compression_vs_bf16": 1024 / size,
                              "perplexity": ppl, "ppl_ratio": ppl / 10.0}  # fmt: skip
  kv = {
    "full precision": kv_row(1024, 10.0),
    "int3 (per token)": kv_row(200, 10.6),
    "kvquant3": kv_row(220, 10.1),
  }
  summary = bench_decode.analyse(decoding, kv, {"target": 1000, "draft": 100})
  assert summary["lookahead_speedup"] == pytest.approx(1.4)
  assert summary["lookahead_tokens_per_step"] == pytest.approx(2.5)
  assert summary["speculative_speedup"] == pytest.approx(1.6)
  assert summary["kvquant3_compression"] == pytest.approx(1024 / 220)
  assert summary["kvquant3_ppl_ratio"] == pytest.approx(1.01)
  assert summary["int3_ppl_ratio"] == pytest.approx(1.06)
  met = bench_decode.goals(summary)
  assert met["lookahead_speedup"] and met["speculative_speedup"] and met["kvquant3_beats_int3"]
  summary["kvquant3_ppl_ratio"] = 1.07
  met = bench_decode.goals(summary)
  assert not met["kvquant3_ppl_ratio"] and not met["kvquant3_beats_int3"]
  target = {"params_m": 1.0, "draft": "d", "draft_params_m": 0.1, "decoding": decoding,
            "kv_cache": kv, "draft_size_ratio": 10.0, "goals": met,
            "pass_ms": {"target 1": 2.0, "target 2": 1.7, "draft 1": 0.1}}  # fmt: skip
  config = dict(repeats=3, prompts=2, prompt_len=8, new_tokens=8, lookahead="4,4,1",
                gamma=4, cascade="opt, α = 0.1")  # fmt: skip
  md = bench_decode.markdown({"config": config, "device": "test", "targets": {"t": target}})
  assert "| lookahead | 140.0 | 1.40 | 2.50 | 0.00 | -1.000 | yes |" in md
  assert "| kvquant3 | 220 | 4.65x | 10.1000 | 1.0100 |" in md
  assert "kvquant3_ppl_ratio **not met**" in md
  assert "draft `d`, 0.1M, 10.0x smaller" in md and "fastest of 3 interleaved runs" in md
  assert "| target, 2 tokens | 1.700 | 0.85 |" in md and "| draft, 1 token | 0.100 | 0.05 |" in md


@pytest.mark.usefixtures("unoptimised_compiles")
def test_attribution_tables_cover_every_architecture_and_method(monkeypatch):
  """`bench attribution`'s tables from a stand-in engine (the engine itself is tested in
  tests/platform): a timing entry for every architecture × method that applies, and the
  median AUCs per method with the `random` references, headline on the transformer. First,
  for real on a small random Mamba, the engine calls the benchmark makes (`core.evaluate_batch`,
  `maps.collect`, `maps.hidden_attention_of_layer`) and the layer it attributes at."""
  from types import SimpleNamespace

  import numpy as np

  from fulcrum import modules
  from fulcrum.benchmarks import bench_attribution as ba
  from fulcrum.platform.attribution import Attribution, Subject, faithfulness
  from tests.conftest import random_params

  config = ba._config("mamba", quick=True)
  exp = SimpleNamespace(config=config, model=modules.build(config.model))
  params, x = random_params(exp.model, 0), np.arange(40, 50, dtype=np.int32)
  assert ba._layer_name(exp) == "blocks_0/output"
  for method in ("saliency", "integrated_gradients", "layer", "rollout"):
    assert ba._peak_memory_mb(exp, params, x, method) > 0
  scanned = ba._config("mamba", quick=True)
  with scanned.unlocked():  # Stacked layers: the name `Subject.activation_names` gives them.
    scanned.model.scan_layers = True
  assert ba._layer_name(SimpleNamespace(config=scanned)) == "blocks/block/output[0]"
  subject, scores = Subject(exp.model, params, x), np.arange(10.0)[::-1]
  f = faithfulness(subject, scores, random_orders=1)
  assert ba._aucs(subject, scores) == pytest.approx((f["deletion_auc"], f["insertion_auc"]))

  methods = list(ba.METHODS)
  # Method i: deletion AUC 0.1·i on the first sequence, +0.1 on the second; insertion 1 − that.
  auc = lambda i, seq: (0.1 * i + 0.1 * seq, 1 - 0.1 * i - 0.1 * seq)

  def train(arch, quick):
    exp = SimpleNamespace(config=ba._config(arch, quick), model=arch)
    return exp, SimpleNamespace(params={"w": np.zeros(2500)}), {"eval/bits_per_byte": 3.0}

  def attribute(model, params, x, method, layer=None):
    ig = method in ("integrated_gradients", "layer")
    scores = np.full(len(x), methods.index(method) + 10 * x[0], float)  # Method and sequence.
    return Attribution(method, scores, 0.0, steps=64 if ig else None,
                       completeness_gap=1e-3 if ig else None)  # fmt: skip

  def faithfulness(subject, scores, random_orders):
    d, i = auc(int(scores[0]) % 10, int(scores[0]) // 10)
    ref = (0.45, 0.35) if subject.layer else (0.5, 0.3)
    return {"deletion_auc": d, "insertion_auc": i, "random_deletion_auc": ref[0],
            "random_insertion_auc": ref[1], "f_x": -1.0, "f_baseline": -4.0}  # fmt: skip

  monkeypatch.setattr(ba, "_train", train)
  monkeypatch.setattr(
    ba, "_sequences", lambda exp, n, length: [np.full(length, k) for k in range(n)]
  )
  monkeypatch.setattr(ba, "attribute", attribute)
  monkeypatch.setattr(ba, "_peak_memory_mb", lambda exp, params, x, method: 10.0)
  subject = lambda *a, layer=None: SimpleNamespace(layer=layer, target=SimpleNamespace(token=32))
  monkeypatch.setattr(ba, "Subject", subject)
  monkeypatch.setattr(ba, "faithfulness", faithfulness)
  monkeypatch.setattr(ba, "_aucs", lambda s, scores: auc(int(scores[0]) % 10, int(scores[0]) // 10))
  monkeypatch.setattr(ba, "randomisation_check", lambda *a, **k: {"spearman": 0.25})
  result = ba.run(quick=True)  # Two sequences: mean AUC = method's + 0.05.

  gradient = {"saliency", "grad_x_input", "integrated_gradients", "smoothgrad"}
  for arch in ba.ARCHS:
    timing = result["timing"][arch]
    assert set(timing) == set(methods)
    expected = {
      "transformer": set(methods) - {"hidden_attention"},
      "dlinear": gradient,
    }.get(arch, set(methods))
    assert {m for m, t in timing.items() if t is not None} == expected, arch
    assert all(t["peak_memory_mb"] == 10.0 for t in timing.values() if t)
    assert timing["integrated_gradients"]["mean_steps"] == 64
  head = set(methods) - {"hidden_attention"}
  assert set(result["deletion_auc"]) == head | {"random", "random_layer"}
  assert set(result["insertion_auc"]) == set(result["deletion_auc"])
  assert result["deletion_auc"]["integrated_gradients"] == pytest.approx(0.25)
  assert result["insertion_auc"]["layer"] == pytest.approx(1 - 0.65)
  assert result["deletion_auc"]["random"] == 0.5 and result["insertion_auc"]["random"] == 0.3
  assert result["deletion_auc"]["random_layer"] == 0.45
  assert set(result["faithfulness"]) == {"transformer", "mamba"}
  assert set(result["faithfulness"]["mamba"]) == set(methods) | {"random", "random_layer"}
  assert result["randomisation_spearman"] == {m: 0.25 for m in head}
  md = result["markdown"]
  # Medians of two sequences; IG beats random deletion on both, insertion on both.
  assert "| integrated_gradients | 0.250 | 0.750 | 2/2, 2/2 | 0.250 |" in md
  assert "| random ordering | 0.500 | 0.300 | — | — |" in md
  assert "' ' 3.00" in md  # The explained byte and F(x) − F(pad).
  assert "| hidden_attention | — | 0" in md  # Not on the transformer; on mamba.


def test_spin_bench_reports_every_key(tmp_path, monkeypatch):
  """`bench spin --quick` end to end on a tiny model: SFT, SPIN, the continued-SFT control, test
  exact match and step memory (the numbers are not goals at this size)."""
  import jax

  from fulcrum.benchmarks import bench_spin

  monkeypatch.setattr(bench_spin, "RUNS", tmp_path / "runs")
  monkeypatch.setenv("FULCRUM_DATA_DIR", str(tmp_path / "tfds"))
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    r = bench_spin.run(quick=True)
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
  for key in ("sft_exact_match", "sft_continued_exact_match", "exact_match_ci95", "gain_ci95"):
    assert 0.0 <= r[key] <= 1.0, key
  assert len(r["spin_exact_match"]) == len(r["rows"]) - 1 == 2
  assert r["generation_tokens_per_s"] > 0
  # Two sequences per pair through the same model, no second model: more than an SFT step,
  # well under three.
  assert 1.0 < r["spin_step_peak_bytes"] / r["sft_step_peak_bytes"] < 3.0
  assert "SPIN iteration 1" in r["markdown"]
