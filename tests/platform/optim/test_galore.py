"""GaLore (`fulcrum.platform.optim.galore`): the invariants of ALGORITHMS.md and a naive reference.

Checks that updates stay in the projected subspace between refreshes, projectors refresh only
every T steps while Adam's moments carry over, state shapes are r × max(m, n), full rank with SGD
reproduces SGD, `galore_adamw` matches a plain-numpy GaLore-AdamW, stacked weights behave as
independent matrices, `matrices_from_axes` picks the attention/MLP matrices of the real models,
the state keeps logical axis names, and 8-bit GaLore tracks fp32 GaLore.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fulcrum.modules import ModelConfig, build
from fulcrum.platform.optim.galore import (
  GaLoreState,
  MatrixSpec,
  default_matrices,
  galore_adamw,
  matrices_from_axes,
  scale_by_galore,
)
from fulcrum.platform.optim.quantized import QuantizedArray

RTOL = 1e-5  # fp32.


def _normal(rng: np.random.Generator, *shape: int) -> jnp.ndarray:
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _assert_close(actual, desired, rel=RTOL, msg=""):
  """max |actual - desired| <= rel · max |desired|: fp32 matmul error scales with the magnitudes."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape, msg
  err, size = np.abs(actual - desired).max(), np.abs(desired).max()
  assert err <= rel * size, f"{msg}: max error {err:.3g} vs {rel:g} × {size:.3g}"


def _quadratic_grads(params, targets):
  """Gradient of 0.5·Σ‖p - target‖²: depends on the parameters, so trajectories can diverge."""
  return jax.tree.map(lambda p, t: p - t, params, targets)


def _galore_state(state) -> GaLoreState:
  """The GaLoreState inside `galore_adamw`'s chain (its first element)."""
  assert isinstance(state[0], GaLoreState)
  return state[0]


def _run(tx, params, grad_fn, steps):
  """`steps` updates of `tx`; returns the parameters, updates and states after each step."""
  state = jax.jit(tx.init)(params)  # Jitted: eager quantize_state.init compiles op by op.

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  history = []
  for t in range(steps):
    params, updates, state = step(grad_fn(params, t), state, params)
    history.append((params, updates, state))
  return history


# 1. Between refreshes the update lies in the projected subspace.


@pytest.mark.parametrize(
  "shape, side, left",
  [
    ((6, 10), "auto", True),  # Wide: project the rows (the smaller side).
    ((10, 6), "auto", False),  # Tall: project the columns.
    ((10, 6), "left", True),
    ((6, 10), "right", False),
  ],
)
def test_update_lies_in_projected_subspace(shape, side, left):
  """(I - PPᵀ)ΔW = 0 (left) or ΔW(I - QQᵀ) = 0 (right) at every step of two refresh windows."""
  rng = np.random.default_rng(0)
  m, n = shape
  rank, gap = 3, 5
  params = {"w": _normal(rng, m, n)}
  noise = [_normal(rng, m, n) for _ in range(2 * gap)]
  tx = galore_adamw(0.1, rank=rank, update_proj_gap=gap, scale=0.5, weight_decay=0.0, side=side)
  history = _run(tx, params, lambda p, t: {"w": p["w"] + noise[t]}, 2 * gap)
  window_projectors = []
  for t, (_, updates, state) in enumerate(history):
    p = np.asarray(_galore_state(state).projectors["w"])
    assert p.shape == ((m, rank) if left else (n, rank))
    np.testing.assert_allclose(p.T @ p, np.eye(rank), atol=1e-5)  # Orthonormal columns.
    dw = np.asarray(updates["w"])
    g = np.asarray(params["w"] if t == 0 else history[t - 1][0]["w"]) + np.asarray(noise[t])
    if left:
      residual, g_out = dw - p @ (p.T @ dw), g - p @ (p.T @ g)
    else:
      residual, g_out = dw - (dw @ p) @ p.T, g - (g @ p) @ p.T
    assert np.linalg.norm(dw) > 0
    assert np.linalg.norm(residual) <= RTOL * np.linalg.norm(dw), t
    # Not vacuous: the gradient itself has a large component outside the subspace.
    assert np.linalg.norm(g_out) > 0.3 * np.linalg.norm(g)
    assert np.linalg.matrix_rank(dw, tol=1e-4 * np.abs(dw).max()) == rank
    if t % gap == 0:
      window_projectors.append(p)
    np.testing.assert_array_equal(p, window_projectors[-1])
  # The second window's projector spans a different subspace than the first.
  p0, p1 = window_projectors
  assert np.linalg.norm(p1 - p0 @ (p0.T @ p1)) > 0.1


