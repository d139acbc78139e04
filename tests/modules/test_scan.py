"""Every scan implementation against the `lax.scan` reference: values, h_last, gradients of a
random scalar loss w.r.t. every input, the split-and-resume invariant, resets, vmap and flax.

Cases: every implementation × both scans × (dtype, length, h0) configurations that cover every
pair of dtype {fp32, bf16}, length {1, 7, 64, 300} and h0 {given, absent} — the full product
costs about three minutes of XLA compilation on 2 cores, and the three axes touch separate code
(dtype: the casts at entry and exit; h0: the initial state; length: padding, chunks and Pallas
time blocks, 300 being several of each and a multiple of neither).

Tolerances: float32 values 1e-5 (rtol and atol), float32 gradients 1e-4 relative to the largest
entry. bfloat16 inputs are upcast and accumulated in float32 by every implementation, so h_last
(float32) still matches to 1e-4; y is rounded to bfloat16 at the end, where one bfloat16 ulp
(2^-8 relative) of difference is allowed (1e-2, and 1e-2 of the largest entry absolute).
Gradients are compared for the float32 cases. CHUNKED runs with chunks of 8 here, so that
t = 7, 64 and 300 give one short chunk, exact chunks and a padded last chunk; its default size
runs in the split, vmap/flax tests and PALLAS's backward pass. PALLAS runs with `interpret=True`
on CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from fulcrum.modules import scan
from fulcrum.modules.scan import ScanImpl, chunked, pallas

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.

IMPLS = [ScanImpl.ASSOCIATIVE, ScanImpl.CHUNKED, ScanImpl.PALLAS]
LENGTHS = [1, 7, 64, 300]  # 300: several chunks and Pallas time blocks, neither a multiple.
B, D, E, N = 2, 8, 8, 4  # Small: the file runs in about a minute on 2 cores.


def _inputs(kind: str, dtype, t: int, with_h0: bool, seed: int = 0) -> tuple:
  """Random (a, x, h0) for the linear scan or (x, dt, A, B, C, D, h0) for the selective scan.

  Drawn with numpy: eager jax.random calls would compile a small program per shape.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  cast = lambda z: jnp.asarray(z, dtype)
  if kind == "linear":
    a = rng.uniform(0.5, 1.0, (B, t, D)).astype(np.float32)
    h0 = jnp.asarray(normal(B, D)) if with_h0 else None
    return cast(a), cast(normal(B, t, D)), h0
  dt = np.log1p(np.exp(normal(B, t, E) - 1.0))  # softplus, as Mamba's Δ.
  A = jnp.asarray(-np.exp(normal(E, N)))  # Negative, as Mamba's -exp(A_log).
  h0 = jnp.asarray(normal(B, E, N)) if with_h0 else None
  x, Bm, C = normal(B, t, E), normal(B, t, N), normal(B, t, N)
  return cast(x), cast(dt), A, cast(Bm), cast(C), jnp.asarray(normal(E)), h0


def _scan_fn(kind: str, impl, **kw):
  fn = scan.linear_scan if kind == "linear" else scan.selective_scan
  return functools.partial(fn, impl=impl, **kw)


# XLA's CPU compilation is most of this file's time; LLVM at -O0 compiles the same HLO in about
# half the time. (Only a top-level jit may set compiler options.)
jit_fast = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)

TEST_CHUNK = 8  # CHUNKED's chunk size in the matrix below (see the module docstring).


@functools.cache
def _outputs_and_grads(kind: str, impl: ScanImpl, dtype, t: int, with_h0: bool):
  """(y, h_last, grads of a random linear functional of (y, h_last) w.r.t. every input); no
  grads (an empty tuple) for bfloat16."""
  args = _inputs(kind, dtype, t, with_h0)
  fn = _scan_fn(kind, impl, chunk_size=TEST_CHUNK if impl == ScanImpl.CHUNKED else None)
  present = tuple(i for i, z in enumerate(args) if z is not None)
  rng = np.random.default_rng(1)
  y_shape, h_shape = ((B, t, D), (B, D)) if kind == "linear" else ((B, t, E), (B, E, N))
  wy, wh = rng.standard_normal(y_shape, np.float32), rng.standard_normal(h_shape, np.float32)

  def loss(*diff):
    full = list(args)
    for i, z in zip(present, diff, strict=True):
      full[i] = z
    y, h_last = fn(*full)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h_last * wh), (y, h_last)

  if dtype != jnp.float32:
    y, h_last = jit_fast(fn)(*args)
    return y, h_last, ()
  grad = jit_fast(jax.grad(loss, argnums=tuple(range(len(present))), has_aux=True))
  grads, (y, h_last) = grad(*(args[i] for i in present))
  return y, h_last, grads


