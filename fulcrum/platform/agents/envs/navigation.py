"""Walking: which tiles block, `move(dx, dy)` tile by tile, and `move_to(x, y)` along a shortest
path (a BFS distance field computed in JAX by relaxation).

Under vmap every environment runs the BFS loop whichever action it takes, so the loop stops as
soon as no environment that is actually walking still needs it (`active`), and for those as soon
as one of the goal tiles has a distance (BFS relaxation settles every tile at distance <= k after
k sweeps, so the first goal reached is the nearest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents.envs import world

INF = 10_000  # distance of unreachable tiles
# numpy, made device constants where used: importing this module must not start a JAX backend
# (a multi-host run joins after the imports).
_DELTAS = np.asarray(world.DIRECTION_DELTAS)
UP, DOWN, LEFT, RIGHT = range(4)


def in_bounds(xy: jax.Array) -> jax.Array:
  return ((xy >= 0) & (xy < world.SIZE)).all(-1)


def at(grid: jax.Array, xy: jax.Array) -> jax.Array:
  """grid[y, x] with (x, y) clipped into the map (callers check `in_bounds`)."""
  xy = jnp.clip(xy, 0, world.SIZE - 1)
  return grid[xy[..., 1], xy[..., 0]]


def blocked(state: world.State) -> jax.Array:
  """bool[y, x]: tiles the player cannot walk onto (water, walls, the house, objects, villagers,
  live slimes). The player's own tile is not blocked."""
  b = ~jnp.asarray(world.TERRAIN_WALKABLE)[state.terrain] | (state.objects > 0)
  b = b | jnp.asarray(world.VILLAGER_MASK)
  sy = jnp.where(state.slime_hp > 0, state.slime_pos[:, 1], world.SIZE)
  return b.at[sy, state.slime_pos[:, 0]].set(True, mode="drop")


def direction_between(src: jax.Array, dst: jax.Array) -> jax.Array:
  """The direction index from `src` to a 4-adjacent `dst`."""
  d = dst - src
  return jnp.where(d[0] > 0, RIGHT, jnp.where(d[0] < 0, LEFT, jnp.where(d[1] < 0, UP, DOWN)))


def walk(
  pos: jax.Array, facing: jax.Array, dx: jax.Array, dy: jax.Array, block: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """move(dx, dy): |dx| tiles along x, then |dy| along y, stopping at the first blocked tile.

  Returns:
    (new position, facing = the last direction tried, tiles walked).
  """
  x_dir = jnp.where(dx > 0, RIGHT, LEFT)
  y_dir = jnp.where(dy > 0, DOWN, UP)

  def tile(i, carry):  # MOVE_MAX tries along x, then MOVE_MAX along y
    pos, facing, walked, stopped = carry
    along_x = i < world.MOVE_MAX
    n = jnp.where(along_x, jnp.abs(dx), jnp.abs(dy))
    d = jnp.where(along_x, x_dir, y_dir)
    active = (i % world.MOVE_MAX < n) & ~stopped
    nxt = pos + jnp.asarray(_DELTAS)[d]
    ok = in_bounds(nxt) & ~at(block, nxt)
    facing = jnp.where(active, d, facing)
    pos = jnp.where(active & ok, nxt, pos)
    return pos, facing, walked + (active & ok), stopped | (active & ~ok)

  init = (pos, facing, jnp.asarray(0, jnp.int32), jnp.asarray(False))
  pos, facing, walked, _ = jax.lax.fori_loop(0, 2 * world.MOVE_MAX, tile, init)
  return pos, facing, walked


def _shift_min(d: jax.Array) -> jax.Array:
  """min over the 4 neighbours of every tile (INF outside the map)."""
  p = jnp.pad(d, 1, constant_values=INF)
  return jnp.minimum(jnp.minimum(p[:-2, 1:-1], p[2:, 1:-1]), jnp.minimum(p[1:-1, :-2], p[1:-1, 2:]))


def distances(
  pos: jax.Array, block: jax.Array, goals: jax.Array, active: jax.Array | bool = True
) -> jax.Array:
  """int32[y, x]: walking distance from `pos` over unblocked tiles, exact at least up to the
  nearest tile of `goals` (INF where unreachable or not yet settled). Stops early when a goal is
  reached, nothing changes, or `active` is false."""
  free = ~block
  start = jnp.zeros_like(block).at[pos[1], pos[0]].set(True)
  d0 = jnp.where(start, 0, INF).astype(jnp.int32)

  def cond(carry):
    d, changed, i = carry
    return active & changed & ~(goals & (d < INF)).any() & (i < world.SIZE * world.SIZE)

  def body(carry):
    d, _, i = carry
    new = jnp.where(free | start, jnp.minimum(d, _shift_min(d) + 1), INF)
    return new, (new != d).any(), i + 1

  d, _, _ = jax.lax.while_loop(cond, body, (d0, jnp.asarray(True), jnp.asarray(0)))
  return d


def walk_to(
  pos: jax.Array, target: jax.Array, block: jax.Array, active: jax.Array | bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """move_to(x, y): the shortest path to `target` if it is free, else to the nearest free tile
  next to it (facing it).

  Returns:
    (new position, facing, tiles walked, reachable).
  """
  tx, ty = target[0], target[1]
  target_free = in_bounds(target) & ~at(block, target)
  here = jnp.zeros_like(block).at[ty, tx].set(True, mode="drop")
  beside = ~block & (_shift_min(jnp.where(here, 0, INF)) == 0)
  goals = jnp.where(target_free, here, beside)
  d = distances(pos, block, goals, active)
  flat = jnp.where(goals, d, INF).reshape(-1)
  best = jnp.argmin(flat)  # first in row-major order among the nearest
  dist = flat[best]
  goal = jnp.stack([best % world.SIZE, best // world.SIZE]).astype(jnp.int32)
  # Facing: toward the target when stopping beside it, else the direction of the last step
  # (from a neighbour one tile closer to the start).
  nbrs = goal[None, :] + jnp.asarray(_DELTAS)  # [4, 2]
  nd = jnp.where(in_bounds(nbrs), at(d, nbrs), INF)
  prev = nbrs[jnp.argmax(nd == dist - 1)]
  facing = jnp.where(target_free, direction_between(prev, goal), direction_between(goal, target))
  return goal, facing, dist, dist < INF
