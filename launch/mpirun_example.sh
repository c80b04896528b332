#!/usr/bin/env bash
# Launch with Open MPI instead of the deepspeed launcher: mpirun starts every rank itself and
# mtnlg's init calls deepspeed.init_distributed(auto_mpi_discovery=True), which reads the MPI
# rank/size through mpi4py (pip install mpi4py) and broadcasts rank 0's address as MASTER_ADDR.
#
# Usage (repository root):
#   NP=16 HOSTFILE=launch/hostfile TP=8 PP=2 PRESET=gpt3-13b bash launch/mpirun_example.sh
#   NP=4 HOSTFILE=launch/hostfile.localhost DS_ACCELERATOR=cpu PRESET=small-demo \
#     DS_CONFIG=ds_configs/cpu_fp32_zero1.json bash launch/mpirun_example.sh   # CPU smoke run
#
# Environment (defaults in brackets): NP ranks [4], HOSTFILE Open MPI hostfile ("host slots=N",
# the DeepSpeed format works) [launch/hostfile.localhost], PRESET [small-demo], TP [1], PP [1],
# MICRO_BATCH [2], GLOBAL_BATCH [16], TRAIN_ITERS [100], DATA_PATH [data/my_corpus_text_document],
# DS_CONFIG [ds_configs/cpu_fp32_zero1.json], SAVE_DIR [checkpoints/mpirun_example],
# MASTER_PORT [29500]. Extra arguments go to mtnlg/pretrain.py.
# --map-by slot:OVERSUBSCRIBE fills each host's slots in order, so a TP group (consecutive ranks)
# stays inside a node, and permits more ranks than cores for CPU tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

NP=${NP:-4}
HOSTFILE=${HOSTFILE:-launch/hostfile.localhost}
PRESET=${PRESET:-small-demo}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
TRAIN_ITERS=${TRAIN_ITERS:-100}
DATA_PATH=${DATA_PATH:-data/my_corpus_text_document}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_fp32_zero1.json}
SAVE_DIR=${SAVE_DIR:-checkpoints/mpirun_example}
export MASTER_PORT=${MASTER_PORT:-29500}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
PYTHON=${PYTHON:-python}

# Forward the environment the ranks need; only variables that are set (mpirun warns on others).
MPI_ENV=()
for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_PORT DS_ACCELERATOR TORCH_EXTENSIONS_DIR \
  NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA CUDA_DEVICE_MAX_CONNECTIONS; do
  if [[ -n "${!var:-}" ]]; then
    MPI_ENV+=(-x "$var")
  fi
done

exec mpirun -np "$NP" --hostfile "$HOSTFILE" --allow-run-as-root \
  --map-by slot:OVERSUBSCRIBE --bind-to none \
  "${MPI_ENV[@]}" \
  "$PYTHON" mtnlg/pretrain.py \
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
