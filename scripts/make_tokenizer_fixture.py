"""Trains the tiny BPE tokenizer that the tokenizer tests load (`tests/fixtures/tokenizer/`).

Run from the repository root with Fulcrum's environment (it needs only `tokenizers`, a Fulcrum
dependency), offline:

  .venv/bin/python scripts/make_tokenizer_fixture.py [--vocab-size 512] [--out DIR]

It trains a byte-level BPE (GPT-2 style: every byte is a base token, so any text encodes; the
ByteLevel pre-tokenizer splits words with GPT-2's pattern and no prefix space; the ByteLevel
decoder inverts it exactly) with one special token, `<|endoftext|>` (id 0: the EOS that
`fulcrum.platform.data.tokenizer.get_tokenizer` finds by name). No post-processor adds tokens,
so encoding adds no BOS. The training text is a few files of the Python standard library,
read in sorted order; the BPE trainer is deterministic, so a rerun on the same Python version
writes the same bytes. The committed file was made from Python 3.11's stdlib with tokenizers
0.23.3 (about 9 KB).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# Stdlib sources the BPE is trained on: code and prose, small enough to train in a second.
SOURCES = ("json/*.py", "textwrap.py", "string.py", "argparse.py", "dataclasses.py")


def training_files() -> list[str]:
  """The stdlib files to train on, sorted so the order (and the result) is fixed."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  return sorted(str(p) for pattern in SOURCES for p in stdlib.glob(pattern))


def train(vocab_size: int) -> Tokenizer:
  """A byte-level BPE with `vocab_size` entries (256 bytes, EOS and the merges)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train(training_files(), trainer)
  return tok


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab-size", type=int, default=512)
  p.add_argument("--out", default="tests/fixtures/tokenizer")
  args = p.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tok = train(args.vocab_size)
  tok.save(str(out / "tokenizer.json"), pretty=False)
  size = (out / "tokenizer.json").stat().st_size
  print(f"wrote {out / 'tokenizer.json'}: {tok.get_vocab_size()} tokens, {size} bytes")


if __name__ == "__main__":
  main()
