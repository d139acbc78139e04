"""Recording an agent's episode: every turn's text observation and action (PATH.txt) and the
world as an animated GIF (PATH.gif, one frame per turn)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fulcrum.platform.agents import envs, rollout
from fulcrum.platform.decode.sampling import Sampling


def record(model, params, interface: rollout.Interface, task: envs.Task, seed: int, path: str,
           temperature: float = 0.0) -> list[str]:  # fmt: skip
  """Plays `task` from `PRNGKey(seed)` with the agent and writes PATH.txt and PATH.gif; returns
  the paths written."""
  arrays = envs.stack([envs.to_arrays(task)])
  turns, _ = rollout.rollout(
    model, interface, Sampling(temperature=temperature), task.max_steps, params, arrays,
    jnp.asarray([seed], jnp.int32), jax.random.key(0),
  )  # fmt: skip
  chosen = np.asarray(turns.action)[np.asarray(turns.live)[:, 0], 0]
  encoded = interface.env.encoded()
  reset, step = jax.jit(envs.reset), jax.jit(envs.step)
  # One compiled program per view (run op by op, rendering compiled ~150 tiny programs: 20 s).
  view = jax.jit(lambda s: (envs.text(s), envs.rgb(s)))
  state, _ = reset(jax.random.PRNGKey(seed), envs.to_arrays(task))
  observation, frame = jax.device_get(view(state))
  text, frames = [], [np.asarray(frame)]
  info = {"success": False}
  for t, a in enumerate(chosen):
    words = bytes(np.asarray(observation)).decode("ascii")
    text.append(f"--- turn {t}\n{words}\n> {interface.actions[a]}")
    state, _, _, _, info = step(state, jnp.asarray(encoded[a]))
    observation, frame = jax.device_get(view(state))
    frames.append(np.asarray(frame))
  text.append(
    f"--- {'success' if bool(info['success']) else 'not solved'} after {len(chosen)} turns"
  )
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  txt, gif = out.with_suffix(".txt"), out.with_suffix(".gif")
  txt.write_text("\n".join(text) + "\n")
  images = [
    Image.fromarray(f).resize((f.shape[1] * 2, f.shape[0] * 2), Image.NEAREST) for f in frames
  ]
  images[0].save(gif, save_all=True, append_images=images[1:], duration=400, loop=0)
  return [str(txt), str(gif)]
