#!/usr/bin/env bash
# Extract one dataset on several machines with torchrun: run this on every node with the same NNODES,
# MASTER_ADDR and MASTER_PORT and its own NODE_RANK; every argument goes to `regionspot extract`:
#
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/torchrun/extract.sh --dataset o365 \
#              --backbones bl --sam-checkpoint sam_vit_b_01ec64.pth --clip-pretrained openai --out /shared/shards/o365
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/torchrun/extract.sh ...same arguments...
#
# torchrun starts NPROC_PER_NODE processes per node (default: one per visible GPU, else 1; launch.sh
# lists the variables); process RANK of WORLD_SIZE extracts the shards i with i mod WORLD_SIZE = RANK
# on cuda:LOCAL_RANK. --out must be writable from every node; running the same command again resumes.
exec bash "$(dirname "$0")/launch.sh" extract "$@"
