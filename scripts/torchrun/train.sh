#!/usr/bin/env bash
# Train the head on several machines with torchrun: run this on every node with the same NNODES,
# MASTER_ADDR and MASTER_PORT and its own NODE_RANK (0 on the node at MASTER_ADDR); every argument goes
# to `regionspot train`. For example, on two machines with 8 GPUs each:
#
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/torchrun/train.sh --recipe bl-stage1 \
#              --shards /shared/shards/o365 --out /shared/runs/bl-stage1
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/torchrun/train.sh ...same arguments...
#
# torchrun starts NPROC_PER_NODE processes per node (default: one per visible GPU, else 1; launch.sh
# lists the variables) and sets RANK, WORLD_SIZE, LOCAL_RANK; each trains on cuda:LOCAL_RANK.
# --shards must be readable and --out writable on every node; rank 0 writes the checkpoints.
exec bash "$(dirname "$0")/launch.sh" train "$@"
