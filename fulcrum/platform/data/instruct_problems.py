"""Instruction problems whose answers a program checks: generators, solvers and checkers.

Every family owns three functions: `make(rng) -> instruction`, `solve(instruction) -> gold`
(recomputes the answer from the instruction text alone) and `canonical(instruction, answer)`
(the answer in the gold's spelling). `generate` stores `solve`'s answer as the response;
`check` never reads the stored response: it re-solves the instruction and compares the
canonical answer with it. Answers accepted besides the gold's exact text:

  every family    surrounding whitespace
  sort, reverse   any run of whitespace between items ("1  2 3" == "1 2 3")
  base            a "0b" / "0x" prefix and upper-case hex digits ("0XFF" == "ff"); no
                  leading zeros (those change the number's spelling, not its value, but a
                  model that writes them has not learned the format)

Numbers are canonical decimals: "521" is right, "0521" and "+521" are wrong.

Two families read snippets of the Python standard library's own sources (the files
`text_corpus.stdlib_files` lists): `funcname` shows a few lines holding exactly one `def`,
`firstimport` a few lines whose first import statement names the answer. Snippets are
dedented, printable ASCII and at most `Difficulty.snippet_bytes` long.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import textwrap
from collections.abc import Callable

import numpy as np

from fulcrum.platform.data import text_corpus


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """The generators' knobs (ranges are inclusive).

  The defaults aim at a middling exact match for a ~1M-parameter byte-level model. The
  generated data's TFDS config name hashes these values, so changing one regenerates the data.
  """

  add_digits: tuple[int, int] = (2, 4)  # Digits of each addend.
  mul_digits: tuple[tuple[int, int], tuple[int, int]] = ((2, 3), (1, 2))  # Of each factor.
  list_len: tuple[int, int] = (3, 6)  # Items in a `sort` or `reverse` list,
  list_max: int = 99  # each 0..list_max.
  word_len: tuple[int, int] = (3, 8)  # Letters in a `reverse` word.
  count_len: tuple[int, int] = (5, 12)  # Letters in a `count` string,
  count_alphabet: str = "abcdef"  # drawn from this alphabet (small: counts are rarely 0).
  binary_max: int = 4095  # `base` converts 2..binary_max to binary (<= 12 answer bytes)
  hex_max: int = 65535  # and 16..hex_max to hex.
  snippet_bytes: int = 76  # Longest stdlib snippet: every problem fits 128-token rows.
  snippet_context: tuple[int, int] = (3, 4)  # Most lines before / after the anchor line.


DIFFICULTY = Difficulty()
_LINE_BYTES = 72  # Longer source lines never enter a snippet.
_NAME_BYTES = 24  # Longest funcname / module answer.


@dataclasses.dataclass(frozen=True)
class Problem:
  """One instruction and its gold response.

  Attributes:
    family: the family id (one of `FAMILIES`).
    instruction: the task, e.g. "add 482 and 39".
    response: the gold answer text, e.g. "521".
  """

  family: str
  instruction: str
  response: str


def _between(rng: np.random.Generator, span: tuple[int, int]) -> int:
  """Uniform in the inclusive range `span`."""
  return int(rng.integers(span[0], span[1] + 1))


def _digits(rng: np.random.Generator, span: tuple[int, int]) -> int:
  """A number with a uniformly drawn count of digits in `span`, uniform among those."""
  d = _between(rng, span)
  return int(rng.integers(10 ** (d - 1), 10**d))


def _ints(instruction: str) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", instruction)]


def _spaced(instruction: str, answer: str) -> str:
  del instruction
  return " ".join(answer.split())


def _stripped(instruction: str, answer: str) -> str:
  del instruction
  return answer.strip()


# --- Arithmetic, lists, counting, bases --------------------------------------------------------


def _make_add(rng):
  span = DIFFICULTY.add_digits
  return f"add {_digits(rng, span)} and {_digits(rng, span)}"


def _solve_add(instruction):
  a, b = _ints(instruction)
  return str(a + b)


def _make_mul(rng):
  left, right = DIFFICULTY.mul_digits
  return f"multiply {_digits(rng, left)} by {_digits(rng, right)}"


def _solve_mul(instruction):
  a, b = _ints(instruction)
  return str(a * b)


def _int_list(rng) -> str:
  n = _between(rng, DIFFICULTY.list_len)
  return " ".join(map(str, rng.integers(0, DIFFICULTY.list_max + 1, size=n).tolist()))


def _make_sort(rng):
  return f"sort {_int_list(rng)}"


def _solve_sort(instruction):
  return " ".join(map(str, sorted(_ints(instruction))))


def _make_reverse(rng):
  if rng.integers(2):
    return f"reverse the list {_int_list(rng)}"
  n = _between(rng, DIFFICULTY.word_len)
  letters = rng.integers(ord("a"), ord("z") + 1, size=n).astype(np.uint8)
  return f"reverse the word {letters.tobytes().decode()}"


def _solve_reverse(instruction):
  kind, _, rest = instruction.removeprefix("reverse the ").partition(" ")
  if kind == "list":
    return " ".join(reversed(rest.split()))
  return rest[::-1]


def _make_count(rng):
  alphabet = DIFFICULTY.count_alphabet
  letters = np.frombuffer(alphabet.encode(), np.uint8)
  text = letters[rng.integers(0, len(letters), size=_between(rng, DIFFICULTY.count_len))]
  char = alphabet[int(rng.integers(len(alphabet)))]
  return f'count "{char}" in "{text.tobytes().decode()}"'


def _solve_count(instruction):
  char, text = re.fullmatch(r'count "(.)" in "(.*)"', instruction).groups()
  return str(text.count(char))


_BASES = {"binary": ("b", "0b"), "hex": ("x", "0x")}  # Name -> (format spec, prefix).


def _make_base(rng):
  if rng.integers(2):
    return f"convert {int(rng.integers(2, DIFFICULTY.binary_max + 1))} to binary"
  return f"convert {int(rng.integers(16, DIFFICULTY.hex_max + 1))} to hex"


def _solve_base(instruction):
  number, name = re.fullmatch(r"convert (\d+) to (\w+)", instruction).groups()
  return format(int(number), _BASES[name][0])


def _canonical_base(instruction, answer):
  prefix = _BASES[instruction.rpartition(" ")[2]][1]
  return answer.strip().lower().removeprefix(prefix)


# --- Questions over stdlib snippets ------------------------------------------------------------

_FUNCNAME_HEAD = "name the function:\n"
_FIRSTIMPORT_HEAD = "first imported module:\n"
_DEF = re.compile(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)", re.MULTILINE)
_DEF_WORD = re.compile(r"\bdef\b")
_IMPORT = re.compile(
  r"^\s*(?:import\s+([A-Za-z_][\w.]*)|from\s+([A-Za-z_][\w.]*)\s+import\b)", re.MULTILINE
)
_PRINTABLE = re.compile(r"[ -~]*")  # Printable ASCII, no tabs.


@dataclasses.dataclass(frozen=True)
class _Anchor:
  """A line a snippet is built around, with the lines allowed before and after it."""

  line: str
  before: tuple[str, ...]  # Nearest first.
  after: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SnippetPool:
  """Anchors for the snippet families, read from the stdlib sources.

  Attributes:
    key: the stdlib file set's hash (`text_corpus.FileSet.key`): the pool is a function of it.
    defs: lines holding one `def`, with neighbours that hold none.
    imports: import lines, with neighbours before them that import nothing.
  """

  key: str
  defs: tuple[_Anchor, ...]
  imports: tuple[_Anchor, ...]


def _neighbours(lines, usable, start, step, stop_at) -> tuple[str, ...]:
  """Up to the context's lines from `start` going by `step`, ending at an unusable line."""
  limit = DIFFICULTY.snippet_context[0] if step < 0 else DIFFICULTY.snippet_context[1]
  out, i = [], start
  while len(out) < limit and 0 <= i < len(lines) and usable[i] and not stop_at(lines[i]):
    out.append(lines[i])
    i += step
  return tuple(out)