# 2. Projectors refresh only at steps 0, T, 2T, ...; moments are not reset.


def test_projector_refreshes_only_every_gap_steps_and_moments_carry_over():
  """Projectors change exactly at t % T == 0; at a refresh, Adam's moments keep their history."""
  rng = np.random.default_rng(1)
  m, n, rank, gap, steps = 6, 9, 2, 4, 11
  b1, b2 = 0.9, 0.999
  noise = [_normal(rng, m, n) for _ in range(steps)]
  grads = [{"w": g} for g in noise]  # Gradients independent of the parameters.
  tx = scale_by_galore(rank=rank, update_proj_gap=gap, scale=1.0)
  state = tx.init({"w": jnp.zeros((m, n))})
  update = jax.jit(tx.update)
  states = [state]
  for t in range(steps):
    _, state = update(grads[t], state)
    states.append(state)
  projs = [np.asarray(s.projectors["w"]) for s in states]
  for t in range(steps):  # states[t + 1] is the state after step t.
    changed = not np.array_equal(projs[t + 1], projs[t])
    assert changed == (t % gap == 0), t
    assert int(states[t + 1].count) == t + 1

  # At the refresh step t = T the moments continue from step T - 1 in the new basis.
  before, after = states[gap].inner, states[gap + 1].inner
  p = projs[gap + 1]
  r = p.T @ np.asarray(noise[gap])  # Left projection: m = 6 <= n = 9.
  mu_prev, nu_prev = np.asarray(before.mu["w"]), np.asarray(before.nu["w"])
  mu, nu = np.asarray(after.mu["w"]), np.asarray(after.nu["w"])
  assert mu.shape == (rank, n)
  np.testing.assert_allclose(mu, b1 * mu_prev + (1 - b1) * r, rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(nu, b2 * nu_prev + (1 - b2) * r**2, rtol=RTOL, atol=1e-8)
  # Not reset: a freshly started Adam would give (1 - b1)·R, far from the carried-over mu.
  assert np.abs(mu - (1 - b1) * r).max() > 0.05 * np.abs(mu).max()
  assert int(after.count) == gap + 1  # Adam's bias correction counts on, too.


# 3. State shapes.


@pytest.mark.parametrize(
  "shape, spec, rank, proj_shape, moment_shape",
  [
    ((8, 12), None, 3, (8, 3), (3, 12)),  # Wide: P = m × r, moments r × n.
    ((12, 8), None, 3, (8, 3), (12, 3)),  # Tall: Q = n × r, moments m × r.
    ((8, 12), None, 100, (8, 8), (8, 12)),  # Rank capped at min(m, n).
    ((2, 8, 12), MatrixSpec((1,), (2,)), 3, (2, 8, 3), (2, 3, 12)),  # Batched.
    ((4, 3, 5), MatrixSpec((0,), (1, 2)), 2, (4, 2), (2, 15)),  # Grouped columns: 4 × 15.
  ],
)
def test_state_shapes(shape, spec, rank, proj_shape, moment_shape):
  """Moments are r × max(m, n) (as (r, n) or (m, r)), the projector min(m, n) × r."""
  matrices = None if spec is None else {"w": spec, "b": None}
  tx = scale_by_galore(rank=rank, matrices=matrices)
  state = tx.init({"w": jnp.zeros(shape), "b": jnp.zeros((7,))})
  assert state.projectors["w"].shape == proj_shape
  assert state.inner.mu["w"].shape == moment_shape
  assert state.inner.nu["w"].shape == moment_shape
  # An unprojected parameter: no projector, full-size moments.
  assert isinstance(state.projectors["b"], optax.MaskedNode)  # No array for unprojected.
  assert state.inner.mu["b"].shape == (7,)
  # The same shapes come out of an update.
  grads = {"w": jnp.ones(shape), "b": jnp.ones((7,))}
  _, new = jax.eval_shape(tx.update, grads, state)
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)


