# Installs Fulcrum into this runtime as a regular package (no restart needed) and keeps the
# runtime's own JAX build (Colab's TPU and GPU runtimes come with one) when it is new enough.
# FULCRUM_SOURCE (default below): a pip URL (git+https://...@branch), a checkout folder or a
# wheel; setting it in the environment reinstalls. FULCRUM_PIP_ARGS: extra pip arguments.
# This cell is notebooks/install_cell.py; scripts/sync_notebooks.py copies it into each notebook.
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

FULCRUM_SOURCE = os.environ.get("FULCRUM_SOURCE", "git+https://github.com/fulcrum-ml/fulcrum")
JAX_MIN = "0.7"  # pyproject.toml's `jax>=`.
# JAX and its accelerator builds: pinned to the runtime's versions while those are new enough.
JAX_DIST = re.compile(r"jax|jaxlib|libtpu(-nightly)?|jax-cuda\d+-(plugin|pjrt)")


def normalise(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version):
  return tuple(int(p) for p in re.match(r"\d+(\.\d+)*", version).group().split("."))


def installed_dists():
  """{normalised name: version} of every installed distribution, the first on sys.path."""
  found = {}
  for dist in importlib.metadata.distributions():
    if dist.metadata["Name"]:
      found.setdefault(normalise(dist.metadata["Name"]), dist.version)
  return found


def accelerator(dists):
  """'tpu', 'gpu' or 'cpu', told without importing JAX (which pip may yet replace)."""
  if (
    os.environ.get("TPU_ACCELERATOR_TYPE")  # Cloud TPU VMs.
    or glob.glob("/dev/accel[0-9]*")  # TPU v2-v4 chips.
    or glob.glob("/dev/vfio/[0-9]*")  # TPU v5e, v6e chips (Colab's TPU v5e-1).
    or {"libtpu", "libtpu-nightly"} & set(dists)
  ):
    return "tpu"
  return "gpu" if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0") else "cpu"


def plan(source, dists, device):
  """(pip requirements, constraints) that install Fulcrum from `source` given the installed
  `dists` ({name: version}) on a `device` runtime."""
  if "://" in source:
    fulcrum = f"fulcrum @ {source}"
  else:  # A folder or a wheel: absolute, so that pip does not take it for a project name.
    fulcrum = os.path.abspath(os.path.expanduser(source))
  if "jax" in dists and version_tuple(dists["jax"]) >= version_tuple(JAX_MIN):
    return [fulcrum], [f"{n}=={v}" for n, v in sorted(dists.items()) if JAX_DIST.fullmatch(n)]
  extra = {"tpu": "[tpu]", "gpu": "[cuda12]"}.get(device, "")
  return [fulcrum, f"jax{extra}>={JAX_MIN}"], []


def pip_install(requirements, constraints):
  """Whether pip installed `requirements` under `constraints`."""
  with tempfile.TemporaryDirectory() as tmp:
    pins = os.path.join(tmp, "constraints.txt")
    with open(pins, "w") as f:
      f.write("".join(c + "\n" for c in constraints))
    args = [*os.environ.get("FULCRUM_PIP_ARGS", "").split(), "-c", pins, *requirements]
    print("pip install", shlex.join(args))
    print("  constraints:", ", ".join(constraints) or "none")
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args]).returncode == 0


def install(source):
  before = installed_dists()
  device = accelerator(before)
  requirements, constraints = plan(source, before, device)
  # With the runtime's JAX pinned; else (Fulcrum's dependencies need a newer one) a newer JAX
  # built for the device.
  if not pip_install(requirements, constraints) and not (
    constraints and pip_install(*plan(source, {}, device))
  ):
    raise RuntimeError("pip could not install Fulcrum: its messages are above.")
  importlib.invalidate_caches()
  after = installed_dists()
  # A module this session imported whose files pip replaced keeps running the old code.
  files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
  loaded = {os.path.realpath(f) for f in files if f}
  replaced = sorted(
    name
    for name, version in before.items()
    if after.get(name, version) != version
    and any(
      os.path.realpath(f.locate()) in loaded
      for f in importlib.metadata.distribution(name).files or ()
    )
  )
  if replaced:
    print(f"pip replaced {', '.join(replaced)}, already imported: Runtime → Restart session.")


def main():
  spec = importlib.util.find_spec("fulcrum")
  if "FULCRUM_SOURCE" in os.environ or spec is None or spec.origin is None:
    install(FULCRUM_SOURCE)  # (origin None: a folder named fulcrum, not the package.)
  else:
    print(f"fulcrum is installed ({spec.origin}); set FULCRUM_SOURCE to reinstall.")
  import jax

  import fulcrum

  print(f"fulcrum {fulcrum.__version__}: {fulcrum.__file__}")
  print(f"jax {jax.__version__}: {jax.__file__}")
  print("jax.devices():", jax.devices())


if __name__ == "__main__":
  main()