def _file_anchors(text: str) -> tuple[list[_Anchor], list[_Anchor]]:
  """The def anchors and import anchors of one source file."""
  lines = [line.rstrip() for line in text.split("\n")]
  usable = [len(s) <= _LINE_BYTES and _PRINTABLE.fullmatch(s) is not None for s in lines]
  has_def = lambda s: _DEF_WORD.search(s) is not None
  has_import = lambda s: _IMPORT.match(s) is not None
  defs, imports = [], []
  for i, line in enumerate(lines):
    if not usable[i]:
      continue
    name = (m := _DEF.match(line)) and m.group(1)
    if name and len(name) <= _NAME_BYTES and len(_DEF_WORD.findall(line)) == 1:
      before = _neighbours(lines, usable, i - 1, -1, has_def)
      defs.append(_Anchor(line, before, _neighbours(lines, usable, i + 1, 1, has_def)))
    module = (m := _IMPORT.match(line)) and (m.group(1) or m.group(2))
    if module and len(module) <= _NAME_BYTES:
      # Nothing before the anchor imports: it is the snippet's first import.
      before = _neighbours(lines, usable, i - 1, -1, has_import)
      imports.append(_Anchor(line, before, _neighbours(lines, usable, i + 1, 1, lambda s: False)))
  return defs, imports


