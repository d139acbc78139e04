"""A Hugging Face tokenizer.json behind Fulcrum's tokenizer interface (`tokenizer.Tokenizer`).

Read with the `tokenizers` package (no transformers, nothing downloaded). What `encode` adds:
whatever the file's own post-processor adds (e.g. Llama's `<s>` BOS from its
TemplateProcessing; GPT-2 style byte-level BPEs add nothing), and EOS only when asked
(`add_eos`); nothing else. `decode` drops every special token (EOS included).

The EOS id is the `eos_token` of a tokenizer_config.json beside tokenizer.json when there is
one, else the first of `EOS_NAMES` that the vocabulary has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from fulcrum.platform.errors import UserError

PREFIX = "hf:"  # `data.tokenizer` = PREFIX + the path of a tokenizer.json or its folder.
FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"  # transformers' companion file; we read its eos_token.
# End-of-text tokens of common families, tried in this order when no config names one.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _utf8_ends(text: str) -> np.ndarray:
  """[len(text) + 1] int64: the UTF-8 byte offset at which each character starts (and the end)."""
  points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), np.uint32)
  sizes = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
  return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


class HFTokenizer:
  """A `tokenizers.Tokenizer` with Fulcrum's interface; made by `load`.

  Attributes:
    spec: the `data.tokenizer` value it was loaded from.
    path: the tokenizer.json file (absolute).
    vocab_size: one more than the largest id (added tokens included).
    EOS_ID: the end-of-text id.
    eos_token: its text.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str, path: Path, spec: str):
    self._tokenizer = tokenizer
    self.spec = spec
    self.path = path
    self.eos_token = eos_token
    self.EOS_ID = int(tokenizer.token_to_id(eos_token))
    self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def __reduce__(self):
    # grain worker processes get the tokenizer by pickle: they read the file again.
    return (load, (str(self.path), self.spec))

  def __repr__(self) -> str:
    return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"

  def _encoding(self, text: str | bytes) -> tuple[str, tokenizers.Encoding]:
    if not isinstance(text, str):
      text = bytes(text).decode("utf-8", errors="replace")
    return text, self._tokenizer.encode(text)

  @staticmethod
  def _with_eos(ids: list[int], eos: int | None) -> np.ndarray:
    return np.asarray(ids + ([eos] if eos is not None else []), np.int32)

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """The int32 ids of `text` (bytes are read as UTF-8), optionally followed by EOS."""
    _, enc = self._encoding(text)
    return self._with_eos(enc.ids, self.EOS_ID if add_eos else None)

  def decode(self, ids: Any) -> str:
    """The text of `ids`, special tokens (EOS included) dropped; an id outside the vocabulary
    (from a model with a larger one) becomes U+FFFD, so sampled tokens always decode."""
    arr = np.asarray(ids).astype(np.int64).reshape(-1)
    bad = (arr < 0) | (arr >= self.vocab_size)
    parts, start = [], 0
    for i in [*np.flatnonzero(bad), len(arr)]:
      parts.append(self._tokenizer.decode(arr[start:i].tolist(), skip_special_tokens=True))
      start = i + 1
    return "\ufffd".join(parts)

  def _spans(self, text: str | bytes) -> tuple[str, tokenizers.Encoding, np.ndarray]:
    """The text, its encoding and [n + 1] character positions: token i stands for
    text[bounds[i]:bounds[i + 1]]. A token's span runs from the furthest end of the tokens
    before it to its own end, so spans never overlap and join to the text: a character split
    over several byte-level tokens goes to the first, tokens a post-processor adds (BOS) and
    spaces an offset trims go to a neighbour, text after the last token to the last."""
    text, enc = self._encoding(text)
    ends = np.asarray([end for _, end in enc.offsets], np.int64).reshape(-1)
    bounds = np.concatenate([[0], np.maximum.accumulate(ends)]) if len(ends) else np.zeros(1)
    bounds = np.minimum(bounds, len(text)).astype(np.int64)
    bounds[-1] = len(text)
    return text, enc, bounds

  def byte_counts(
    self, text: str | bytes, *, add_eos: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `encode(text, add_eos=add_eos)` and, per id, the UTF-8 bytes of `text` it
    stands for (int32, EOS one byte); they sum to len(text in UTF-8) (+ 1 with EOS)."""
    text, enc, bounds = self._spans(text)
    counts = np.diff(_utf8_ends(text)[bounds]).astype(np.int32)
    eos = self.EOS_ID if add_eos else None
    if add_eos:
      counts = np.append(counts, np.int32(1))
    return self._with_eos(enc.ids, eos), counts

  def pieces(self, text: str) -> list[str]:
    """The text each token of `encode(text)` stands for ("" for a token that stands for none,
    e.g. the second byte-level token of one character); the pieces join to `text`."""
    text, _, bounds = self._spans(text)
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

  def save(self, folder: str | Path) -> None:
    """Writes tokenizer.json and a tokenizer_config.json naming `eos_token` into `folder`."""
    folder = Path(folder)
    self._tokenizer.save(str(folder / FILE), pretty=False)
    config = {"eos_token": self.eos_token, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _file(path: str | Path) -> Path:
  """The tokenizer.json that `path` (a folder holding it, or the file) names."""
  path = Path(path).expanduser()
  hint = "set data.tokenizer=hf:FOLDER (a folder with tokenizer.json) or data.tokenizer=bytes"
  if not path.exists():
    raise UserError(f"tokenizer {path} does not exist (relative to {Path.cwd()}); {hint}")
  if path.is_file():
    return path.resolve()
  if (path / FILE).is_file():
    return (path / FILE).resolve()
  if (path / "tokenizer.model").is_file():
    raise UserError(
      f"{path} has a SentencePiece tokenizer.model but no {FILE}; convert it once with "
      "transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
    )
  raise UserError(f"no {FILE} in {path}; {hint}")


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is not readable JSON ({e}); re-download or fix it") from None


def _eos_token(tok: tokenizers.Tokenizer, file: Path) -> str:
  """The EOS token's text: tokenizer_config.json's `eos_token`, else a known name."""
  config_file = file.parent / CONFIG_FILE
  if config_file.is_file():
    eos = _read_json(config_file)
    eos = eos.get("eos_token") if isinstance(eos, dict) else None
    if isinstance(eos, dict):  # {"content": "</s>", "lstrip": false, ...}
      eos = eos.get("content")
    if isinstance(eos, str) and eos:
      if tok.token_to_id(eos) is None:
        raise UserError(
          f"{config_file} names eos_token {eos!r}, which {file} does not have; fix eos_token"
        )
      return eos
  for name in EOS_NAMES:
    if tok.token_to_id(name) is not None:
      return name
  raise UserError(
    f"{file} has no end-of-text token ({', '.join(EOS_NAMES)}); name it as eos_token in a "
    f"{CONFIG_FILE} beside it"
  )


def load(path: str | Path, spec: str | None = None) -> HFTokenizer:
  """Reads a Hugging Face tokenizer (see the module docstring for EOS and special tokens).

  Args:
    path: a folder holding tokenizer.json (and optionally tokenizer_config.json), or the file.
    spec: the `data.tokenizer` value to report it as; default `hf:PATH`.

  Returns:
    The tokenizer.

  Raises:
    UserError: a missing path or file, a file `tokenizers` cannot read, no EOS token.
  """
  file = _file(path)
  try:
    tok = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception for bad JSON and bad layouts.
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"{file} is not a tokenizers JSON file ({detail}); re-download it or write it with "
      "tokenizers' Tokenizer.save"
    ) from None
  return HFTokenizer(tok, _eos_token(tok, file), file, spec or f"{PREFIX}{path}")