def test_default_matrices_projects_only_plain_2d_parameters():
  """Without names, only 2-D parameters are matrices (rows = axis 0)."""
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,)), "t": jnp.zeros((2, 3, 4))}
  specs = default_matrices(params)
  assert specs == {"w": MatrixSpec((0,), (1,)), "b": None, "t": None}
  boxed = {"w": nn.LogicallyPartitioned(jnp.zeros((3, 4)), ("embed", "mlp"))}
  assert default_matrices(boxed) == {"w": MatrixSpec((0,), (1,))}


# 4. Full rank + SGD base + scale 1 equals SGD.


FULL_RANK_SHAPES = {
  "w2": ((6, 9), MatrixSpec((0,), (1,))),
  "tall": ((9, 4), MatrixSpec((0,), (1,))),
  "w3": ((4, 3, 5), MatrixSpec((0, 2), (1,))),  # Non-contiguous row group: 20 × 3.
  "stack": ((3, 5, 7), MatrixSpec((1,), (2,))),  # Leading layer axis.
  "mid": ((5, 2, 7), MatrixSpec((0,), (2,))),  # Batch axis in the middle.
  "cycle": ((5, 2, 7), MatrixSpec((2,), (0,))),  # Rows after columns: a 3-cycle transpose.
  "b": ((7,), None),
}


@pytest.mark.parametrize(
  "base, gap",
  [
    (lambda: optax.sgd(0.1), 2),
    # Momentum lives in the projected space; within one window it equals SGD's momentum.
    (lambda: optax.sgd(0.1, momentum=0.9), 100),
  ],
  ids=["sgd", "momentum-one-window"],
)
def test_full_rank_sgd_equals_sgd(base, gap):
  """rank ≥ min(m, n), α = 1 and an SGD base reproduce the base's own updates on every tensor."""
  rng = np.random.default_rng(2)
  params = {k: _normal(rng, *shape) for k, (shape, _) in FULL_RANK_SHAPES.items()}
  targets = {k: _normal(rng, *shape) for k, (shape, _) in FULL_RANK_SHAPES.items()}
  matrices = {k: spec for k, (_, spec) in FULL_RANK_SHAPES.items()}
  tx = scale_by_galore(
    rank=64, update_proj_gap=gap, scale=1.0, base_optimizer=base(), matrices=matrices
  )
  grad_fn = lambda p, t: _quadratic_grads(p, targets)
  got = _run(tx, params, grad_fn, 6)
  want = _run(base(), params, grad_fn, 6)
  for (p_got, u_got, _), (p_want, u_want, _) in zip(got, want, strict=True):
    for k in params:
      _assert_close(u_got[k], u_want[k], msg=k)
      _assert_close(p_got[k], p_want[k], msg=k)
  # Not vacuous: the parameters moved.
  assert np.abs(np.asarray(got[-1][0]["w3"]) - np.asarray(params["w3"])).max() > 0.1


def test_unprojected_parameters_get_the_unscaled_base_update():
  """α scales projected matrices only: on Adam's first step (g / (|g| + eps)) a bias gets exactly
  that, a matrix α · P (R / (|R| + eps)) with R = PᵀG."""
  rng = np.random.default_rng(3)
  grads = {"w": _normal(rng, 6, 8), "b": _normal(rng, 8)}
  tx = scale_by_galore(rank=2, update_proj_gap=2, scale=0.25)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  adam_first = lambda g: g / (np.abs(g) + 1e-8)
  b, w = np.asarray(grads["b"]), np.asarray(grads["w"])
  np.testing.assert_allclose(updates["b"], adam_first(b), rtol=RTOL)
  p = np.asarray(state.projectors["w"])
  _assert_close(updates["w"], 0.25 * p @ adam_first(p.T @ w))


