"""TFDS builder for the offline text corpora: Python's own stdlib sources, or the user's files.

One example per file: `{"text": file bytes, "path": path relative to the corpus root}`. Files
are split by a stable hash of their relative path (about 5% go to "validation"), so the split
never changes when other files are added. The prepared ArrayRecord files live under
`DATA_DIR/fulcrum_text_corpus/CONFIG/1.0.0/`, where CONFIG carries a short hash of the file
set (relative paths, sizes and mtimes): a different or edited file set never reuses stale data.

Everything here runs without TensorFlow: TFDS writes ArrayRecord through its TF-free path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import logging
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from fulcrum.platform.errors import UserError

VALIDATION_PERCENT = 5  # Share of files (by path hash) that go to the validation split.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


def default_data_dir() -> str:
  """`$FULCRUM_DATA_DIR`, else `~/.cache/fulcrum/tensorflow_datasets`."""
  env = os.environ.get("FULCRUM_DATA_DIR", "")
  return os.path.expanduser(env or os.path.join("~", ".cache", "fulcrum", "tensorflow_datasets"))


def resolve_data_dir(data_dir: str) -> str:
  """The absolute data dir for `data.data_dir` ("" means `default_data_dir()`)."""
  return os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))


@dataclasses.dataclass(frozen=True)
class FileSet:
  """The files of one corpus, sorted by relative path.

  Attributes:
    kind: "stdlib" or "files".
    label: human description for logs, e.g. "python3.11 stdlib".
    root: absolute directory the relative paths start from.
    paths: relative POSIX paths.
    sizes: file sizes in bytes, aligned with `paths`.
    key: short hash of the file set (paths, sizes, mtimes, root) naming the prepared data.
  """

  kind: str
  label: str
  root: str
  paths: tuple[str, ...]
  sizes: tuple[int, ...]
  key: str

  @property
  def config_name(self) -> str:
    """TFDS builder config name: distinct for every distinct file set."""
    if self.kind == "stdlib":
      return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{self.key}"
    return f"files-{self.key}"

  @property
  def num_bytes(self) -> int:
    return sum(self.sizes)

  def describe(self) -> str:
    """E.g. "1790 files, 31.5 MB"."""
    n = len(self.paths)
    size = self.num_bytes
    amount = f"{size} bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
      if size >= scale:
        amount = f"{size / scale:.1f} {unit}"
        break
    return f"{n} file{'s' if n != 1 else ''}, {amount}"


def _file_set(kind: str, label: str, root: str, abs_paths: Sequence[str]) -> FileSet:
  entries = []
  for path in abs_paths:
    st = os.stat(path)
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    entries.append((rel, st.st_size, st.st_mtime_ns))
  entries.sort()
  digest = hashlib.sha1(f"{kind}\n{root}\n".encode())
  for rel, size, mtime in entries:
    digest.update(f"{rel}\t{size}\t{mtime}\n".encode())
  return FileSet(
    kind=kind,
    label=label,
    root=root,
    paths=tuple(e[0] for e in entries),
    sizes=tuple(e[1] for e in entries),
    key=digest.hexdigest()[:10],
  )


def stdlib_files() -> FileSet:
  """Every `*.py` under the running interpreter's stdlib, minus installed packages."""
  root = os.path.abspath(sysconfig.get_paths()["stdlib"])
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  label = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib"
  return _file_set("stdlib", label, root, found)


def _glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if any(c in part for c in "*?["):
      break
    fixed.append(part)
  return os.sep.join(fixed) or os.sep


def text_files(pattern: str) -> FileSet:
  """The regular files matching a glob (`**` recurses); raises `UserError` if none match."""
  full = os.path.abspath(os.path.expandvars(os.path.expanduser(pattern)))
  found = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
  if not found:
    hint = "check the path, or quote the glob so the shell does not expand it"
    if os.path.isdir(full):
      hint = f"it is a directory; use a glob such as '{os.path.join(full, '**', '*.txt')}'"
    raise UserError(f"data.text_files={pattern!r} matched no files; {hint}")
  return _file_set("files", f"text_files {pattern!r}", _glob_root(full), found)


def _split_hash(rel_path: str) -> int:
  return int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16)


