#!/bin/bash
# DDP without SLURM: run this on every node (same command, NODE_RANK 0..NNODES-1); Lightning reads torchrun's
# variables. MASTER is node 0's address, reachable from every node.
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1 GPUS=4 bash scripts/cluster/torchrun_ddp.sh     # on node 0
#   NNODES=2 NODE_RANK=1 MASTER=10.0.0.1 GPUS=4 bash scripts/cluster/torchrun_ddp.sh     # on node 1
#   GPUS=2 bash scripts/cluster/torchrun_ddp.sh                                           # one machine, 2 GPUs
#   ACCELERATOR=cpu GPUS=2 bash scripts/cluster/torchrun_ddp.sh --trainer.max_epochs 1    # 2 CPU processes (gloo)
# Extra arguments go to `ssvae fit`.
set -euo pipefail
CONFIG=${CONFIG:-configs/mnist/m2.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1}
PORT=${PORT:-29500}
GPUS=${GPUS:-1}
ACCELERATOR=${ACCELERATOR:-gpu}
PYTHON=${PYTHON:-.venv/bin/python}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --master_addr "$MASTER" --master_port "$PORT" \
  -m ssvae_pl.cli fit -c "$CONFIG" \
  --trainer.accelerator "$ACCELERATOR" --trainer.devices "$GPUS" --trainer.num_nodes "$NNODES" \
  --trainer.strategy ddp "$@"
