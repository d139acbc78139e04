"""Recipe configs: the shared base config, `--set key=value` overrides and validation.

A recipe is a `get_config()` returning an `ml_collections.ConfigDict` built on `base_config()`.
Configs are locked: an unknown key is an error, never silently ignored, and an override's value
is parsed to the type of the key's default.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from typing import Any

import ml_collections

from fulcrum.modules.quant import MODES as QUANT_MODES
from fulcrum.platform.errors import UserError

ARCHS = ("transformer", "mamba", "griffin", "hawk", "dlinear", "nlinear")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """Every key a training recipe understands, each with its default."""
  c = ml_collections.ConfigDict()
  c.task = "lm"  # What is trained: lm (see fulcrum/platform/tasks.py for the others).

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Total optimizer steps; rerunning a finished run does nothing.
  c.train.batch_size = 16  # Global batch size in sequences (per optimizer step).
  c.train.seq_len = 256  # Tokens per training sequence.
  c.train.seed = 0  # Seeds parameters, data order and dropout-free rng streams.
  c.train.log_every = 10  # Steps between metrics.jsonl rows.
  c.train.eval_every = 200  # Steps between evaluations (0: only at the end).
  c.train.eval_batches = 8  # Validation batches per evaluation.
  c.train.checkpoint_every = 200  # Steps between checkpoints (a final one is always saved).
  c.train.keep_checkpoints = 3  # How many recent checkpoints to keep.
  c.train.max_nan_steps = 10  # Stop after this many consecutive non-finite updates.
  c.train.grad_accum_steps = 1  # Micro-batches per step; batch_size must divide by it.
  c.train.progress = True  # Show a progress bar (loss, tokens/s).
  c.train.async_checkpointing = True  # Save checkpoints in a background thread.

  c.model = ml_collections.ConfigDict()
  c.model.arch = "transformer"  # transformer | mamba | griffin | hawk.
  c.model.d_model = 256  # Residual stream width.
  c.model.num_layers = 4  # Number of blocks.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 0  # Key/value heads: 0 = num_heads (MHA), 1 = MQA, else GQA.
  c.model.head_dim = 0  # Per-head width; 0 = d_model // num_heads.
  c.model.mlp_dim = 0  # SwiGLU hidden width; 0 = 8/3 d_model rounded up to a multiple of 64.
  c.model.vocab_size = 256  # Byte-level default.
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (parameters stay float32).
  c.model.window = 0  # Sliding-window attention size; 0 = full causal attention.
  c.model.rope_theta = 10000.0  # RoPE base frequency.
  c.model.rope_fraction = 1.0  # Leading fraction of each head's dims RoPE rotates (RG: 0.5).
  c.model.attn_out_bias = False  # Bias on the attention output projection (RecurrentGemma).
  c.model.norm_eps = 1e-6  # RMSNorm epsilon.
  c.model.tie_embeddings = True  # Share the input embedding with the output projection.
  c.model.scan_layers = False  # Stack identical blocks with nn.scan (faster compiles).
  c.model.remat = False  # Rematerialise blocks in the backward pass (saves memory).
  c.model.attention_impl = "auto"  # auto | xla | cudnn | reference.
  c.model.quant = "none"  # Quantized training (qwix): none | int8 | int8_weight | fp8.
  c.model.scale_embeddings = False  # Multiply embeddings by sqrt(d_model) (Gemma convention).
  c.model.embed_scale_bf16 = False  # Round that sqrt(d_model) to bfloat16 (RecurrentGemma).
  c.model.logits_soft_cap = 0.0  # cap·tanh(logits/cap); 0 = off (RecurrentGemma: 30).
  c.model.ssm_state = 16  # Mamba: SSM state size N per channel.
  c.model.ssm_expand = 2  # Mamba: expansion E (the mixer works on E·d_model channels).
  c.model.conv_width = 4  # Mamba, Griffin, Hawk: causal depthwise conv width.
  c.model.dt_rank = 0  # Mamba: rank of the dt projection; 0 = ceil(d_model / 16).
  c.model.selective = True  # Mamba: False = LTI ablation (dt, B, C input-independent).
  c.model.scan_impl = "auto"  # auto | reference | associative | chunked | pallas.
  c.model.lru_width = 0  # Griffin, Hawk: RG-LRU width; 0 = d_model.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | galore | adam8bit | galore8bit.
  c.optimizer.learning_rate = 3e-3  # Peak learning rate.
  c.optimizer.warmup_steps = 100  # Linear warmup steps.
  c.optimizer.min_lr_ratio = 0.1  # Cosine decays to learning_rate * min_lr_ratio.
  c.optimizer.weight_decay = 0.1  # Decoupled weight decay (matrices only).
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
  c.optimizer.galore = ml_collections.ConfigDict()  # optimizer.name = galore | galore8bit.
  c.optimizer.galore.rank = 128  # Projection rank r (capped at min(m, n) per matrix).
  c.optimizer.galore.update_proj_gap = 200  # Steps T between projector refreshes (SVD).
  c.optimizer.galore.scale = 0.25  # α on the projected-back updates.
  c.optimizer.galore.side = "auto"  # auto (smaller dimension) | left | right.
  c.optimizer.quant = ml_collections.ConfigDict()  # optimizer.name = adam8bit | galore8bit.
  c.optimizer.quant.block_size = 256  # Elements per absmax block of the 8-bit moments.
  c.optimizer.quant.min_size = 4096  # Smaller state leaves stay float32.

  c.data = ml_collections.ConfigDict()
  c.data.tfds_name = ""  # A registered TFDS dataset (e.g. "lm1b"); "" = the built-in corpus.
  c.data.text_files = ""  # Glob of the user's text files; "" = Python stdlib sources.
  c.data.text_key = "text"  # Feature holding the text in a tfds_name dataset.
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.data_dir = ""  # Where TFDS data is prepared; "" = $FULCRUM_DATA_DIR or ~/.cache.
  c.data.num_workers = 0  # grain worker processes (0 = in the main process).

  c.decode = ml_collections.ConfigDict()  # Defaults of `fulcrum decode` / `fulcrum calibrate`.
  c.decode.strategy = "greedy"  # greedy | sample | lookahead | speculative | cascade.
  c.decode.temperature = 0.8  # `--strategy sample` temperature (the others are greedy).
  c.decode.top_k = 0  # Sample from the k most likely tokens only; 0 = all.
  c.decode.top_p = 1.0  # Nucleus sampling mass; 1 = off.
  c.decode.gamma = 4  # Speculative / cascade: draft tokens per target call.
  c.decode.lookahead_window = 7  # Lookahead W: Jacobi window (tokens guessed ahead).
  c.decode.lookahead_ngram = 5  # Lookahead N: n-gram size (verified continuations are N - 1).
  c.decode.lookahead_candidates = 7  # Lookahead G: pool n-grams verified per step.
  c.decode.cascade_rule = "opt"  # Speculative Cascades deferral rule: chow | diff | opt.
  c.decode.cascade_alpha = 0.1  # Its threshold α.
  c.decode.kv_cache = "none"  # none | kvquant | int-token | int-channel (`fulcrum calibrate`).
  c.decode.kv_bits = 3  # Bits per cached key/value entry (2, 3 or 4).
  c.decode.kv_outlier_fraction = 0.01  # KVQuant dense-and-sparse outliers per vector.
  c.decode.calibration_batches = 16  # Training batches `fulcrum calibrate` fits on.
  c.decode.max_len = 4096  # Context limit: prompt + new tokens that decode accepts.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis size; -1 = every device not used by fsdp/tensor.
  c.mesh.fsdp = 1  # Fully-sharded data-parallel axis size.
  c.mesh.tensor = 1  # Tensor-parallel axis size.
  return c


def byte_lm_config(
  *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, learning_rate: float
) -> ml_collections.ConfigDict:
  """The base of the small byte-level LMs that train in CPU minutes (demo, lm_draft,
  decode_kvquant): 600 steps of batch 16 × 128 bytes on the default corpus."""
  c = base_config()
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.eval_batches = 8
  c.model.d_model = d_model
  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.num_kv_heads = num_kv_heads
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 50
  return c


def synthetic_config(
  generator: str, *, length: int, vocab: int, seq_len: int, model_vocab: int
) -> ml_collections.ConfigDict:
  """The base config shared by the synthetic-sequence recipes (small model, no weight decay).

  Recipes add their generator's own `data.*` sizes and change what differs.
  """
  c = base_config()
  c.task = "synthetic"
  c.data.generator = generator
  c.data.length = length
  c.data.vocab = vocab
  c.data.eval_length_multiples = (1,)
  c.train.seq_len = seq_len
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.train.eval_batches = 8
  c.model.vocab_size = model_vocab
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  return c


def _parse(text: str, default: Any, key: str) -> Any:
  """Parses an override string to the type of the key's default."""
  expected = type(default)
  try:
    if isinstance(default, bool):
      low = text.strip().lower()
      if low in ("true", "1", "yes", "on"):
        return True
      if low in ("false", "0", "no", "off"):
        return False
      raise ValueError
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return expected(value)
  except (ValueError, SyntaxError):
    raise UserError(
      f"--set {key}={text!r}: expected a {expected.__name__} like {default!r}"
    ) from None
  raise UserError(f"--set {key}: keys of type {expected.__name__} cannot be overridden")


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(
        f"unknown config key {key!r}: no section {'.'.join(parents[: i + 1])!r}; "
        f"sections are {', '.join(sorted(config.keys()))}"
      )
    node = node[part]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    known = ", ".join(sorted(k for k in node if not isinstance(node[k], ml_collections.ConfigDict)))
    raise UserError(f"unknown config key {key!r}; known keys there: {known}")
  return node, leaf


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `key=value` strings in place, parsing each value to its default's type."""
  for item in overrides:
    if "=" not in item:
      raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, text = item.split("=", 1)
    key = key.strip()
    node, leaf = _lookup(config, key)
    with node.unlocked():
      node[leaf] = _parse(text, node[leaf], key)