# 5. A naive numpy GaLore-AdamW.


def _reference_galore_adamw(w0, grad_fn, steps, *, rank, gap, scale, lr, wd, b1, b2, eps, align_to):
  """GaLore-AdamW on one matrix, in float64: SVD every `gap` steps (rank leading singular vectors
  of the smaller side), bias-corrected Adam on the projected gradient, project back, × scale,
  decoupled decay, × lr.

  SVD signs are implementation-defined and Adam's moments carry over a refresh, so (after the
  first window) the trajectory depends on them: `align_to(t)` gives the library's projector at
  refresh step t and each reference column is flipped to agree with it in sign only.
  """
  w = np.asarray(w0, np.float64)
  m, n = w.shape
  left = m <= n
  r = min(rank, m, n)
  mu = nu = None
  out = []
  for t in range(steps):
    g = np.asarray(grad_fn(w, t), np.float64)
    if t % gap == 0:
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      p = u[:, :r] if left else vh[:r].T
      signs = np.sign(np.sum(p * np.asarray(align_to(t), np.float64), axis=0))
      assert np.all(signs != 0)
      p = p * signs
    low = p.T @ g if left else g @ p
    if mu is None:
      mu, nu = np.zeros_like(low), np.zeros_like(low)
    mu = b1 * mu + (1 - b1) * low
    nu = b2 * nu + (1 - b2) * low**2
    step = (mu / (1 - b1 ** (t + 1))) / (np.sqrt(nu / (1 - b2 ** (t + 1))) + eps)
    full = p @ step if left else step @ p.T
    w = w - lr * (scale * full + wd * w)
    out.append(w)
  return out


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_galore_adamw_matches_numpy_reference(shape):
  """12 steps with T = 5 (refreshes at 0, 5, 10) agree with the reference to ~1e-5."""
  rng = np.random.default_rng(4)
  steps, gap, rank = 12, 5, 3
  hp = dict(lr=0.05, wd=0.1, b1=0.9, b2=0.99, eps=1e-8, scale=0.25)
  w0 = rng.normal(size=shape).astype(np.float32)
  target = rng.normal(size=shape).astype(np.float32)
  noise = [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]
  grad_fn = lambda w, t: (w - target) + noise[t]

  tx = galore_adamw(
    hp["lr"],
    rank=rank,
    update_proj_gap=gap,
    scale=hp["scale"],
    weight_decay=hp["wd"],
    b1=hp["b1"],
    b2=hp["b2"],
    eps=hp["eps"],
  )
  history = _run(tx, {"w": jnp.asarray(w0)}, lambda p, t: {"w": grad_fn(p["w"], t)}, steps)
  got = [np.asarray(p["w"]) for p, _, _ in history]
  projectors = [np.asarray(_galore_state(s).projectors["w"]) for _, _, s in history]
  want = _reference_galore_adamw(
    w0, grad_fn, steps, rank=rank, gap=gap, align_to=lambda t: projectors[t], **hp
  )
  for t in range(steps):
    # Compare the distance travelled, so the tolerance is relative to what the optimizer did.
    moved = np.linalg.norm(want[t] - w0)
    assert np.linalg.norm(got[t] - want[t]) <= 1e-5 * max(moved, 1.0), t
  assert np.linalg.norm(want[-1] - w0) > 0.5  # The weights did move.


# 6. Stacked weights are independent matrices.