def assign_splits(paths: Sequence[str]) -> dict[str, list[str]]:
  """Splits files into "train" / "validation" by a stable hash of their relative path.

  A file goes to validation when `sha1(path) % 100 < VALIDATION_PERCENT`. With two or more
  files each split gets at least one (the file with the lowest, resp. highest, hash moves);
  a single file goes to train and there is no validation split.

  Args:
    paths: relative paths.

  Returns:
    {"train": [...], "validation": [...]}, each in the order of `paths`.
  """
  keys = {p: _split_hash(p) for p in paths}
  order = lambda p: (keys[p] % 100, keys[p])
  val = {p for p in paths if keys[p] % 100 < VALIDATION_PERCENT}
  if len(paths) >= 2:
    if not val:
      val.add(min(paths, key=order))
    if len(val) == len(paths):
      val.discard(max(paths, key=order))
  return {
    "train": [p for p in paths if p not in val],
    "validation": [p for p in paths if p in val],
  }


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Silences TFDS' stdout prints, progress bars and the custom-config warning."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel

  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  active = getattr(tqdm_utils, "_active", True)
  absl_logger.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(active)
    absl_logger.setLevel(level)


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
  """Builder config naming one file set; `root`/`paths` are not part of the on-disk identity."""

  root: str = dataclasses.field(default="", repr=False)
  paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)


class FulcrumTextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One example per text file: {"text": raw bytes, "path": relative path}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per file; split by path hash."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # TFDS' own lookup imports `importlib_resources`, which it only installs on Python < 3.9.
    return epath.Path(__file__)

  def __init__(self, **kwargs: Any):
    # Quiet: TFDS warns about every config not in BUILDER_CONFIGS (ours are all made on the
    # fly), also when grain workers unpickle the builder.
    with quiet_tfds():
      super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` would look for metadata files next to
    # this module.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Text files, one example per file (Fulcrum offline corpus).",
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "path": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    splits = assign_splits(self.builder_config.paths)
    # TFDS cannot write an empty split: a one-file corpus has only "train".
    return {name: self._generate_examples(paths) for name, paths in splits.items() if paths}

  def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[str, dict]]:
    root = self.builder_config.root
    for rel in paths:
      full = os.path.join(root, rel)
      try:
        with open(full, "rb") as f:
          data = f.read()
      except OSError as e:
        # TFDS rewrites exceptions raised here; `prepare` re-raises this clean message.
        self.read_error = (
          f"cannot read corpus file {full}: {e.strerror}; fix its permissions or narrow "
          "data.text_files"
        )
        raise
      yield rel, {"text": data, "path": rel}


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
  """A built corpus: its builder (for `as_data_source`) and what it holds."""

  builder: FulcrumTextCorpus
  files: FileSet
  data_dir: str

  def split_sizes(self) -> dict[str, int]:
    """Examples (files) per split."""
    return {name: info.num_examples for name, info in self.builder.info.splits.items()}


def prepare(text_files_glob: str = "", data_dir: str = "") -> PreparedCorpus:
  """Builds the corpus if needed (a cheap no-op when it exists) and returns it.

  Args:
    text_files_glob: the user's files (`data.text_files`); "" = the Python stdlib sources.
    data_dir: TFDS data dir (`data.data_dir`); "" = `default_data_dir()`.

  Returns:
    The prepared corpus.

  Raises:
    UserError: the glob matches nothing, or the data dir is not writable.
  """
  files = text_files(text_files_glob) if text_files_glob else stdlib_files()
  if not files.paths:
    raise UserError(
      f"the {files.label} corpus has no files under {files.root}; set "
      "data.text_files to a glob of your own text files"
    )
  root_dir = resolve_data_dir(data_dir)
  config = TextCorpusConfig(
    name=files.config_name,
    description=f"{files.label}: {len(files.paths)} files under {files.root}",
    root=files.root,
    paths=files.paths,
  )
  with quiet_tfds():
    builder = FulcrumTextCorpus(config=config, data_dir=root_dir)
    prepared = builder.is_prepared()
  if not prepared:
    print(
      f"preparing corpus {files.label} ({files.describe()}) in {root_dir}",
      file=sys.stderr,
      flush=True,
    )
    try:
      with quiet_tfds(), tempfile.TemporaryDirectory() as scratch:
        builder.download_and_prepare(
          download_dir=scratch,  # Nothing is downloaded; keeps the data dir free of clutter.
          file_format=tfds.core.FileFormat.ARRAY_RECORD,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except Exception as e:
      if getattr(builder, "read_error", None):
        raise UserError(builder.read_error) from None
      # Another process (a second host or test worker) may have finished the same build first.
      with quiet_tfds():
        builder = FulcrumTextCorpus(config=config, data_dir=root_dir)
        done = builder.is_prepared()
      if not done:
        if isinstance(e, OSError):
          raise UserError(
            f"cannot write the corpus to {root_dir}: {e.strerror or e}; set data.data_dir (or "
            "$FULCRUM_DATA_DIR) to a writable directory"
          ) from None
        raise
  return PreparedCorpus(builder=builder, files=files, data_dir=root_dir)
