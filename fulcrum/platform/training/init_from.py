"""`train.init_from`: a new run that starts from a pretrained model's parameters.

  ""            fresh parameters (the model's own init)
  hf:FOLDER     a local Hugging Face checkpoint folder of any family `hf.load_pretrained` reads
  workdir:DIR   another Fulcrum run: the parameters of its newest checkpoint

`resolve_config` makes the run's `model.*` the source's, keeping the keys that say how the
run computes (`RUN_KEYS`) and its `lora_*` keys; `initial_state` then puts the source's
parameters straight into the run's shardings, with a fresh optimizer state. Parameters the
source lacks (LoRA adapters) keep their fresh init. Only a run that starts reads the source:
a resumed run restores its own checkpoint and takes `model.*` from its own config.json.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fulcrum.modules import ModelConfig
from fulcrum.modules.blocks import BLOCK_ARCHS, layer_paths
from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.pretrained import place_pretrained, pretrained_config
from fulcrum.platform.optim.lora import ADAPTERS
from fulcrum.platform.training import integrity, train_config
from fulcrum.platform.training.checkpoint import DataHandler, DataRestore
from fulcrum.platform.training.experiment import Experiment, TrainState

__all__ = [
  "RUN_KEYS",
  "initial_params",
  "initial_state",
  "resolve_config",
  "newest_step",
  "source",
  "with_fresh_adapters",
]

log = logging.getLogger("fulcrum")

# model.* keys that say how the run computes, not what the model is: the run keeps its own.
RUN_KEYS = ("dtype", "remat", "scan_layers", "attention_impl", "scan_impl", "quant")
# The LoRA keys (model.lora_rank, ...): the run's own, like its adapters (`ADAPTERS`).
LORA_KEYS = "lora_"


def source(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
  """`train.init_from` as (kind, path), None for a fresh init; UserError when malformed."""
  try:
    return train_config.init_source(config.train.get("init_from", ""))
  except ValueError as e:
    raise UserError(str(e)) from None


def resolve_config(
  config: ml_collections.ConfigDict, workdir: str | epath.PathLike | None = None
) -> ml_collections.ConfigDict:
  """`config` with the model section of its `train.init_from` source.

  Every `model.*` key but `RUN_KEYS` and `lora_*` becomes the source's: for `hf:` the
  checkpoint's config.json (through its family's converter, other keys at their defaults),
  for `workdir:` that run's config.json. A value of the run's that differs (a recipe default
  or a `--set`: they cannot be told apart) is replaced, with a warning naming it. An `hf:`
  checkpoint folder with a tokenizer.json also sets `data.tokenizer` when it is `bytes` (the
  default): a fine-tune takes the checkpoint's tokenizer.

  Args:
    config: the run's config (not modified).
    workdir: the run's own workdir: when its config.json was resolved from the same source
      (a resumed run), its model section is taken and the source is not read.

  Returns:
    A new config (the same object when `train.init_from` is empty).

  Raises:
    UserError: a malformed `train.init_from`, or a source that is missing or unreadable.
  """
  spec = source(config)
  if spec is None:
    return config
  kind, path = spec
  model = _resumed_model(config, workdir)
  if model is None:
    try:
      model = _hf_model(path) if kind == "hf" else _workdir_model(path)
    except UserError as e:
      raise UserError(f"train.init_from={config.train.init_from}: {e}") from None
  resolved = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for key in config.model:
    if key in RUN_KEYS or key.startswith(LORA_KEYS) or key not in model:
      continue
    if resolved.model[key] != model[key]:
      changed.append(f"{key}: {resolved.model[key]!r} -> {model[key]!r}")
      resolved.model[key] = model[key]
  if changed:
    log.warning("train.init_from=%s sets model.%s", config.train.init_from, "; ".join(changed))
  if kind == "hf" and resolved.data.get("tokenizer") == tokenizer_lib.BYTES:
    # A checkpoint's own tokenizer is the default: its ids are what the weights were trained on.
    folder = epath.Path(path).expanduser().absolute()
    if (folder / "tokenizer.json").exists():
      resolved.data.tokenizer = f"{tokenizer_lib.HF_PREFIX}{folder}"
      log.warning("train.init_from=%s sets data.tokenizer=%s", config.train.init_from, folder)
  if config.is_locked:
    resolved.lock()
  return resolved


def _resumed_model(config: ml_collections.ConfigDict, workdir) -> dict[str, Any] | None:
  """The model section of `workdir`'s config.json when it was resolved from the same source."""
  if workdir is None or not (workdir_lib.resolve(workdir) / "config.json").exists():
    return None
  try:
    old = workdir_lib.read_config(workdir)
  except UserError:  # `workdir.prepare` reports it; the source decides.
    return None
  if old.train.get("init_from") != config.train.init_from:
    return None
  return old.model.to_dict()


