"""Observations: the text render (JAX, fixed-length bytes; what an LM agent reads) and an RGB image
of the whole map (for recordings and multimodal agents).

The text is a fixed template whose variable fields are gathered characters, so `text` traces to a
handful of gathers and one scatter (no Python strings at trace time). OBS_LEN bytes, e.g.:

  Harvest 3 parsnips.                       the task in words (DESC_LEN bytes)
  day 01 06:00 en 100 hp 100                day, time, energy, health
  at 02,03 facing down  slot  0             position, facing, selected slot
  (7 lines of 7 characters: the local view, the player `@` in the middle)
   0:hoe        1:can     20  6:pars_sd  5  the non-empty slots: slot:name count (tools: no
                                            count; the watering can: its water level)

View legend: `@` player, `.` grass, `=` tilled, `:` watered tilled soil, `~` water, `#` wall,
`H` house, `,` mine floor, `w` weed, `o` stone, `T` tree, `0`..`2` a growing crop's stage,
`P` mature parsnip, `Q` mature potato, `V` villager, `S` slime, blank outside the map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents.envs import tasks, world

VIEW = 7  # the local view is VIEW x VIEW tiles around the player
NAME_WIDTH = max(len(s) for s in world.ITEM_SHORT)
FIELD = 2 + 1 + NAME_WIDTH + 2 + 1  # "11:sprinklr99 "
_SPACE, _ZERO = ord(" "), ord("0")

# The template: literal text and (field name, width) slots, in reading order.
_LAYOUT: list[str | tuple[str, int]] = [
  ("task", tasks.DESC_LEN), "\n",
  "day ", ("day", 2), " ", ("hour", 2), ":", ("minute", 2),
  " en ", ("energy", 3), " hp ", ("health", 3), "\n",
  "at ", ("x", 2), ",", ("y", 2), " facing ", ("facing", 5), " slot ", ("slot", 2), "\n",
  *[part for _ in range(VIEW) for part in (("row", VIEW), "\n")],
  ("inventory", world.N_SLOTS * FIELD),
]  # fmt: skip


def _template() -> tuple[np.ndarray, np.ndarray]:
  chars, dynamic = [], []
  for part in _LAYOUT:
    if isinstance(part, str):
      chars += list(part.encode())
      dynamic += [False] * len(part)
    else:
      chars += [_SPACE] * part[1]
      dynamic += [True] * part[1]
  return np.array(chars, np.uint8), np.flatnonzero(dynamic).astype(np.int32)


TEMPLATE, _DYNAMIC = _template()
OBS_LEN = len(TEMPLATE)
assert OBS_LEN <= 320, OBS_LEN


def _table(strings, width: int) -> np.ndarray:
  out = np.full((len(strings), width), _SPACE, np.uint8)
  for i, s in enumerate(strings):
    out[i, : len(s)] = np.frombuffer(s.encode(), np.uint8)
  return out


_NAMES = _table(world.ITEM_SHORT, NAME_WIDTH)
_FACING = _table(world.DIRECTIONS, 5)
_SLOT_LABEL = _table([f"{s:>2}:" for s in range(world.N_SLOTS)], 3)
_TERRAIN_CHAR = np.array([ord(t[1]) for t in world.TERRAIN], np.uint8)
_OBJECT_CHAR = np.array([ord(o[1]) for o in world.OBJECTS], np.uint8)
_CROP_CHAR = np.array([ord(c[4]) for c in world.CROPS], np.uint8)
_IS_TOOL = world.ITEM_KINDS.index("tool") == world.ITEM_KIND


def _digits(n: jax.Array, width: int, pad: int = _ZERO) -> jax.Array:
  """uint8[width]: n (clipped to width digits) in decimal, left-padded with `pad`."""
  n = jnp.clip(n, 0, 10**width - 1).astype(jnp.int32)
  powers = jnp.asarray([10 ** (width - 1 - i) for i in range(width)], jnp.int32)
  digits = (n // powers) % 10
  leading = (n < powers) & (jnp.arange(width) < width - 1)
  return jnp.where(leading, pad, _ZERO + digits).astype(jnp.uint8)


def map_chars(state: world.State) -> jax.Array:
  """uint8[y, x]: the character of every tile (the view legend)."""
  ch = jnp.asarray(_TERRAIN_CHAR)[state.terrain]
  ch = jnp.where((state.terrain == world.TILLED) & state.watered, ord(":"), ch)
  days = jnp.asarray(world.CROP_DAYS)[state.crop]
  crop_ch = jnp.where(state.stage >= days, jnp.asarray(_CROP_CHAR)[state.crop], _ZERO + state.stage)
  ch = jnp.where(state.crop > 0, crop_ch.astype(jnp.uint8), ch)
  ch = jnp.where(state.objects > 0, jnp.asarray(_OBJECT_CHAR)[state.objects], ch)
  ch = jnp.where(jnp.asarray(world.VILLAGER_MASK), ord("V"), ch)
  alive = state.slime_hp > 0
  sy = jnp.where(alive, state.slime_pos[:, 1], world.SIZE)  # dead slimes: out of range, dropped
  ch = ch.at[sy, state.slime_pos[:, 0]].set(ord("S"), mode="drop")
  return ch.at[state.pos[1], state.pos[0]].set(ord("@"))


def _inventory(state: world.State) -> jax.Array:
  item, count = state.inv_item, state.inv_count
  shown = jnp.where(item == world.CAN, state.water, count)
  digits = jax.vmap(lambda n: _digits(n, 2, _SPACE))(shown)
  blank = jnp.asarray(_IS_TOOL)[item] & (item != world.CAN)
  digits = jnp.where(blank[:, None], _SPACE, digits)
  space = jnp.full((world.N_SLOTS, 1), _SPACE, jnp.uint8)
  fields = jnp.concatenate([jnp.asarray(_SLOT_LABEL), jnp.asarray(_NAMES)[item], digits, space], 1)
  full = item > 0
  dest = jnp.where(full, jnp.cumsum(full) - 1, world.N_SLOTS)  # non-empty slots, packed left
  packed = jnp.full((world.N_SLOTS + 1, FIELD), _SPACE, jnp.uint8).at[dest].set(fields)
  return packed[: world.N_SLOTS].reshape(-1)


def text(state: world.State) -> jax.Array:
  """uint8[OBS_LEN]: the observation an agent reads (jittable; see the module docstring)."""
  pad = VIEW // 2
  padded = jnp.pad(map_chars(state), pad, constant_values=_SPACE)
  view = jax.lax.dynamic_slice(padded, (state.pos[1], state.pos[0]), (VIEW, VIEW))
  fields = [
    state.task.description.astype(jnp.uint8),
    _digits(state.day, 2),
    _digits((state.time // 60) % 24, 2),
    _digits(state.time % 60, 2),
    _digits(state.energy, 3, _SPACE),
    _digits(state.health, 3, _SPACE),
    _digits(state.pos[0], 2),
    _digits(state.pos[1], 2),
    jnp.asarray(_FACING)[state.facing],
    _digits(state.slot, 2, _SPACE),
    view.reshape(-1),
    _inventory(state),
  ]
  return jnp.asarray(TEMPLATE).at[_DYNAMIC].set(jnp.concatenate(fields))


def text_str(state: world.State) -> str:
  """The text observation of one (unbatched) state as a str, for people."""
  return bytes(np.asarray(jax.device_get(text(state)))).decode("ascii")


# ---------------------------------------------------------------- RGB

_TERRAIN_RGB = np.array(
  [[106, 170, 70], [140, 96, 56], [60, 110, 200], [70, 70, 70], [150, 140, 120], [170, 60, 50]],
  np.uint8,
)
_WET_SOIL = np.array([96, 62, 36], np.uint8)
_OBJECT_RGB = np.array([[0, 0, 0], [60, 130, 40], [130, 130, 130], [30, 90, 30]], np.uint8)
_CROP_RGB = np.array([[0, 0, 0], [240, 230, 140], [200, 150, 90]], np.uint8)  # mature colour
_SPROUT = np.array([120, 200, 90], np.uint8)
_VILLAGER_RGB = np.array([230, 120, 200], np.uint8)
_SLIME_RGB = np.array([80, 220, 80], np.uint8)
_PLAYER_RGB = np.array([255, 255, 255], np.uint8)


def rgb(state: world.State, tile: int = 8) -> jax.Array:
  """uint8[SIZE * tile, SIZE * tile, 3]: the whole map, one tile x tile block per tile (the
  terrain fills the block; an object, crop, villager, slime or the player fills its middle)."""
  base = jnp.asarray(_TERRAIN_RGB)[state.terrain]
  wet = (state.terrain == world.TILLED) & state.watered
  base = jnp.where(wet[..., None], jnp.asarray(_WET_SOIL), base)
  mature = state.stage >= jnp.asarray(world.CROP_DAYS)[state.crop]
  crop = jnp.where(mature[..., None], jnp.asarray(_CROP_RGB)[state.crop], jnp.asarray(_SPROUT))
  inner = jnp.where((state.crop > 0)[..., None], crop, jnp.asarray(_OBJECT_RGB)[state.objects])
  has = (state.crop > 0) | (state.objects > 0)
  vmask = jnp.asarray(world.VILLAGER_MASK)
  inner = jnp.where(vmask[..., None], jnp.asarray(_VILLAGER_RGB), inner)
  has = has | vmask
  sy = jnp.where(state.slime_hp > 0, state.slime_pos[:, 1], world.SIZE)
  inner = inner.at[sy, state.slime_pos[:, 0]].set(jnp.asarray(_SLIME_RGB), mode="drop")
  has = has.at[sy, state.slime_pos[:, 0]].set(True, mode="drop")
  inner = inner.at[state.pos[1], state.pos[0]].set(jnp.asarray(_PLAYER_RGB))
  has = has.at[state.pos[1], state.pos[0]].set(True)
  up = lambda a: jnp.repeat(jnp.repeat(a, tile, 0), tile, 1)
  edge = max(tile // 4, 1) if tile > 2 else 0
  within = (np.arange(tile) >= edge) & (np.arange(tile) < tile - edge)
  middle = jnp.asarray(np.tile(within[:, None] & within[None, :], (world.SIZE, world.SIZE)))
  return jnp.where((up(has) & middle)[..., None], up(inner), up(base)).astype(jnp.uint8)