def _close(got, want, rtol, atol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, what
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


# (dtype, length, with_h0): float32 with h0 at every length, then every remaining pair once.
CASES = [(jnp.float32, t, True) for t in LENGTHS] + [
  (jnp.float32, 7, False),
  (jnp.float32, 300, False),
  (jnp.bfloat16, 7, True),
  (jnp.bfloat16, 300, True),
  (jnp.bfloat16, 1, False),
  (jnp.bfloat16, 64, False),
]
CASE_IDS = [f"{jnp.dtype(d).name}-t{t}-{'h0' if h else 'zero_h0'}" for d, t, h in CASES]


@pytest.mark.parametrize("dtype,t,with_h0", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["linear", "selective"])
def test_matches_reference(kind, impl, dtype, t, with_h0):
  y, h_last, grads = _outputs_and_grads(kind, impl, dtype, t, with_h0)
  y_ref, h_ref, grads_ref = _outputs_and_grads(kind, ScanImpl.REFERENCE, dtype, t, with_h0)
  assert y.dtype == (jnp.float32 if kind == "linear" else dtype)
  assert h_last.dtype == jnp.float32
  fp32 = dtype == jnp.float32
  _close(y, y_ref, *((1e-5, 1e-5) if fp32 else (1e-2, 1e-2 * np.abs(y_ref).max())), "y")
  _close(h_last, h_ref, 1e-4 if not fp32 else 1e-5, 1e-5, "h_last")
  for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
    scale = float(np.abs(np.asarray(g_ref, np.float32)).max()) or 1.0
    assert g.dtype == g_ref.dtype, f"grad {i} dtype"
    _close(g, g_ref, 0, 1e-4 * scale, f"grad of input {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["linear", "selective"])
def test_split_and_resume_equals_one_shot(kind, impl):
  # The decode/resume invariant: scanning [0, s) then [s, t) from its h_last is one scan of t.
  t, s = 64, 23  # Neither part a multiple of a chunk or a Pallas time block.
  args = _inputs(kind, jnp.float32, t, with_h0=True)
  fn = _scan_fn(kind, impl)
  time_args = (0, 1) if kind == "linear" else (0, 1, 3, 4)
  part = lambda lo, hi: tuple(z[:, lo:hi] if i in time_args else z for i, z in enumerate(args[:-1]))

  @jit_fast
  def one_shot_and_split():
    y, h = fn(*args)
    y1, h1 = fn(*part(0, s), args[-1])
    y2, h2 = fn(*part(s, t), h1)
    return y, h, jnp.concatenate([y1, y2], axis=1), h2

  y, h, y_split, h_split = one_shot_and_split()
  _close(y_split, y, 1e-5, 1e-5, "y")
  _close(h_split, h, 1e-5, 1e-5, "h_last")


@pytest.mark.parametrize("impl", [ScanImpl.REFERENCE, *IMPLS])
def test_zero_decay_resets_the_state(impl):
  # Griffin sets a_t = 0 at a document start: h from there on forgets the past entirely.
  a, x, h0 = _inputs("linear", jnp.float32, 40, with_h0=True)
  a = a.at[:, 17].set(0.0)
  fn = _scan_fn("linear", impl)
  h, h_last = jit_fast(fn)(a, x, h0)
  h_tail, h_tail_last = jit_fast(fn)(a[:, 17:], x[:, 17:], None)
  _close(h[:, 17:], h_tail, 1e-5, 1e-5, "h after the reset")
  _close(h_last, h_tail_last, 1e-5, 1e-5, "h_last")
  # No gradient flows across the reset, and none is NaN.
  g = jit_fast(jax.grad(lambda x, h0: jnp.sum(fn(a, x, h0)[0][:, 17:]), argnums=(0, 1)))(x, h0)
  assert np.all(np.isfinite(g[0])) and not np.any(g[0][:, :17]) and not np.any(g[1])


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunk_size_and_intra_chunk_order(chunk_size):
  # Caller-chosen chunk sizes (1, a non-divisor) and the accelerators' associative evaluation
  # inside chunks equal the reference too.
  args = _inputs("selective", jnp.float32, 21, with_h0=True)
  want = jit_fast(_scan_fn("selective", ScanImpl.REFERENCE))(*args)
  got = jit_fast(_scan_fn("selective", ScanImpl.CHUNKED, chunk_size=chunk_size))(*args)
  other = jit_fast(functools.partial(chunked.selective_scan, chunk_size=16, order="associative"))
  for out in (got, other(*args)):
    _close(out[0], want[0], 1e-5, 1e-5, "y")
    _close(out[1], want[1], 1e-5, 1e-5, "h_last")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["linear", "selective"])
def test_bfloat16_gradients_keep_input_dtypes(kind, impl):
  # Cotangents come back in each input's dtype, and agree with the reference's to bf16 rounding.
  args = _inputs(kind, jnp.bfloat16, 7, with_h0=True)
  grads = {}
  for i in (ScanImpl.REFERENCE, impl):
    fn = _scan_fn(kind, i)
    loss = lambda *z, fn=fn: sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in fn(*z))
    grads[i] = jit_fast(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  for j, (g, g_ref) in enumerate(zip(grads[impl], grads[ScanImpl.REFERENCE], strict=True)):
    assert g.dtype == args[j].dtype, f"grad {j} dtype"
    scale = float(np.abs(np.asarray(g_ref, np.float32)).max())
    _close(g, g_ref, 0, 2e-2 * scale, f"grad of input {j}")


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_and_flax_module(impl):
  class Recurrence(nn.Module):
    impl: str

    @nn.compact
    def __call__(self, x):
      decay = nn.sigmoid(self.param("logit", nn.initializers.normal(1.0), (x.shape[-1],)))
      return scan.linear_scan(jnp.broadcast_to(decay, x.shape), x, impl=self.impl)[0]

  x = np.random.default_rng(0).standard_normal((3, B, 9, D), np.float32)  # vmapped over axis 0.
  model, ref = Recurrence(impl.value), Recurrence("reference")
  params = jit_fast(model.init)(jax.random.key(1), x[0])
  loss = lambda m: lambda p: jnp.sum(jax.vmap(lambda z: m.apply(p, z))(x) ** 2)
  got = jit_fast(jax.value_and_grad(loss(model)))(params)
  want = jit_fast(jax.value_and_grad(loss(ref)))(params)
  jax.tree.map(lambda g, w: _close(g, w, 1e-5, 1e-5, "vmap/flax"), got, want)


def test_auto_resolves_per_backend():
  assert scan.resolve("auto", "linear") == ScanImpl.REFERENCE  # CPU: see bench_scan.py.
  assert scan.resolve("auto", "selective") == ScanImpl.CHUNKED
  assert scan.resolve("pallas") == ScanImpl.PALLAS
  with pytest.raises(ValueError):
    scan.resolve("fastest")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_pallas_kernels_lower_for_accelerators(platform, monkeypatch):
  # No accelerator here: lower the kernels as they would be on TPU (Mosaic) and GPU (Triton),
  # which checks block shapes and that every op in them has a lowering. Not a compile or a run.
  monkeypatch.setattr(pallas, "_backend", lambda: "tpu" if platform == "tpu" else "gpu")
  f = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  kernels = [
    (
      lambda a, x, h0: pallas._linear_call(a, x, h0, reverse=True),
      (f(2, 77, 100),) * 2 + (f(2, 100),),
    ),
    (
      lambda *z: pallas._selective_call(*z),  # A fresh function: no trace cached per backend.
      (f(2, 77, 200),) * 2 + (f(200, 5),) + (f(2, 77, 5),) * 2 + (f(2, 200, 5),),
    ),
  ]
  # Triton kernels have no serialisation-compatibility guarantee; lowering is what is checked.
  unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn, shapes in kernels:
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)(*shapes)
    assert "custom_call" in exported.mlir_module()
