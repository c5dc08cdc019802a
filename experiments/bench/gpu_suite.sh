#!/usr/bin/env bash
# Issue 19's GPU runs in one command, about 8 minutes on one H100 (device time, machine start not
# counted): gpu.py's baseline for gpt125m and gpt1b, the candidate variants (remat for a larger
# batch), the chunked cross-entropy against the plain loss, gpu_checks.py (cuDNN attention, bf16
# training vs fp32) and int8 PTQ inference against float (mnist_cnn, issue 15). Everything it
# prints is also written to
# $RESULTS/gpu_<device>_<date>.md (RESULTS defaults to $OUT when the device tool runs it, else to
# experiments/bench/results/); copy that file into experiments/bench/results/ and commit it.
#
# The GPU image lacks some of bigjax's pure-Python dependencies: fetch them once on a machine with
# the registry (experiments/bench/gpu_wheels.sh writes runs/gpu_wheels/), then carry that folder:
#   run(command='bash experiments/bench/gpu_suite.sh', carry=['runs/gpu_wheels'], timeout_s=600)
# Set SUITE_QUICK=1 for the baseline and the checks only (about 4 minutes). SUITE_CPU_SMOKE=1 runs
# the same steps on the CPU at toy sizes (gpu.py --cpu_smoke, gpu_checks.py --cpu_smoke): it checks
# the plumbing and the results file, and its numbers mean nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1

if compgen -G 'runs/gpu_wheels/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site runs/gpu_wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# bigjax from this checkout; an installed bigjax maps configs/ to bigjax.configs, so a plain
# checkout gets that package as a link (on the device's copy of the tree).
[ -e bigjax/configs ] || ln -s ../configs bigjax/configs
smoke=()
[ "${SUITE_CPU_SMOKE:-0}" = 1 ] && smoke=(--cpu_smoke)
gpu_smoke=("${smoke[@]}")
[ "${SUITE_CPU_SMOKE:-0}" = 1 ] && gpu_smoke+=(--warmup 1)

device=$(python3 -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null | tr -c 'A-Za-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
[ -n "$device" ] || { echo 'gpu_suite.sh: jax sees no device'; exit 1; }
RESULTS=${RESULTS:-${OUT:-experiments/bench/results}}
mkdir -p "$RESULTS"
log="$RESULTS/gpu_${device}_$(date +%F).md"
echo "writing $log"

step() {  # step TITLE COMMAND...: the command line in a code block, then its output
  {
    printf '\n## %s\n\n```\n%s\n```\n\n' "$1" "${*:2}"
    local t0=$SECONDS
    # stdout (the tables) into the file; stderr (progress bars, logs) only to the terminal
    "${@:2}" 2> >(grep -v -E 'Warning|warn\(' >&2) || echo "(exit status $?)"
    printf '\n(%d s)\n' $((SECONDS - t0))
  } | tee -a "$log"
}

{
  echo "# bigjax GPU suite (issue 19), $(date -u '+%F %T UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python3 -c 'import sys, jax, flax, optax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/bigjax commit /'
  echo '```'
} | tee "$log"

bench=experiments/bench
step 'Baseline: gpt125m and gpt1b as gpu.py ships them' \
  python3 $bench/gpu.py --models gpt125m,gpt1b --steps 20 "${gpu_smoke[@]}"
step 'Chunked cross-entropy vs the plain loss (gpt125m shape)' \
  python3 $bench/gpu_checks.py --checks cross_entropy "${smoke[@]}"
if [ "${SUITE_QUICK:-0}" != 1 ]; then
  step 'Candidate: gpt125m at batch 64 with remat dots' \
    python3 $bench/gpu.py --models gpt125m --steps 10 --batch gpt125m=64 --set remat=dots "${gpu_smoke[@]}"
  step 'Candidate: gpt1b at batch 16 with remat dots' \
    python3 $bench/gpu.py --models gpt1b --steps 10 --batch gpt1b=16 --set remat=dots "${gpu_smoke[@]}"
fi
# int8 inference against float (issue 15): mnist_cnn trained in float, PTQ int8 weights and
# activations (Qwix), eval batches of 512 timed by bigjax.compress.quantize (median of 10).
cnn_config=mnist_cnn
[ "${SUITE_CPU_SMOKE:-0}" = 1 ] && cnn_config=mnist_cnn:smoke
step 'int8 PTQ inference vs float (mnist_cnn, eval batch 512)' bash -c "
  python3 -m bigjax.train --config=$cnn_config --workdir=/tmp/bigjax_int8_ptq --config.quantize.mode=ptq >/dev/null 2>&1 &&
  python3 -c 'import json; e = json.load(open(\"/tmp/bigjax_int8_ptq/results.json\"))[\"eval\"]; print(\"| accuracy | quant_accuracy | float_ms | quant_ms | speedup |\"); print(\"|---|---|---|---|---|\"); print(\"| %.4f | %.4f | %.3f | %.3f | %.2f |\" % (e[\"accuracy\"], e[\"quant_accuracy\"], e[\"float_ms\"], e[\"quant_ms\"], e[\"float_ms\"] / e[\"quant_ms\"]))'"
step 'Correctness: cuDNN attention, bf16 training vs fp32' \
  python3 $bench/gpu_checks.py --checks attention,training --steps 100 "${smoke[@]}"
echo "wrote $log"
