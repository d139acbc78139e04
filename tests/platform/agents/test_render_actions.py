"""The action vocabulary (text <-> arrays, bad text) and the text and RGB renders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.platform.agents.envs import actions, farm, render, tasks, world
from fulcrum.platform.errors import UserError

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.


def test_vocabulary_round_trip():
  vocab = actions.vocabulary()
  encoded = actions.encoded_vocabulary()
  moves = (2 * world.MOVE_MAX + 1) ** 2 - 1
  n = moves + world.SIZE**2 + 4 + 4 + world.N_SLOTS + world.N_RECIPES + 1
  assert len(vocab) == len(set(vocab)) == len(encoded) == n
  assert encoded.dtype == np.int32 and encoded.shape == (n, 3)
  for i, text in enumerate(vocab):
    code = actions.parse_action(text)
    np.testing.assert_array_equal(code, encoded[i])
    assert actions.format_action(code) == text
    assert " " not in text
  assert "move(0,0)" not in vocab
  for text in ("move(1,-2)", "move_to(3,14)", "use(up)", "interact(left)", "choose_item(4)",
               "craft(chest)", "sleep()"):  # fmt: skip
    assert text in vocab
  np.testing.assert_array_equal(actions.parse_action("use(up)"), [actions.USE, 0, 0])
  np.testing.assert_array_equal(actions.parse_action("move(1,-2)"), [actions.MOVE, 1, -2])
  # The kinds keep their documented order.
  assert actions.KINDS == ("move", "move_to", "use", "interact", "choose_item", "craft", "sleep")


@pytest.mark.parametrize(
  "text",
  ["move(0,0)", "move(5,0)", "move(1, 2)", "move(a,b)", "move_to(16,0)", "use(north)", "jump()",
   "craft(boat)", "choose_item(12)", "sleep", "", "sleep()x"],
)  # fmt: skip
def test_bad_action_text_is_a_user_error(text):
  with pytest.raises(UserError) as e:
    actions.parse_action(text)
  msg = str(e.value)
  assert repr(text) in msg and "move_to(x,y)" in msg and "craft(r)" in msg


def test_format_rejects_codes_outside_the_vocabulary():
  with pytest.raises(UserError, match="not an encoded action"):
    actions.format_action([actions.MOVE, 0, 0])


def _hand_built_state():
  task = tasks.parse({
    "id": "render", "domain": "farming", "object": "parsnip", "quantity": 3, "tool": None,
    "init": {"items": {"wood": 12, "parsnip_seeds": 5}}, "evaluator": "harvested_at_least",
    "difficulty": "easy", "max_steps": 10, "lite": False,
  })  # fmt: skip
  state, _ = jax.jit(farm.reset)(jax.random.PRNGKey(0), tasks.to_arrays(task))
  objects = np.zeros((world.SIZE, world.SIZE), np.int8)
  objects[2, 1], objects[4, 0], objects[4, 3] = world.WEED, world.TREE, world.STONE
  terrain = np.array(state.terrain)
  terrain[4, 1] = terrain[4, 4] = terrain[5, 2] = terrain[5, 3] = world.TILLED
  watered = np.zeros((world.SIZE, world.SIZE), bool)
  watered[4, 1] = True
  crop, stage = np.zeros_like(objects), np.zeros_like(objects)
  crop[5, 2] = crop[5, 3] = 1
  stage[5, 2], stage[5, 3] = 1, 2
  return state.replace(
    objects=jnp.asarray(objects),
    terrain=jnp.asarray(terrain),
    watered=jnp.asarray(watered),
    crop=jnp.asarray(crop),
    stage=jnp.asarray(stage),
    slime_pos=jnp.asarray([[4, 6], [0, 15], [0, 15], [0, 15]], jnp.int32),
    slime_hp=jnp.asarray([3, 0, 0, 0], jnp.int32),
  )


def test_text_render_of_a_hand_built_state():
  state = _hand_built_state()
  obs = jax.jit(render.text)(state)
  assert obs.shape == (render.OBS_LEN,) and obs.dtype == jnp.uint8 and render.OBS_LEN <= 320
  np.testing.assert_array_equal(np.asarray(obs), np.asarray(render.text(state)))  # jit = eager
  slots = [(0, "hoe", ""), (1, "can", "20"), (2, "axe", ""), (3, "pickaxe", ""),
           (4, "scythe", ""), (5, "sword", ""), (6, "wood", "12"), (7, "pars_sd", "5")]  # fmt: skip
  inventory = "".join(f"{s:>2}:{name:<8}{n:>2} " for s, name, n in slots)
  want = [
    "Harvest 3 parsnips.".ljust(tasks.DESC_LEN),
    "day 01 06:00 en 100 hp 100",
    "at 02,03 facing down  slot  0",
    " .HHH..",
    " .HHH..",
    " .w....",
    " ..@...",
    " T:.o=.",
    " ..1P..",
    " ....S.",
    inventory.ljust(world.N_SLOTS * render.FIELD),
  ]
  assert render.text_str(state) == "\n".join(want).ljust(render.OBS_LEN)


def test_text_tracks_the_state():
  state = _hand_built_state().replace(
    day=jnp.asarray(12, jnp.int32),
    time=jnp.asarray(25 * 60 + 40, jnp.int32),
    energy=jnp.asarray(7, jnp.int32),
    health=jnp.asarray(55, jnp.int32),
    pos=jnp.asarray([15, 0], jnp.int32),
    facing=jnp.asarray(3, jnp.int32),
    slot=jnp.asarray(11, jnp.int32),
  )
  lines = render.text_str(state).split("\n")
  assert lines[1] == "day 12 01:40 en   7 hp  55"
  assert lines[2] == "at 15,00 facing right slot 11"
  # The map's top-right corner: blank above and right of the map, the lake to the left.
  assert lines[3:10] == [" " * 7] * 3 + ["~~~@   ", "~~~~   ", "~~~~   ", "....   "]


def test_rgb_render():
  state = _hand_built_state()
  image = jax.jit(render.rgb, static_argnames="tile")(state, tile=8)
  assert image.shape == (world.SIZE * 8, world.SIZE * 8, 3) and image.dtype == jnp.uint8
  image = np.asarray(image)
  x, y = 2, 3  # the player: white in the middle of its tile, grass at the tile's edge
  np.testing.assert_array_equal(image[y * 8 + 4, x * 8 + 4], [255, 255, 255])
  np.testing.assert_array_equal(image[y * 8, x * 8], render._TERRAIN_RGB[world.GRASS])
  np.testing.assert_array_equal(image[13 * 8 + 4, 12 * 8 + 4], render._TERRAIN_RGB[world.FLOOR])
  small = render.rgb(state, tile=2)
  assert small.shape == (32, 32, 3)