def test_stacked_weights_equal_independent_matrices():
  """(L, m, n) with MatrixSpec((1,), (2,)) equals L separate 2-D GaLore-AdamW optimizers."""
  rng = np.random.default_rng(5)
  layers, m, n, steps = 3, 6, 10, 7
  w0 = _normal(rng, layers, m, n)
  target = _normal(rng, layers, m, n)
  noise = [_normal(rng, layers, m, n) for _ in range(steps)]
  kw = dict(rank=2, update_proj_gap=3, scale=0.5, weight_decay=0.1)

  tx = galore_adamw(0.05, matrices={"w": MatrixSpec((1,), (2,))}, **kw)
  stacked = _run(tx, {"w": w0}, lambda p, t: {"w": p["w"] - target + noise[t]}, steps)

  for i in range(layers):
    single = _run(
      galore_adamw(0.05, **kw),
      {"w": w0[i]},
      lambda p, t, i=i: {"w": p["w"] - target[i] + noise[t][i]},
      steps,
    )
    for t in range(steps):
      np.testing.assert_allclose(
        stacked[t][0]["w"][i], single[t][0]["w"], rtol=RTOL, atol=1e-5, err_msg=f"{i}, {t}"
      )
      np.testing.assert_allclose(
        _galore_state(stacked[t][2]).projectors["w"][i],
        _galore_state(single[t][2]).projectors["w"],
        atol=1e-5,
      )


# 7. Which parameters of the real models are matrices.


PROJECTED = re.compile(
  r"((attn|attention_block)/[qkvo]|(mlp|mlp_block)/(gate|up|down)"
  r"|mixer/(in_proj|out_proj)|recurrent_block/linear_(x|y|out))/kernel$"
)
# Parameters that must stay unprojected, per architecture (each must exist in the model).
UNPROJECTED = {
  "transformer": ["embedder/embedding", "norm/scale"],
  "mamba": [
    "embedder/embedding",
    "norm/scale",
    "conv1d/kernel",
    "conv1d/bias",
    "mixer/A_log",
    "mixer/D",
    "x_proj/kernel",
    "dt_proj/kernel",
    "dt_proj/bias",
  ],
  "griffin": [
    "embedder/embedding",
    "pre_norm/scale",
    "conv_1d/kernel",
    "linear_x/bias",
    "down/bias",
    "rg_lru/a_gate/kernel",
    "rg_lru/input_gate/kernel",
    "rg_lru/a_param",
  ],
}
# Projected kernels: per layer (scanned) or for every layer; Griffin's 3 blocks scan one by one.
PROJECTED_COUNT = {
  ("transformer", True): 7,
  ("transformer", False): 14,
  ("mamba", True): 2,
  ("mamba", False): 4,
  ("griffin", True): 6 + 6 + 7,
  ("griffin", False): 6 + 6 + 7,
}


def _abstract_params(arch: str, scan_layers: bool):
  """Boxed parameter shapes of a tiny model (`jax.eval_shape`, no weights computed)."""
  layers = 3 if arch == "griffin" else 2
  cfg = ModelConfig(
    arch=arch, vocab_size=16, d_model=32, num_layers=layers, num_heads=2, scan_layers=scan_layers
  )
  model = build(cfg)
  init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
  return jax.eval_shape(init, jax.random.key(0))


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("arch", ["transformer", "mamba", "griffin"])
def test_matrices_from_axes_on_real_models(arch, scan_layers):
  """Attention, MLP, Mamba in/out and recurrent-block linear kernels are matrices with `embed`
  alone on one side; `layers` is always a batch axis; everything else is unprojected."""
  params = _abstract_params(arch, scan_layers)
  specs = matrices_from_axes(params)
  boxes = jax.tree_util.tree_leaves_with_path(
    params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: x is None or isinstance(x, MatrixSpec))
  assert len(boxes) == len(spec_leaves)
  projected, seen_unprojected = 0, set()
  for (path, box), spec in zip(boxes, spec_leaves, strict=True):
    name = _path(path)
    assert isinstance(box, nn.LogicallyPartitioned), name
    names = tuple(box.names)
    if PROJECTED.search(name) is None:
      assert spec is None, name
      seen_unprojected.update(s for s in UNPROJECTED[arch] if name.endswith(s))
      continue
    assert isinstance(spec, MatrixSpec), name
    projected += 1
    rows, cols = [tuple(a % len(names) for a in axes) for axes in (spec.rows, spec.cols)]
    batch = [a for a in range(len(names)) if a not in rows + cols]
    assert [names[a] for a in batch] == (["layers"] if scan_layers else []), name
    sides = [[names[a] for a in rows], [names[a] for a in cols]]
    assert ["embed"] in sides, name  # `embed` alone on one side ...
    other = sides[1] if sides[0] == ["embed"] else sides[0]
    assert other and "embed" not in other and "layers" not in other, name  # ... heads/MLP opposite.
    assert rows == tuple(sorted(rows)) and cols == tuple(sorted(cols)), name
  assert projected == PROJECTED_COUNT[arch, scan_layers]
  assert seen_unprojected == set(UNPROJECTED[arch])


