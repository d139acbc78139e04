"""Optimizer state that keeps its parameters' logical axis names.

`tx.init` runs on parameters boxed in `nn.LogicallyPartitioned` (from `model.init`), and the
trainer shards the whole train state by those boxes. Transforms whose state leaves have other
shapes than the parameters (GaLore's projectors, 8-bit codes and block scales) use these
helpers to give each new leaf the names of the axes it keeps, so the state shards like the
parameters do (`embed` over fsdp, heads and MLP over tensor) instead of being replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import linen as nn

Names = tuple[str | None, ...] | None  # None: the leaf was not boxed.


def is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def flatten(tree: Any) -> tuple[list[Any], list[Names], Any]:
  """Leaves of `tree` with boxes opened: (values, names per leaf, treedef over boxes)."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_box)
  values = [leaf.value if is_box(leaf) else leaf for leaf in leaves]
  names = [tuple(leaf.names) if is_box(leaf) else None for leaf in leaves]
  return values, names, treedef


def box(value: Any, names: Names, like: Any = None) -> Any:
  """`value` boxed with `names` (a copy of `like`'s box, for its mesh and rules), or bare."""
  if names is None:
    return value
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} axis names {names} for a {value.shape} array")
  if like is not None and is_box(like):
    return like.replace(value=value, names=tuple(names))
  return nn.LogicallyPartitioned(value, tuple(names))


def map_leaves(fn: Callable[[Any, Names, Any], Any], tree: Any) -> Any:
  """`fn(value, names, original_leaf)` over every (possibly boxed) leaf; `fn` boxes its result."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_box)
  out = [
    fn(leaf.value if is_box(leaf) else leaf, tuple(leaf.names) if is_box(leaf) else None, leaf)
    for leaf in leaves
  ]
  return jax.tree.unflatten(treedef, out)


def pick(names: Names, axes: Sequence[int]) -> Names:
  """The names of `axes`, or None when unboxed."""
  return None if names is None else tuple(names[a] for a in axes)