DECODE_STRATEGIES = ("greedy", "sample", "lookahead", "speculative", "cascade")
KV_CACHES = ("none", "kvquant", "int-token", "int-channel")
CASCADE_RULES = ("chow", "diff", "opt")


def validate_decode(d: ml_collections.ConfigDict) -> None:
  """Checks the `decode.*` section; raises `UserError` naming the fix."""
  checks = [
    (d.strategy in DECODE_STRATEGIES, f"decode.strategy={d.strategy!r} is unknown; choose one "
     f"of {', '.join(DECODE_STRATEGIES)}"),
    (d.kv_cache in KV_CACHES, f"decode.kv_cache={d.kv_cache!r} is unknown; choose one of "
     f"{', '.join(KV_CACHES)}"),
    (d.cascade_rule in CASCADE_RULES, f"decode.cascade_rule={d.cascade_rule!r} is unknown; "
     f"choose one of {', '.join(CASCADE_RULES)}"),
    (d.kv_bits in (2, 3, 4), f"decode.kv_bits must be 2, 3 or 4, got {d.kv_bits}"),
    (0 <= d.kv_outlier_fraction < 0.5, "decode.kv_outlier_fraction must be in [0, 0.5), got "
     f"{d.kv_outlier_fraction}"),
    (d.temperature >= 0, f"decode.temperature must be >= 0, got {d.temperature}"),
    (d.top_k >= 0, f"decode.top_k must be >= 0 (0 = off), got {d.top_k}"),
    (0 < d.top_p <= 1, f"decode.top_p must be in (0, 1], got {d.top_p}"),
    (d.gamma >= 1, f"decode.gamma must be >= 1, got {d.gamma}"),
    (d.lookahead_window >= 1, f"decode.lookahead_window must be >= 1, got {d.lookahead_window}"),
    (d.lookahead_ngram >= 2, f"decode.lookahead_ngram must be >= 2, got {d.lookahead_ngram}"),
    (d.lookahead_candidates >= 0, "decode.lookahead_candidates must be >= 0, got "
     f"{d.lookahead_candidates}"),
    (d.max_len >= 2, f"decode.max_len must be >= 2, got {d.max_len}"),
    (d.calibration_batches >= 1, "decode.calibration_batches must be >= 1, got "
     f"{d.calibration_batches}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise UserError(msg)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that a type alone cannot; raises `UserError` naming the fix."""
  t, m, o = config.train, config.model, config.optimizer

  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise UserError(msg)

  for key in (
    "steps",
    "batch_size",
    "seq_len",
    "log_every",
    "keep_checkpoints",
    "max_nan_steps",
    "grad_accum_steps",
    "checkpoint_every",
  ):
    need(t[key] > 0, f"train.{key} must be positive, got {t[key]}")
  need(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
  need(t.eval_batches > 0, f"train.eval_batches must be positive, got {t.eval_batches}")
  need(
    t.batch_size % t.grad_accum_steps == 0,
    f"train.batch_size={t.batch_size} must divide by train.grad_accum_steps={t.grad_accum_steps}",
  )
  need(m.arch in ARCHS, f"model.arch={m.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
  validate_decode(config.decode)
  need(m.dtype in DTYPES, f"model.dtype={m.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
  for key in ("d_model", "num_layers", "num_heads", "vocab_size"):
    need(m[key] > 0, f"model.{key} must be positive, got {m[key]}")
  kv = m.num_kv_heads or m.num_heads
  need(
    m.num_heads % kv == 0, f"model.num_heads={m.num_heads} must divide by model.num_kv_heads={kv}"
  )
  need(
    m.head_dim > 0 or m.d_model % m.num_heads == 0,
    f"model.d_model={m.d_model} must divide by model.num_heads={m.num_heads} "
    "(or set model.head_dim)",
  )
  need(m.window >= 0, f"model.window must be >= 0, got {m.window}")
  need(0 < m.rope_fraction <= 1, f"model.rope_fraction must be in (0, 1], got {m.rope_fraction}")
  head_dim = m.head_dim or m.d_model // m.num_heads
  rotary = int(head_dim * m.rope_fraction)
  need(
    m.rope_fraction == 1
    or m.arch not in ("transformer", "griffin")
    or (rotary and rotary % 2 == 0),
    f"model.rope_fraction={m.rope_fraction} rotates {rotary} of each head's {head_dim} dims; "
    "RoPE needs a positive even number (change model.rope_fraction or model.head_dim)",
  )
  need(
    m.arch != "griffin" or not m.scan_layers or m.num_layers % 3 == 0,
    f"model.scan_layers stacks griffin in groups of 3 layers; model.num_layers="
    f"{m.num_layers} is not a multiple of 3 (change it or set model.scan_layers=false)",
  )
  need(
    m.attention_impl in ("auto", "xla", "cudnn", "reference"),
    f"model.attention_impl={m.attention_impl!r}: choose auto, xla, cudnn or reference",
  )
  optimizers = ("adamw", "galore", "adam8bit", "galore8bit")
  need(
    o.name in optimizers,
    f"optimizer.name={o.name!r} is unknown; choose one of {', '.join(optimizers)}",
  )
  if "galore" in o:
    g = o.galore
    need(g.rank >= 1, f"optimizer.galore.rank must be >= 1, got {g.rank}")
    need(
      g.update_proj_gap >= 1,
      f"optimizer.galore.update_proj_gap must be >= 1, got {g.update_proj_gap}",
    )
    need(
      g.side in ("auto", "left", "right"),
      f"optimizer.galore.side={g.side!r}: choose auto, left or right",
    )
  if "quant" in o:
    need(
      o.quant.block_size >= 2,
      f"optimizer.quant.block_size must be >= 2, got {o.quant.block_size}",
    )
  need(
    m.get("quant", "none") in QUANT_MODES,
    f"model.quant={m.get('quant')!r} is unknown; choose one of {', '.join(QUANT_MODES)}",
  )
  need(o.learning_rate > 0, f"optimizer.learning_rate must be positive, got {o.learning_rate}")
  if "mesh" in config:
    for key in ("fsdp", "tensor"):
      need(config.mesh[key] >= 1, f"mesh.{key} must be >= 1, got {config.mesh[key]}")
    need(
      config.mesh.data == -1 or config.mesh.data >= 1,
      f"mesh.data must be -1 (auto) or >= 1, got {config.mesh.data}",
    )


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as indented JSON (what `DIR/config.json` holds)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from `to_json` output, filling keys added since with defaults."""
  stored = json.loads(text)
  config = base_config()
  with config.unlocked():
    for section, values in stored.items():
      if isinstance(values, dict):
        if section not in config:
          config[section] = ml_collections.ConfigDict()
        for key, value in values.items():
          config[section][key] = value
      else:
        config[section] = values
  config.lock()
  return config