# 8. Logical axis names on the state; a jitted step on unboxed parameters.


def test_boxed_init_keeps_logical_names_and_jitted_step_runs():
  """Projectors and low-rank moments are boxed with the kept axes' names; `get_partition_spec`
  works on the state; an unboxed, jitted training step runs and lowers the loss."""
  abstract = _abstract_params("transformer", scan_layers=True)
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), abstract)
  tx = galore_adamw(0.05, rank=4, update_proj_gap=2, matrices=matrices_from_axes(params))
  state = tx.init(params)
  gs = _galore_state(state)
  block = lambda tree: tree["blocks"]["block"]

  # q: ('layers', 'embed', 'heads', 'head_dim') read as 32 × (2·16): left projection.
  q_proj = block(gs.projectors)["attn"]["q"]["kernel"]
  q_mu = block(gs.inner.mu)["attn"]["q"]["kernel"]
  assert isinstance(q_proj, nn.LogicallyPartitioned) and isinstance(q_mu, nn.LogicallyPartitioned)
  assert q_proj.value.shape == (2, 32, 4) and tuple(q_proj.names) == ("layers", "embed", None)
  assert q_mu.value.shape == (2, 4, 32) and tuple(q_mu.names) == ("layers", None, None)
  # down: ('layers', 'mlp', 'embed') = 128 × 32: right projection, Q keeps `embed`.
  d_proj = block(gs.projectors)["mlp"]["down"]["kernel"]
  d_nu = block(gs.inner.nu)["mlp"]["down"]["kernel"]
  assert d_proj.value.shape == (2, 32, 4) and tuple(d_proj.names) == ("layers", "embed", None)
  assert d_nu.value.shape == (2, 128, 4) and tuple(d_nu.names) == ("layers", "mlp", None)
  # Every boxed state leaf has one name per axis; unprojected moments keep the param's names.
  for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    if isinstance(leaf, nn.LogicallyPartitioned):
      assert len(leaf.names) == leaf.value.ndim
  emb = gs.inner.mu["embedder"]["embedding"]
  assert tuple(emb.names) == ("vocab", "embed")
  assert isinstance(gs.projectors["embedder"]["embedding"], optax.MaskedNode)
  q_spec = block(_galore_state(nn.get_partition_spec(state)).projectors)["attn"]["q"]["kernel"]
  assert q_spec == jax.sharding.PartitionSpec("layers", "embed", None)
  # 8-bit GaLore: the codes of the low-rank moments keep the same names.
  tx8 = galore_adamw(
    0.05,
    rank=4,
    matrices=matrices_from_axes(params),
    eight_bit=True,
    block_size=32,
    min_8bit_size=64,
  )
  down8 = block(_galore_state(jax.eval_shape(tx8.init, params)).inner.inner.nu)["mlp"]["down"]
  assert isinstance(down8["kernel"], QuantizedArray)
  assert tuple(down8["kernel"].codes.names) == ("layers", "mlp", None)

  values, state = nn.unbox(params), nn.unbox(state)
  targets = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), values)

  def loss_fn(p):
    return 0.5 * sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, targets)))

  @jax.jit
  def train_step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  shapes = jax.tree.map(jnp.shape, state)
  losses = []
  for _ in range(3):
    values, state, loss = train_step(values, state)
    losses.append(float(loss))
  assert jax.tree.map(jnp.shape, state) == shapes
  assert losses[-1] < losses[0]