@functools.cache
def snippet_pool() -> SnippetPool:
  """The stdlib's anchors, read once per process (about a second)."""
  files = text_corpus.stdlib_files()
  defs, imports = [], []
  for rel in files.paths:
    try:
      with open(os.path.join(files.root, rel), encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):  # The stdlib's tests hold a few undecodable files.
      continue
    file_defs, file_imports = _file_anchors(text)
    defs += file_defs
    imports += file_imports
  return SnippetPool(files.key, tuple(defs), tuple(imports))


def _snippet(rng: np.random.Generator, anchor: _Anchor) -> str:
  """The anchor with a random number of its neighbours, dedented, within the snippet bytes."""
  n_before = int(rng.integers(len(anchor.before) + 1))
  n_after = int(rng.integers(len(anchor.after) + 1))
  while True:
    lines = [*reversed(anchor.before[:n_before]), anchor.line, *anchor.after[:n_after]]
    text = textwrap.dedent("\n".join(lines)).strip("\n")
    if len(text) <= DIFFICULTY.snippet_bytes or n_before + n_after == 0:
      return text
    if n_after >= n_before:
      n_after -= 1
    else:
      n_before -= 1


def _make_funcname(rng):
  defs = snippet_pool().defs
  return _FUNCNAME_HEAD + _snippet(rng, defs[int(rng.integers(len(defs)))])


def _solve_funcname(instruction):
  names = _DEF.findall(instruction.removeprefix(_FUNCNAME_HEAD))
  if len(names) != 1:
    raise ValueError(f"a funcname snippet must define exactly one function, found {names}")
  return names[0]


def _make_firstimport(rng):
  imports = snippet_pool().imports
  return _FIRSTIMPORT_HEAD + _snippet(rng, imports[int(rng.integers(len(imports)))])


def _solve_firstimport(instruction):
  m = _IMPORT.search(instruction.removeprefix(_FIRSTIMPORT_HEAD))
  if m is None:
    raise ValueError("a firstimport snippet must hold an import statement")
  return m.group(1) or m.group(2)


@dataclasses.dataclass(frozen=True)
class _Family:
  make: Callable[[np.random.Generator], str]
  solve: Callable[[str], str]
  canonical: Callable[[str, str], str]
  uses_stdlib: bool = False


_FAMILIES = {
  "add": _Family(_make_add, _solve_add, _stripped),
  "mul": _Family(_make_mul, _solve_mul, _stripped),
  "sort": _Family(_make_sort, _solve_sort, _spaced),
  "reverse": _Family(_make_reverse, _solve_reverse, _spaced),
  "count": _Family(_make_count, _solve_count, _stripped),
  "base": _Family(_make_base, _solve_base, _canonical_base),
  "funcname": _Family(_make_funcname, _solve_funcname, _stripped, uses_stdlib=True),
  "firstimport": _Family(_make_firstimport, _solve_firstimport, _stripped, uses_stdlib=True),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)  # Every family id, in a fixed order.
STDLIB_FAMILIES: tuple[str, ...] = tuple(k for k, f in _FAMILIES.items() if f.uses_stdlib)


def _family(family: str) -> _Family:
  if family not in _FAMILIES:
    raise ValueError(f"unknown instruct family {family!r}; choose one of {', '.join(FAMILIES)}")
  return _FAMILIES[family]


def generate(family: str, rng: np.random.Generator) -> Problem:
  """A random problem of `family`, its response solved from the instruction.

  Args:
    family: a family id (one of `FAMILIES`).
    rng: the random source; the same generator state gives the same problem.

  Returns:
    The problem.

  Raises:
    ValueError: an unknown family.
  """
  f = _family(family)
  instruction = f.make(rng)
  return Problem(family, instruction, f.solve(instruction))


def check(problem: Problem, answer: str) -> bool:
  """Whether `answer` solves `problem`, by the family's own rule (see the module docstring).

  The right answer is recomputed from `problem.instruction`; `problem.response` is not read.

  Args:
    problem: the problem.
    answer: a model's decoded answer (EOS already removed).

  Returns:
    True when the answer, canonicalised, equals the solved answer.
  """
  f = _family(problem.family)
  return f.canonical(problem.instruction, answer) == f.solve(problem.instruction)
