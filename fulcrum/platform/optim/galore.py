"""GaLore (Zhao et al. 2024): Adam run on low-rank projections of the weight gradients.

For a weight read as a matrix G (m × n), every `update_proj_gap` steps (steps 0, T, 2T, ...)
the SVD of the current gradient gives a projector of its r leading singular vectors:

  left  (P: m × r):  R = Pᵀ G  (r × n),   ΔW = α · P · base(R)
  right (Q: n × r):  R = G Q   (m × r),   ΔW = α · base(R) · Qᵀ

The base optimizer (Adam) keeps its moments on R, so a matrix costs 2·r·max(m, n) state plus the
projector instead of 2·m·n. Moments are not reset when the projector changes (as the paper
does). `side="auto"` projects the smaller dimension (the paper's choice), so the state is
r × max(m, n). Weight decay is decoupled, in the full parameter space.

Compared with `optax.contrib.scale_by_galore` this version
- projects the smaller side, as the paper and its official code do (optax projects the larger);
- reads stacked weights (`nn.scan`'s leading `layers` axis, attention's [embed, heads, head_dim]
  kernels) as batches of matrices, from a `MatrixSpec` per parameter — `matrices_from_axes`
  derives them from the model's logical axis names, so only attention and MLP matrices are
  projected while embeddings, norms and SSM parameters get plain Adam;
- refreshes every projector under one `lax.cond`, so the SVDs run only on refresh steps;
- keeps the parameters' logical axis names on its state, so FSDP shards it like the weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fulcrum.platform.optim import boxes
from fulcrum.platform.optim.quantized import quantize_state

SIDES = ("auto", "left", "right")


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
  """How GaLore reads a parameter as a matrix: `rows` axes × `cols` axes (each group flattened);
  every other axis is a batch axis (e.g. the `layers` axis of scanned blocks)."""

  rows: tuple[int, ...]
  cols: tuple[int, ...]

  def __post_init__(self):
    if not self.rows or not self.cols or set(self.rows) & set(self.cols):
      raise ValueError(f"MatrixSpec needs disjoint, non-empty rows and cols, got {self}")


class _Layout(NamedTuple):
  """A parameter's matrix view: transpose to (batch, rows, cols), then reshape to (batch, m, n)."""

  perm: tuple[int, ...]
  batch: tuple[int, ...]  # Batch axes (in the parameter's order).
  m: int
  n: int
  left: bool  # Project the rows (P: m × r) rather than the columns (Q: n × r).
  rank: int
  rows: tuple[int, ...]  # Row axes, then column axes (parameter axis indices).
  cols: tuple[int, ...]

  def to_matrix(self, x: jax.Array) -> jax.Array:
    bshape = tuple(x.shape[a] for a in self.batch)
    return x.transpose(self.perm).reshape(bshape + (self.m, self.n))

  def from_matrix(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    permuted = tuple(shape[a] for a in self.perm)
    inverse = tuple(sorted(range(len(shape)), key=lambda i: self.perm[i]))
    return y.reshape(permuted).transpose(inverse)

  def projector_shape(self, bshape):
    return bshape + ((self.m if self.left else self.n), self.rank)

  def lowrank_shape(self, bshape):
    return bshape + ((self.rank, self.n) if self.left else (self.m, self.rank))


def _layout(shape: tuple[int, ...], spec: MatrixSpec, rank: int, side: str) -> _Layout:
  ndim = len(shape)
  rows = tuple(a % ndim for a in spec.rows)
  cols = tuple(a % ndim for a in spec.cols)
  batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
  m = math.prod(shape[a] for a in rows)
  n = math.prod(shape[a] for a in cols)
  left = {"auto": m <= n, "left": True, "right": False}[side]
  return _Layout(batch + rows + cols, batch, m, n, left, min(rank, m, n), rows, cols)


def _state_names(lay: _Layout, names: boxes.Names) -> tuple[boxes.Names, boxes.Names]:
  """Logical names of (projector, low-rank moment) for a parameter named `names`: batch axes keep
  theirs, a matrix side keeps its name when it is a single axis, the rank axis has none."""
  if names is None:
    return None, None
  batch = tuple(names[a] for a in lay.batch)
  rows = names[lay.rows[0]] if len(lay.rows) == 1 else None
  cols = names[lay.cols[0]] if len(lay.cols) == 1 else None
  if lay.left:  # P [batch, m, r], R [batch, r, n]
    return batch + (rows, None), batch + (None, cols)
  return batch + (cols, None), batch + (rows, None)  # Q [batch, n, r], R [batch, m, r]


class GaLoreState(NamedTuple):
  count: jax.Array  # int32 []: updates taken; projectors refresh when count % gap == 0.
  projectors: Any  # Per parameter: P [batch, m, r] or Q [batch, n, r]; MaskedNode if unprojected.
  inner: Any  # The base optimizer's state, over the projected (low-rank) gradients.


def default_matrices(params: Any) -> Any:
  """Every plain 2-D parameter is a matrix (rows = axis 0); nothing else is projected."""
  return jax.tree.map(
    lambda p: MatrixSpec((0,), (1,)) if p.ndim == 2 else None,
    _unbox(params),
  )


MATRIX_SIDE_AXES = frozenset({"heads", "kv_heads", "head_dim", "mlp", None})


def matrices_from_axes(params: Any) -> Any:
  """Specs from the logical axis names on boxed parameters: a `kernel` whose axes are `embed` on
  one side and head / MLP axes on the other (attention q, k, v, o; MLP up, gate, down; Mamba's in
  and out projections; the recurrent block's linear maps) is a matrix, `layers` axes are batch
  axes. Embeddings (`vocab`), norms, biases, convolutions and SSM parameters (`A_log`, `D`,
  `x_proj`, `dt_proj`, RG-LRU gates) are not projected."""

  def spec(path, leaf):
    if not boxes.is_box(leaf) or getattr(path[-1], "key", None) != "kernel":
      return None
    names = tuple(leaf.names)
    inner = [i for i, n in enumerate(names) if n != "layers"]
    if len(inner) < 2 or names.count("embed") != 1:
      return None
    e = names.index("embed")
    rest = tuple(i for i in inner if i != e)
    if not all(names[i] in MATRIX_SIDE_AXES for i in rest):
      return None
    if e == inner[0]:
      return MatrixSpec((e,), rest)
    if e == inner[-1]:
      return MatrixSpec(rest, (e,))
    return None

  return jax.tree_util.tree_map_with_path(spec, params, is_leaf=boxes.is_box)


def _unbox(tree):
  return jax.tree.map(lambda x: x.value if boxes.is_box(x) else x, tree, is_leaf=boxes.is_box)


def _leading_vectors(g: jax.Array, left: bool, rank: int) -> jax.Array:
  """The `rank` leading left (or right) singular vectors of each matrix in g [..., m, n]."""
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  return u[..., :rank] if left else jnp.swapaxes(vh[..., :rank, :], -1, -2)


def scale_by_galore(
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  side: str = "auto",
  base_optimizer: optax.GradientTransformation | None = None,
  matrices: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """GaLore's gradient transformation: project, run `base_optimizer`, project back, scale.

  Args:
    rank: r, the projection rank (capped at min(m, n) per matrix).
    update_proj_gap: T, steps between projector refreshes (SVD of the current gradient).
    scale: α, applied to the projected-back updates only (unprojected parameters get the base
      optimizer's update unscaled).
    side: "auto" (project the smaller dimension), "left" (rows) or "right" (columns).
    base_optimizer: a gradient-only transform (no params), run on the low-rank gradients of
      projected parameters and the full gradients of the rest; default `optax.scale_by_adam()`.
      May be `quantize_state(...)`-wrapped for 8-bit moments.
    matrices: a pytree of `MatrixSpec | None` matching the parameters, or a function of the
      parameters returning one; default `default_matrices` (plain 2-D parameters).
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"GaLore rank must be a positive int, got {rank!r}")
  if update_proj_gap < 1:
    raise ValueError(f"GaLore update_proj_gap must be >= 1, got {update_proj_gap}")
  if side not in SIDES:
    raise ValueError(f"GaLore side must be one of {SIDES}, got {side!r}")
  base = base_optimizer or optax.scale_by_adam()
  if matrices is None:
    resolve = default_matrices
  elif callable(matrices):
    resolve = matrices
  else:
    resolve = lambda _: matrices  # noqa: E731

  # Specs found at init, by tree structure: a `matrices` function may need the boxed
  # parameters' axis names, which the (unboxed) gradients passed to `update` no longer carry.
  found: dict[Any, list] = {}

  def specs_for(params, treedef):
    if treedef in found:
      return found[treedef]
    return treedef.flatten_up_to(resolve(params))

  def layouts(leaves, specs):
    return [
      None if s is None else _layout(tuple(x.shape), s, rank, side)
      for x, s in zip(leaves, specs, strict=True)
    ]

  def init(params):
    values, names, treedef = boxes.flatten(params)
    specs = found[treedef] = specs_for(params, treedef)
    boxed_leaves = jax.tree.leaves(params, is_leaf=boxes.is_box)
    projs, proxies = [], []
    for x, nm, lay, like in zip(values, names, layouts(values, specs), boxed_leaves, strict=True):
      if lay is None:
        projs.append(optax.MaskedNode())  # An empty node: no array (orbax saves no 0-size).
        proxies.append(like)  # The full gradient goes to the base optimizer.
        continue
      bshape = tuple(x.shape[a] for a in lay.batch)
      p_names, r_names = _state_names(lay, nm)
      projs.append(boxes.box(jnp.zeros(lay.projector_shape(bshape), jnp.float32), p_names, like))
      proxies.append(boxes.box(jnp.zeros(lay.lowrank_shape(bshape), x.dtype), r_names, like))
    return GaLoreState(
      count=jnp.zeros((), jnp.int32),
      projectors=jax.tree.unflatten(treedef, projs),
      inner=base.init(jax.tree.unflatten(treedef, proxies)),
    )

  def update(updates, state, params=None):
    del params
    grads, treedef = jax.tree.flatten(updates)
    lays = layouts(grads, specs_for(updates, treedef))
    old = treedef.flatten_up_to(state.projectors)
    mats = [None if lay is None else lay.to_matrix(g) for g, lay in zip(grads, lays, strict=True)]

    def refresh():
      return [
        p if lay is None else _leading_vectors(g, lay.left, lay.rank).astype(p.dtype)
        for p, g, lay in zip(old, mats, lays, strict=True)
      ]

    projs = jax.lax.cond(state.count % update_proj_gap == 0, refresh, lambda: old)
    low = []
    for g, gm, p, lay in zip(grads, mats, projs, lays, strict=True):
      if lay is None:
        low.append(g)
      elif lay.left:
        low.append(jnp.einsum("...mr,...mn->...rn", p, gm.astype(p.dtype)).astype(g.dtype))
      else:
        low.append(jnp.einsum("...mn,...nr->...mr", gm.astype(p.dtype), p).astype(g.dtype))
    steps, inner = base.update(jax.tree.unflatten(treedef, low), state.inner, None)
    out = []
    for g, u, p, lay in zip(grads, treedef.flatten_up_to(steps), projs, lays, strict=True):
      if lay is None:
        out.append(u)
        continue
      u = u.astype(p.dtype)
      full = (
        jnp.einsum("...mr,...rn->...mn", p, u)
        if lay.left
        else jnp.einsum("...mr,...nr->...mn", u, p)
      )
      out.append((scale * lay.from_matrix(full, g.shape)).astype(g.dtype))
    new_state = GaLoreState(
      count=optax.safe_int32_increment(state.count),
      projectors=jax.tree.unflatten(treedef, projs),
      inner=inner,
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init, update)


def galore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  weight_decay: float = 0.0,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  side: str = "auto",
  matrices: Any | Callable[[Any], Any] | None = None,
  decay_mask: Any | Callable[[Any], Any] | None = None,
  eight_bit: bool = False,
  block_size: int = 256,
  min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  """GaLore-AdamW: `scale_by_galore` over Adam, decoupled weight decay, learning rate.

  With `eight_bit=True` the Adam moments (low-rank and full) are stored blockwise-quantized to
  8 bits (`quantize_state`): the paper's 8-bit GaLore.
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if eight_bit:
    adam = quantize_state(adam, block_size=block_size, min_size=min_8bit_size)
  return optax.chain(
    scale_by_galore(rank, update_proj_gap, scale, side, adam, matrices),
    optax.add_decayed_weights(weight_decay, decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
