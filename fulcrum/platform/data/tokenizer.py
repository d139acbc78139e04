"""Byte-level tokenizer: one token per UTF-8 byte, nothing to download or train."""

from __future__ import annotations

from typing import Any

import numpy as np


class ByteTokenizer:
  """Maps text to its UTF-8 bytes and back.

  Token id == byte value, so the vocabulary has 256 entries. Id `EOS_ID` (the NUL byte, which
  text files practically never contain) marks the end of a document when documents are packed
  into one token stream.
  """

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