def _hf_model(path: str) -> dict[str, Any]:
  return {**sections.model_defaults().to_dict(), **pretrained_config(path)}


def _workdir_model(path: str) -> dict[str, Any]:
  model = workdir_lib.read_config(path).model.to_dict()
  newest_step(path)  # Refuse a run without checkpoints before this one starts.
  return model


def initial_params(config: ml_collections.ConfigDict, exp: Experiment, fresh: Any = None) -> Any:
  """The source's parameters in `exp`'s parameter shardings.

  Args:
    config: the resolved config (`resolve_config`); `train.init_from` must name a source.
    exp: the run's experiment (`exp.abstract_state.params` gives shapes, dtypes, shardings).
    fresh: freshly initialised params, for what the source lacks (LoRA adapters).

  Returns:
    The params tree of `exp.abstract_state.params`, as `jax.Array`s.

  Raises:
    UserError: the source cannot be read, or does not fit the model (names the first array).
  """
  spec = source(config)
  if spec is None:
    raise ValueError("train.init_from is empty: there is no source to read")
  kind, path = spec
  abstract = exp.abstract_state.params
  model = ModelConfig.from_mapping(config.model)
  if kind == "hf":
    step, placed = None, place_pretrained(path, model, abstract)
  else:
    source_model = workdir_lib.read_config(path).model
    layout = {k: source_model[k] for k in ("arch", "num_layers", "scan_layers")}
    step, placed = _restore_params(path, dataclasses.replace(model, **layout), model, abstract)
  at = "" if step is None else f" (step {step})"
  return with_fresh_adapters(placed, fresh, abstract, f"{config.train.init_from}{at}")


def with_fresh_adapters(placed: Any, fresh: Any, abstract: Any, where: str) -> Any:
  """`placed` completed to `abstract`'s tree with `fresh`'s LoRA adapters (which a source
  without adapters lacks); any other missing param is a UserError naming it."""
  wanted, flat = traverse_util.flatten_dict(abstract), traverse_util.flatten_dict(placed)
  missing = [k for k in wanted if k not in flat]
  lacking = [k for k in missing if k[-1] not in ADAPTERS or fresh is None]
  if lacking:
    raise UserError(
      f"param {'/'.join(lacking[0])} of this model is not in {where}; use the source's "
      "model.* settings"
    )
  fresh_flat = traverse_util.flatten_dict(fresh) if missing else {}
  params = {k: flat[k] if k in flat else fresh_flat[k] for k in wanted}
  log.info(
    "initialised %d params from %s%s",
    len(flat),
    where,
    f"; {len(missing)} fresh (adapters)" if missing else "",
  )
  return traverse_util.unflatten_dict(params)


def initial_state(config: ml_collections.ConfigDict, exp: Experiment, state: TrainState):
  """`state` (fresh, `exp.init_state()`) with the source's params and a fresh optimizer state
  for them; `state` itself when `train.init_from` is empty."""
  if source(config) is None:
    return state
  params = initial_params(config, exp, state.params)
  with exp.activate():
    init = jax.jit(exp.tx.init, out_shardings=exp.state_sharding.opt_state)
    return state.replace(params=params, opt_state=init(params))


# --- workdir: sources -------------------------------------------------------------------------


def _reader(path: str) -> ocp.CheckpointManager:
  """A read-only manager of DIR/checkpoints that can restore part of the train state."""
  directory = workdir_lib.resolve(path) / "checkpoints"
  if not directory.exists():
    raise UserError(f"{directory.parent} has no checkpoints; train it first or pass another")
  options = ocp.CheckpointManagerOptions(
    read_only=True, create=False, save_interval_steps=0, max_to_keep=None
  )
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": DataHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def newest_step(path: str) -> int:
  """The step of the newest checkpoint in workdir `path` (UserError when it has none)."""
  reader = _reader(path)
  try:
    steps = reader.all_steps()
  finally:
    reader.close()
  if not steps:
    raise UserError(f"{path}/checkpoints holds no checkpoint; train it first or pass another")
  return max(steps)


Key = tuple[str, ...]


def _layers(config: ModelConfig, keys: Any) -> dict[Key, tuple[Key, int | None]]:
  """Each param key of one layout as its unscanned key -> (its key in `keys`, stacked index).

  A stacked key (`scan_layers`) stands for one unscanned key per layer of its group.
  """
  groups = []
  if config.arch in BLOCK_ARCHS:
    pairs = zip(layer_paths(config), layer_paths(config, scanned=False), strict=True)
    groups = [(layer.path, layer.stacked, own.path) for layer, own in pairs]
  out = {}
  for key in keys:
    matched = [(own + key[len(p) :], i) for p, i, own in groups if key[: len(p)] == p]
    for own_key, stacked in matched or [(key, None)]:
      out[own_key] = (key, stacked)
  return out


