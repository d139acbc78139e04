#!/usr/bin/env bash
# Accelerator checks, for a machine with a GPU or TPU (CI has none).
#
# 1. The scan tests with the Pallas kernels compiled for the device (on CPU they run in
#    interpret mode): values and gradients against the reference scan; and the quantized-
#    training tests (`TESTS` overrides the list).
# 2. The benchmarks that matter most on an accelerator, each under its own time limit.
#
# Results land in OUTDIR as one archive (benchmarks/results/*.{json,md,png} of the benchmarks
# that ran, renamed NAME_<device>.*) plus the logs. Nothing here changes the repository's own
# benchmarks/results, so CPU figures stay as they are.
#
#   scripts/accelerator_check.sh OUTDIR [BENCH ...]     (default: scan optim train scaling)
#   env: PYTHON, TESTS (test files), PYTEST_K (-k filter), TEST_TIMEOUT, BENCH_TIMEOUT (seconds)
set -u
out=${1:?usage: scripts/accelerator_check.sh OUTDIR [BENCH ...]}
shift
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(scan optim train scaling)
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

device=$($py -c "import jax; d = jax.devices()[0]; print(getattr(d, 'device_kind', d.platform))" \
  | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z')
echo "device: $device"
$py -c "import jax; print(jax.__version__, jax.devices())"

pack() {  # After every step, so a run stopped at its time limit still returns what it did.
  tar -czf "$out/accelerator_check.tgz" -C "$out" results $(cd "$out" && ls *.log bench_* 2>/dev/null)
}

# The scan kernels compiled for the device (Pallas: Triton on GPU, Mosaic on TPU) and the
# quantized-training matmuls (native fp8 where the device has it).
for t in ${TESTS:-tests/modules/test_scan.py tests/modules/test_quant.py}; do
  name=$(basename "$t" .py)
  echo "== $t"
  timeout "${TEST_TIMEOUT:-240}" $py -m pytest -q -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} "$t" 2>&1 | tail -25 \
    | tee "$out/$name.log"
  pack
done

scratch=$(mktemp -d)
cp -r benchmarks/results "$scratch/cpu_results"
for b in "${benches[@]}"; do
  echo "== bench $b"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-150}" $py -m fulcrum bench "$b" --json > "$out/bench_$b.json" \
    2> "$out/bench_$b.err"
  echo "rc=$? in $(( $(date +%s) - start )) s"
  tail -3 "$out/bench_$b.err"
  for f in benchmarks/results/"$b".*; do
    [ -e "$f" ] || continue
    ext=${f##*.}
    if ! cmp -s "$f" "$scratch/cpu_results/$(basename "$f")"; then
      cp "$f" "$out/results/${b}_${device}.$ext"
    fi
  done
  pack
done
cp -r "$scratch/cpu_results/." benchmarks/results/  # Leave the repository's results untouched.
pack
echo "done"
