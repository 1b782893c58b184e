#!/usr/bin/env bash
# Kill-and-resume on real MNIST: M2 (the shipped config, 3 short epochs) uninterrupted, and the same run killed with
# SIGKILL in the middle of epoch 2 and resumed with --ckpt_path last; then the two runs' metrics and weights.
set -u  # usage: bash scripts/kill_and_resume.sh (needs `make venv` and MNIST under data/)
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
STAMP=$(date +%Y%m%d-%H%M%S)  # fresh run folders each time: lightning_logs/m2/demo-{straight,killed}-$STAMP
export STAMP
RUN="fit -c configs/mnist/m2.yaml --trainer.max_epochs 3 --trainer.limit_train_batches 40 --trainer.limit_val_batches 3 --trainer.enable_progress_bar false"
.venv/bin/ssvae $RUN --trainer.logger.init_args.version demo-straight-$STAMP > /tmp/demo_straight.log 2>&1
.venv/bin/ssvae $RUN --trainer.logger.init_args.version demo-killed-$STAMP > /tmp/demo_killed.log 2>&1 &
pid=$!
ck=lightning_logs/m2/demo-killed-$STAMP/checkpoints/last.ckpt
until [ -f $ck ]; do sleep 0.2; done
sleep 4
kill -9 $pid; wait $pid; echo "killed with SIGKILL: exit $?"
.venv/bin/python -c "import torch; print('last.ckpt after the kill: epoch', torch.load('$ck', weights_only=False)['epoch'], 'global step', torch.load('$ck', weights_only=False)['global_step'])"
.venv/bin/ssvae $RUN --trainer.logger.init_args.version demo-killed-$STAMP --ckpt_path last > /tmp/demo_resumed.log 2>&1; echo "resumed: exit $?"
.venv/bin/python - <<'PY'
import glob, os, torch
stamp = os.environ["STAMP"]
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
def series(run, tag):
    out = {}
    for f in sorted(glob.glob(f"lightning_logs/m2/{run}/events*")):
        ea = EventAccumulator(f, size_guidance={"scalars": 0}); ea.Reload()
        if tag in ea.Tags()["scalars"]:
            out.update({e.step: e.value for e in ea.Scalars(tag)})
    return out
for tag in ("val/acc", "val/elbo", "train/loss_epoch"):
    a, b = series(f"demo-straight-{stamp}", tag), series(f"demo-killed-{stamp}", tag)
    print(f"{tag:18s} uninterrupted {[round(v, 6) for _, v in sorted(a.items())]}  killed+resumed {[round(v, 6) for _, v in sorted(b.items())]}")
sa = torch.load(f"lightning_logs/m2/demo-straight-{stamp}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
sb = torch.load(f"lightning_logs/m2/demo-killed-{stamp}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
print("final weights identical:", all(torch.equal(sa[k], sb[k]) for k in sa), f"({len(sa)} tensors)")
PY