def _restore_params(
  path: str, source_model: ModelConfig, model: ModelConfig, abstract: Any
) -> tuple[int, Any]:
  """(step, params) of the newest checkpoint in workdir `path`: its params alone (no optimizer
  state), checked against their saved fingerprints, in `abstract`'s layout and shardings.

  Restored straight into those shardings; when the source stacks its layers otherwise
  (`scan_layers`), each layer is restored sharded like its target and restacked on device.
  """
  step = newest_step(path)
  where = f"{path} (step {step})"
  reader = _reader(path)
  try:
    try:
      metadata = reader.item_metadata(step)["state"]["params"]
      saved = {tuple(k.split("/")): v for k, v in integrity.layout(metadata).items()}
    except Exception as e:  # orbax raises many types for unreadable metadata.
      raise _unreadable(where, path, e) from None
    wanted = traverse_util.flatten_dict(abstract)
    sources, targets = _layers(source_model, saved), _layers(model, wanted)
    extra = [k for k in sources if k not in targets]
    if extra:
      raise UserError(
        f"{where} holds param {'/'.join(extra[0])}, which this model lacks; use the source's "
        "model.* settings (a LoRA source needs the same model.lora_* keys)"
      )
    lacking = [k for k in targets if k not in sources and k[-1] not in ADAPTERS]
    if lacking:
      raise UserError(
        f"param {'/'.join(lacking[0])} of this model is not in {where}; use the source's "
        "model.* settings"
      )
    items = {}  # What to restore: each source key, sharded like its target.
    for own, (key, stacked) in sources.items():
      target_key, target_stacked = targets[own]
      target = wanted[target_key]
      shape, dtype = saved[key]
      piece = (shape if stacked is None else shape[1:], dtype)
      want = tuple(target.shape if target_stacked is None else target.shape[1:]), str(target.dtype)
      if piece != want:
        raise UserError(
          f"param {'/'.join(own)} is {_describe(piece)} in {where} but {_describe(want)} in "
          "this model; use the source's model.* settings"
        )
      spec, mesh = target.sharding.spec, target.sharding.mesh
      if (stacked is None) != (target_stacked is None):
        spec = P(*spec[1:]) if stacked is None else P(None, *spec)
      items[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    item = {"params": traverse_util.unflatten_dict(items)}
    args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
      ),
      data=DataRestore(any_process=True),
    )
    try:
      restored = reader.restore(step, args=args)
    except Exception as e:
      raise _unreadable(where, path, e) from None
  finally:
    reader.close()
  params = restored["state"]["params"]
  saved_prints = restored["data"].get("state_fingerprints")
  if saved_prints is not None:  # None: a checkpoint from before fingerprints.
    now = integrity.summarize({"params": params})[0]
    changed = [name for name, value in now.items() if saved_prints.get(name) != value]
    if changed:
      raise _unreadable(where, path, f"{changed[0]} fails its checksum")
  if all(sources[own] == targets[own] for own in sources):
    return step, params
  return step, _relayout(traverse_util.flatten_dict(params), sources, targets, wanted)


def _relayout(params: dict, sources: dict, targets: dict, wanted: dict) -> Any:
  """Source params (flat) in the target's layout: layers stacked or unstacked, on device."""
  parts: dict[Key, dict[int | None, tuple[Key, int | None]]] = {}
  for own, (target_key, target_stacked) in targets.items():
    if own in sources:
      parts.setdefault(target_key, {})[target_stacked] = sources[own]

  def build(params):
    take = lambda key, stacked: params[key] if stacked is None else params[key][stacked]
    out = {}
    for target_key, pieces in parts.items():
      if None in pieces:
        out[target_key] = take(*pieces[None])
      else:
        out[target_key] = jnp.stack([take(*pieces[i]) for i in range(len(pieces))])
    return out

  shardings = {key: wanted[key].sharding for key in parts}
  placed = jax.jit(build, out_shardings=shardings)(params)
  return traverse_util.unflatten_dict(placed)


def _describe(layout: tuple[tuple[int, ...], str]) -> str:
  shape, dtype = layout
  return f"{dtype}{list(shape)}"


def _unreadable(where: str, path: str | Path, why: Any) -> UserError:
  why = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0][:200]}"
  return UserError(
    f"the newest checkpoint of {where} cannot be read ({why}); `fulcrum eval --workdir "
    f"{path}` moves a corrupt one aside, or pass another workdir"
  )
