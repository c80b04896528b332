#!/usr/bin/env bash
# The Megatron-Turing NLG 530B pretraining recipe (Smith et al. 2022, arXiv:2201.11990).
#
# Usage (from the repository root, on the node that launches the job):
#   HOSTFILE=launch/hostfile DATA_PATH="0.1 data/pile_cc_text_document 0.9 ..." \
#   SAVE_DIR=checkpoints/mtnlg_530b bash launch/mtnlg_530b.sh [extra pretrain.py flags...]
#
# Environment (defaults in brackets):
#   HOSTFILE   DeepSpeed hostfile, 280 nodes x "slots=8"            [launch/hostfile]
#   DATA_PATH  one prefix, or a blend "W1 PREFIX1 W2 PREFIX2 ..."     [data/mtnlg_text_document]
#   SAVE_DIR   checkpoints (also loaded from, to resume)             [checkpoints/mtnlg_530b]
#   VOCAB_FILE / MERGE_FILE  GPT-2 BPE          [data/gpt2/gpt2-vocab.json, gpt2-merges.txt]
#   TB_DIR     TensorBoard logs                                      [$SAVE_DIR/tensorboard]
#   DS_CONFIG  DeepSpeed JSON                                        [ds_configs/mtnlg_530b.json]
#   MASTER_ADDR / MASTER_PORT  rendezvous, passed to the launcher when set  [first host / 29500]
# Check the layout first: python -m mtnlg.plan --preset mtnlg-530b (see docs/launch.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOSTFILE=${HOSTFILE:-launch/hostfile}
DATA_PATH=${DATA_PATH:-data/mtnlg_text_document}
SAVE_DIR=${SAVE_DIR:-checkpoints/mtnlg_530b}
VOCAB_FILE=${VOCAB_FILE:-data/gpt2/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-data/gpt2/gpt2-merges.txt}
TB_DIR=${TB_DIR:-$SAVE_DIR/tensorboard}
DS_CONFIG=${DS_CONFIG:-ds_configs/mtnlg_530b.json}

# Model (paper Table 1 / sec. 2): 105 layers, hidden 20480, 128 heads, sequence 2048.
MODEL_ARGS=(
  --num-layers 105
  --hidden-size 20480
  --num-attention-heads 128
  --seq-length 2048
  --max-position-embeddings 2048
  --init-method-std 0.004          # paper sec. 4.2: init std 0.004
  --hidden-dropout 0.1
  --attention-dropout 0.1
)

# 3D parallelism (paper sec. 2.3): TP 8 within a DGX node, PP 35 stages (3 blocks each) across
# nodes, data parallel over the rest: 280 nodes = 2240 GPUs -> DP 8 (350 -> DP 10, 420 -> DP 12).
# ZeRO-1 shards the fp32 optimizer states over DP; bf16 mixed precision.
PARALLEL_ARGS=(
  --tensor-model-parallel-size 8
  --pipeline-model-parallel-size 35
  --bf16
  --checkpoint-activations         # without recompute stage 0 needs >100 GB (mtnlg.plan)
)

# Batch (paper sec. 4.2): global batch 1920 sequences; ramp from 32 by 32 over the first 12B
# tokens = 12e9 / 2048 = 5,859,375 samples. Train on 270B tokens = 270e9 / 2048 = 131,835,937
# samples.
BATCH_ARGS=(
  --micro-batch-size 1
  --global-batch-size 1920
  --rampup-batch-size 32 32 5859375
  --train-samples 131835937
)

# Optimizer (paper sec. 4.2): Adam beta1 0.9, beta2 0.95, eps 1e-8; lr 5e-5 with 1B tokens of
# linear warmup, cosine decay to 10% (5e-6) over 340B tokens; weight decay 0.1; clip 1.0.
OPT_ARGS=(
  --lr 5e-5
  --min-lr 5e-6
  --lr-decay-style cosine
  --lr-warmup-tokens 1000000000
  --lr-decay-tokens 340000000000
  --adam-beta1 0.9
  --adam-beta2 0.95
  --weight-decay 0.1
  --clip-grad 1.0
  --seed 1234
)

DATA_ARGS=(
  --data-path ${DATA_PATH}         # unquoted on purpose: a blend is "W1 P1 W2 P2 ..."
  --split 949,50,1
  --tokenizer-type GPT2BPETokenizer
  --vocab-file "$VOCAB_FILE"
  --merge-file "$MERGE_FILE"
)

IO_ARGS=(
  --save "$SAVE_DIR"
  --load "$SAVE_DIR"
  --save-interval 500
  --eval-interval 1000
  --eval-iters 10
  --log-interval 1
  --tensorboard-dir "$TB_DIR"
  --metrics-file "$SAVE_DIR/metrics.jsonl"
  --keep-last 3                    # each ~7.4 TB: bf16 weights + fp32 masters and Adam moments
)

# Faults (docs/faults.md): on SIGTERM (the SLURM batch file forwards it before the time limit)
# finish the iteration, save, exit 0; stop after 10 non-finite steps in a row.
FAULT_ARGS=(
  --exit-signal-handler
  --exit-signal SIGTERM
  --max-consecutive-nonfinite 10
)

LAUNCHER_ARGS=(--hostfile "$HOSTFILE")
if [[ -n "${MASTER_ADDR:-}" ]]; then
  LAUNCHER_ARGS+=(--master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

mkdir -p "$SAVE_DIR"
exec deepspeed "${LAUNCHER_ARGS[@]}" mtnlg/pretrain.py \
  "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${BATCH_ARGS[@]}" "${OPT_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${IO_ARGS[@]}" "${FAULT_ARGS[@]}" \
  --deepspeed --deepspeed_config "$DS_CONFIG" \
  "$@"
