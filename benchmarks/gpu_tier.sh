#!/bin/bash
# The converged tier's goal pair on MiniLM, on the lent GPU machine: the command to give the device tool's `run`,
# with `.gpu` carried (built here first by `python benchmarks/gpu_bundle.py`):
#
#   run(command="bash benchmarks/gpu_tier.sh", carry=[".gpu"], timeout_s=600)
#
# It installs the carried wheels, unpacks the model and data, checks the versions and CUDA, then runs the cells
# below with several runs at a time on the one GPU until BUDGET_S seconds are spent (a run cut off is not recorded;
# every finished one is, so the next call goes on from there once its JSON is committed). Before the tier, speed.py
# times MiniLM's training step, inference and memory on the GPU in bf16 autocast (every method side by side, at most
# SPEED_S seconds). The log comes back as $OUT/log.txt and every result file in $OUT/results.tgz: unpack it into
# benchmarks/results/ and commit.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-400}
SPEED_S=${SPEED_S:-90}
SPEED=(--model minilm --device cuda --dtype bf16)
JOBS=${JOBS:-6}
RESULTS=benchmarks/results/quality_converged_cuda.json
# the tasks gpu_bundle.py packed: VitaminC only where its BIG-bench file was fetched (PyPI no longer serves the sdist)
read -r -a TASKS < .gpu/tasks.txt || { echo "[gpu_tier] .gpu/tasks.txt missing: run benchmarks/gpu_bundle.py"; exit 1; }
CELLS=(--tier converged --tasks "${TASKS[@]}" --methods prefix_mlp ipt_mlp_scale --lrs 0.001 --seeds 0 1 2)
if [ -n "${DRY_RUN:-}" ]; then  # a rehearsal on a machine without a GPU: one quick cell, results kept aside
  RESULTS=/tmp/gpu_dry/quality_quick_dry.json
  CELLS=(--quick --tasks rotten_tomatoes --methods ipt --precision fp32)
  SPEED=(--quick)
fi
mkdir -p "$OUT" /tmp/gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
  || { echo "[gpu_tier] installing the carried wheels failed"; exit 1; }
tar -xJf .gpu/assets.tar.xz -C /tmp/gpu || { echo "[gpu_tier] unpacking .gpu/assets.tar.xz failed"; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/gpu/site:$PWD/src PEFT_IPT_CACHE=/tmp/gpu/cache PEFT_IPT_SITE=/tmp/gpu/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu_bundle.py --check-device 2>&1 | tee "$OUT/log.txt" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$OUT/log.txt"
mkdir -p /tmp/gpu_speed
timeout "$SPEED_S" python3 benchmarks/speed.py "${SPEED[@]}" --out-dir /tmp/gpu_speed 2>&1 | tee -a "$OUT/log.txt"
echo "[gpu_tier] speed.py ended with ${PIPESTATUS[0]} (124: stopped at ${SPEED_S}s)" | tee -a "$OUT/log.txt"
timeout "$BUDGET_S" python3 benchmarks/quality.py "${CELLS[@]}" --out "$RESULTS" --jobs "$JOBS" --threads 2 2>&1 \
  | tee -a "$OUT/log.txt"
echo "[gpu_tier] quality.py ended with ${PIPESTATUS[0]} (124: stopped at ${BUDGET_S}s)" | tee -a "$OUT/log.txt"
python3 benchmarks/quality.py "${CELLS[@]}" --out "$RESULTS" --report >> "$OUT/log.txt" 2>&1
tar -czf "$OUT/results.tgz" -C "$(dirname "$RESULTS")" $(cd "$(dirname "$RESULTS")" && ls "$(basename "${RESULTS%.json}")"*) \
  -C /tmp/gpu_speed .
ls -la "$OUT"