def test_callable_matrices_from_axes_matches_precomputed_specs():
  """`matrices` may be a function of the parameters (docstring); `matrices_from_axes` is one."""
  rng = np.random.default_rng(7)
  params = {
    "w": {"kernel": nn.LogicallyPartitioned(_normal(rng, 8, 16), ("embed", "mlp"))},
    "s": {"scale": nn.LogicallyPartitioned(_normal(rng, 8), ("embed",))},
  }
  grads = {"w": {"kernel": _normal(rng, 8, 16)}, "s": {"scale": _normal(rng, 8)}}
  want_tx = galore_adamw(0.1, rank=2, matrices=matrices_from_axes(params))
  got_tx = galore_adamw(0.1, rank=2, matrices=matrices_from_axes)
  values = nn.unbox(params)
  want, _ = jax.jit(want_tx.update)(grads, nn.unbox(want_tx.init(params)), values)
  got, _ = jax.jit(got_tx.update)(grads, nn.unbox(got_tx.init(params)), values)
  np.testing.assert_allclose(got["w"]["kernel"], want["w"]["kernel"], rtol=RTOL)


# 9. Argument checks.


@pytest.mark.parametrize(
  "kwargs",
  [dict(rank=0), dict(rank=-2), dict(rank=2.0), dict(update_proj_gap=0), dict(side="middle")],
)
def test_bad_arguments_raise(kwargs):
  """Invalid rank, refresh gap or side are rejected when the transform is built."""
  with pytest.raises(ValueError):
    scale_by_galore(**kwargs)
  with pytest.raises(ValueError):
    galore_adamw(1e-3, **kwargs)


@pytest.mark.parametrize("rows, cols", [((), (1,)), ((0,), ()), ((0, 1), (1,))])
def test_bad_matrix_spec_raises(rows, cols):
  """MatrixSpec needs disjoint, non-empty row and column axes."""
  with pytest.raises(ValueError):
    MatrixSpec(rows, cols)


# 10. 8-bit GaLore.


def test_eight_bit_galore_tracks_fp32_galore():
  """With 8-bit moments the regression loss follows fp32 GaLore within a few percent, and the
  large moments are QuantizedArrays (mu signed, nu unsigned)."""
  rng = np.random.default_rng(8)
  x = _normal(rng, 128, 16)
  w_true = _normal(rng, 16, 64)
  y = x @ w_true
  params = {"w": jnp.zeros((16, 64)), "b": jnp.zeros((64,)), "s": jnp.zeros((8,))}
  loss_fn = jax.jit(
    lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2) + jnp.sum((p["s"] - 1.0) ** 2)
  )
  grad_fn = jax.jit(jax.grad(loss_fn))
  kw = dict(rank=4, update_proj_gap=5, scale=1.0, weight_decay=0.0)

  def losses(tx, steps=15):
    history = _run(tx, params, lambda p, t: grad_fn(p), steps)
    out = [loss_fn(params)] + [loss_fn(p) for p, _, _ in history]
    return np.asarray(out), history[-1][2]

  fp32, _ = losses(galore_adamw(0.05, **kw))
  q8, state = losses(galore_adamw(0.05, eight_bit=True, block_size=64, min_8bit_size=64, **kw))
  assert fp32[-1] < 0.7 * fp32[0]  # GaLore trains ...
  np.testing.assert_allclose(q8, fp32, rtol=0.01)  # ... and 8-bit GaLore follows it.

  adam = _galore_state(state).inner.inner  # GaLoreState → QuantizedState → ScaleByAdamState.
  for moment, signed in ((adam.mu, True), (adam.nu, False)):
    assert isinstance(moment["w"], QuantizedArray) and moment["w"].signed == signed
    assert moment["w"].codes.shape == (4, 64) and moment["w"].codes.dtype == jnp.uint8
    assert isinstance(moment["b"], QuantizedArray)  # 64 elements: full Adam, quantized.
    assert not isinstance(moment["s"], QuantizedArray)  # Below min_8bit_size: float32.
    assert moment["s"].dtype == jnp.float32
