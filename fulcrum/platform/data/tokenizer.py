"""Tokenizers: bytes (the default, nothing to download or train) or a Hugging Face tokenizer.json.

`data.tokenizer` names the run's tokenizer and `get_tokenizer(spec)` returns it:

  bytes       `ByteTokenizer`: one token per UTF-8 byte, EOS = the NUL byte (256 ids).
  hf:PATH     `hf_tokenizer.HFTokenizer`: a folder holding tokenizer.json (or that file
              itself) read with the `tokenizers` package; relative paths start at the current
              directory.

Both have one interface (`Tokenizer`): `spec`, `vocab_size`, `EOS_ID`, `encode`, `decode`,
`byte_counts` (the UTF-8 bytes of the text each token stands for: what bits per byte divide
by) and `pieces` (the text each token stands for: what reports show).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from fulcrum.platform.data import hf_tokenizer
from fulcrum.platform.errors import UserError

BYTES = "bytes"  # `data.tokenizer` of the byte-level tokenizer (the default).
HF_PREFIX = hf_tokenizer.PREFIX


class Tokenizer(Protocol):
  """What every tokenizer provides (see `ByteTokenizer` for each member's contract)."""

  spec: str
  vocab_size: int
  EOS_ID: int

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray: ...

  def decode(self, ids: Any) -> str: ...

  def byte_counts(
    self, text: str | bytes, *, add_eos: bool = False
  ) -> tuple[np.ndarray, np.ndarray]: ...

  def pieces(self, text: str) -> list[str]: ...


class ByteTokenizer:
  """Maps text to its UTF-8 bytes and back.

  Token id == byte value, so the vocabulary has 256 entries. Id `EOS_ID` (the NUL byte, which
  text files practically never contain) marks the end of a document when documents are packed
  into one token stream.
  """

  spec: str = BYTES
  vocab_size: int = 256
  EOS_ID: int = 0

  def encode(self, text: str | bytes, *, add_eos: bool = False) -> np.ndarray:
    """Returns the int32 token ids of `text` (its UTF-8 bytes), optionally followed by EOS.

    Args:
      text: a `str` (encoded as UTF-8) or raw `bytes` (used as they are).
      add_eos: append `EOS_ID` after the text.

    Returns:
      A 1-D int32 array.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    if add_eos:
      ids = np.append(ids, np.int32(self.EOS_ID))
    return ids

  def decode(self, ids: Any) -> str:
    """Returns the text for token ids, dropping EOS ids.

    Invalid UTF-8 (a sequence cut mid-character, or ids >= 256 from a model with a larger
    vocabulary) becomes U+FFFD instead of raising, so sampled tokens always decode.

    Args:
      ids: a 1-D sequence of ints (list, NumPy or JAX array).

    Returns:
      The decoded string.
    """
    arr = np.asarray(ids).astype(np.int64).reshape(-1)
    arr = arr[arr != self.EOS_ID]
    # 0xFF never occurs in UTF-8, so out-of-range ids decode as the replacement character.
    arr = np.where((arr < 0) | (arr >= self.vocab_size), 0xFF, arr)
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def byte_counts(
    self, text: str | bytes, *, add_eos: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `encode(text, add_eos=add_eos)` and, per id, the bytes of `text` it stands
    for (int32; EOS counts one byte): all ones here."""
    ids = self.encode(text, add_eos=add_eos)
    return ids, np.ones_like(ids)

  def pieces(self, text: str) -> list[str]:
    """The text each token of `encode(text)` stands for: a character on its first byte and ""
    on its continuation bytes, so the pieces join to `text`."""
    out: list[str] = []
    for char in text:
      out += [char] + [""] * (len(char.encode("utf-8", errors="surrogatepass")) - 1)
    return out


def check_spec(spec: str) -> None:
  """Raises ValueError (naming the fix) unless `spec` is a `data.tokenizer` value; does not
  read the file (`get_tokenizer` does)."""
  if spec == BYTES:
    return
  if not spec.startswith(HF_PREFIX):
    raise ValueError(
      f"data.tokenizer={spec!r} is not a tokenizer; use {BYTES} or {HF_PREFIX}PATH (a folder "
      "with tokenizer.json, or the tokenizer.json file)"
    )
  if not spec[len(HF_PREFIX) :].strip():
    raise ValueError(
      f"data.tokenizer={spec!r} names no path; use {HF_PREFIX}FOLDER (with tokenizer.json) or "
      f"{HF_PREFIX}FILE.json"
    )


@functools.cache
def get_tokenizer(spec: str = BYTES) -> Tokenizer:
  """The tokenizer a `data.tokenizer` value names (cached: one object per spec).

  Args:
    spec: `bytes`, or `hf:PATH` with PATH a folder holding tokenizer.json or the file itself.
      See `hf_tokenizer.load` for the EOS an HF tokenizer uses and what `encode` adds.

  Returns:
    A `ByteTokenizer` or an `hf_tokenizer.HFTokenizer`.

  Raises:
    UserError: a bad spec, a missing or unreadable tokenizer file, or no EOS token.
  """
  try:
    check_spec(spec)
  except ValueError as e:
    raise UserError(str(e)) from None
  if spec == BYTES:
    return ByteTokenizer()
  return hf_tokenizer.load(spec[len(HF_PREFIX) :].strip(), spec=spec)


def stop_ids(tokenizer: Tokenizer, chars: str) -> tuple[int, ...]:
  """The ids after which a generated row ends "at any of `chars`".

  Bytes: the characters' UTF-8 bytes (as ever). Otherwise every id whose own text holds one of
  them (a BPE seldom emits "\\n" alone: "):\\n" or "\\n\\n    " are tokens too), found by
  decoding each id once.
  """
  if not chars:
    return ()
  if isinstance(tokenizer, ByteTokenizer):
    return tuple(int(i) for i in tokenizer.encode(chars))
  return tuple(
    i
    for i in range(tokenizer.vocab_size)
    if i != tokenizer.EOS_ID and any(c in tokenizer.decode([i]) for c in chars)
  )


def check_vocab(tokenizer: Tokenizer, vocab_size: int, key: str = "model.vocab_size") -> None:
  """Raises UserError unless a model with `vocab_size` logits has an embedding for every id of
  `tokenizer` (a larger model vocabulary is fine: the extra ids are never produced by data).

  Args:
    tokenizer: the run's tokenizer.
    vocab_size: the model's vocabulary size.
    key: the config key (or description) of `vocab_size`, for the message.
  """
  if vocab_size < tokenizer.vocab_size:
    raise UserError(
      f"{key}={vocab_size} is smaller than the {tokenizer.vocab_size} tokens of tokenizer "
      f"{tokenizer.spec} (a tokenizer whose vocabulary does not match the model or checkpoint: "
      f"larger ids would have no embedding); set {key}={tokenizer.vocab_size} or more, or use "
      "the model's own tokenizer"
    )
