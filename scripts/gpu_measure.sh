#!/usr/bin/env bash
# The GPU figures of docs/results.md in one sitting of at most ten minutes on one GPU (H100 or H200): the CUDA-graph
# test, M2's speed table (the plain loop, Lightning eager, Lightning with CUDA graphs, a full `ssvae fit` epoch with
# validation and callbacks), then the time to 95% validation accuracy of M2 and to 96.7% of M1+M2 at 100 labels,
# each with the test accuracy of its last checkpoint. M1+M2 starts from a trained M1 VAE checkpoint.
#   bash scripts/gpu_measure.sh <M1's VAE>/checkpoints/last.ckpt [OUT]    (OUT: default lightning_logs/gpu)
# Each step has its own time limit and the next runs whatever the last did; results and logs go to OUT.
set -u
vae=${1:?usage: bash scripts/gpu_measure.sh VAE_CHECKPOINT [OUT]}
out=${2:-lightning_logs/gpu}
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $(date +%T) $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "== $(date +%T) $name exit $status"
    tail -n 25 "$out/$name.log"
    return $status
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
graphs=(--ways lightning graphed guarded synced --fit-compile reduce-overhead)  # CUDA graphs, where they pass
step test_cuda_graphs 60 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda \
    || graphs=(--ways lightning)
step benchmark 150 python3 scripts/benchmark.py --device cuda --models m2 --precision bf16-mixed "${graphs[@]}" \
    --steps 300 --warmup 30 --fit --json "$out/benchmark-gpu.json"
# the time runs with CUDA graphs; where that fails at once (not by its time limit), eager: compile false
for compile in reduce-overhead false; do
    step "m2_to_95-$compile" 130 python3 scripts/time_to_accuracy.py --target 0.95 --name M2 --save-dir "$out/runs" \
        --json "$out/time-m2.json" -- -c configs/mnist/m2.yaml -c configs/presets/gpu.yaml \
        --model.init_args.compile $compile --trainer.max_time 00:00:01:20
    status=$?; [ $status -eq 0 ] || [ $status -ge 124 ] && break
done
for compile in reduce-overhead false; do
    step "m1m2_to_967-$compile" 260 python3 scripts/time_to_accuracy.py --target 0.967 --name M1+M2 \
        --save-dir "$out/runs" --json "$out/time-m1m2.json" -- -c configs/mnist/m1m2.yaml -c configs/presets/gpu.yaml \
        --model.init_args.vae_checkpoint "$vae" --model.init_args.compile $compile --trainer.max_time 00:00:03:30
    status=$?; [ $status -eq 0 ] || [ $status -ge 124 ] && break
done
