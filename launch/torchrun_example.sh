#!/usr/bin/env bash
# Launch with torchrun (elastic launcher): it sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR
# for each rank, which mtnlg's init picks up; no hostfile or ssh is needed, but every node runs
# this script.
#
# Usage (repository root):
#   one node, 8 GPUs:   NPROC=8 TP=2 PRESET=gpt3-1.3b DS_CONFIG=ds_configs/gpt_1.3b_bf16.json \
#                         MICRO_BATCH=4 GLOBAL_BATCH=512 bash launch/torchrun_example.sh
#   two nodes: on each, NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> bash launch/torchrun_example.sh
#   CPU smoke run:      NPROC=2 DS_ACCELERATOR=cpu bash launch/torchrun_example.sh
#
# Environment (defaults in brackets): NPROC ranks per node [2], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], PRESET [small-demo], TP [1], PP [1],
# MICRO_BATCH [2], GLOBAL_BATCH [8], TRAIN_ITERS [100], DATA_PATH [data/my_corpus_text_document],
# DS_CONFIG [ds_configs/cpu_fp32_zero1.json], SAVE_DIR [checkpoints/torchrun_example].
# Extra arguments go to mtnlg/pretrain.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PRESET=${PRESET:-small-demo}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-8}
TRAIN_ITERS=${TRAIN_ITERS:-100}
DATA_PATH=${DATA_PATH:-data/my_corpus_text_document}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_fp32_zero1.json}
SAVE_DIR=${SAVE_DIR:-checkpoints/torchrun_example}
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  mtnlg/pretrain.py \
  --preset "$PRESET" \
  --tensor-model-parallel-size "$TP" \
  --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MICRO_BATCH" \
  --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" \
  --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 10 \
  --data-path ${DATA_PATH} \
  --vocab-file data/gpt2/gpt2-vocab.json \
  --merge-file data/gpt2/gpt2-merges.txt \
  --save "$SAVE_DIR" \
  --log-interval 10 \
  --deepspeed --deepspeed_config "$DS_CONFIG" \
  "$@"
