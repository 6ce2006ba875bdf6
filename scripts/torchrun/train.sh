#!/usr/bin/env bash
# Train the head on several machines with torchrun: run this on every node with the same NNODES,
# MASTER_ADDR and MASTER_PORT and its own NODE_RANK (0 on the node at MASTER_ADDR); every argument goes
# to `regionspot train`. For example, on two machines with 8 GPUs each:
#
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/torchrun/train.sh --recipe bl-stage1 \
#              --shards /shared/shards/o365 --out /shared/runs/bl-stage1
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/torchrun/train.sh ...same arguments...
#
# torchrun starts NPROC_PER_NODE processes per node (default: one per visible GPU, else 1) and sets
# RANK, WORLD_SIZE, LOCAL_RANK; each trains on cuda:LOCAL_RANK. --shards must be readable and --out
# writable on every node; rank 0 writes the checkpoints.
set -euo pipefail
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m regionspot.cli train "$@"
