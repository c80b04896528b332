#!/usr/bin/env bash
# GPT-3 1.3B (Brown et al. 2020, Table 2.1: 24 layers, h 2048, 16 heads, seq 2048) on one
# 8-GPU node: TP 2 x PP 1 x DP 4, bf16, ZeRO-1, micro-batch 4, global batch 512.
#
# Usage (repository root):
#   DATA_PATH=data/my_corpus_text_document bash launch/gpt_1.3b_1node.sh [extra flags...]
#
# Environment (defaults in brackets):
#   DATA_PATH   one prefix or a blend "W1 P1 W2 P2 ..."       [data/my_corpus_text_document]
#   SAVE_DIR    checkpoints                                     [checkpoints/gpt_1.3b]
#   NUM_GPUS    GPUs on this node                               [8]
#   TP          tensor-parallel degree (1 or 2)                 [2]
#   TRAIN_TOKENS tokens to train on (GPT-3: 300B)               [300000000000]
# Plan it: python -m mtnlg.plan --preset gpt3-1.3b --tensor-model-parallel-size 2 \
#   --num-gpus 8 --micro-batch-size 4 --global-batch-size 512 --checkpoint-activations
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_PATH=${DATA_PATH:-data/my_corpus_text_document}
SAVE_DIR=${SAVE_DIR:-checkpoints/gpt_1.3b}
NUM_GPUS=${NUM_GPUS:-8}
TP=${TP:-2}
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
VOCAB_FILE=${VOCAB_FILE:-data/gpt2/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-data/gpt2/gpt2-merges.txt}
DS_CONFIG=${DS_CONFIG:-ds_configs/gpt_1.3b_bf16.json}
SEQ=2048

mkdir -p "$SAVE_DIR"
exec deepspeed --num_gpus "$NUM_GPUS" mtnlg/pretrain.py \
  --preset gpt3-1.3b \
  --tensor-model-parallel-size "$TP" \
  --pipeline-model-parallel-size 1 \
  --micro-batch-size 4 \
  --global-batch-size 512 \
  --train-samples $((TRAIN_TOKENS / SEQ)) \
  --lr 2e-4 \
  --min-lr 2e-5 \
  --lr-decay-style cosine \
  --lr-warmup-tokens 375000000 \
  --lr-decay-tokens 260000000000 \
  --adam-beta1 0.9 \
  --adam-beta2 0.95 \
  --weight-decay 0.1 \
  --clip-grad 1.0 \
  --bf16 \
  --checkpoint-activations \
  --data-path ${DATA_PATH} \
  --split 949,50,1 \
  --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$VOCAB_FILE" \
  --merge-file "$MERGE_FILE" \
  --save "$SAVE_DIR" \
  --load "$SAVE_DIR" \
  --save-interval 1000 \
  --eval-interval 1000 \
  --eval-iters 10 \
  --log-interval 10 \
  --tensorboard-dir "$SAVE_DIR/tensorboard" \
  --metrics-file "$SAVE_DIR/metrics.jsonl" \
  --keep-last 3 \
  --exit-signal-handler \
  --deepspeed --deepspeed_config "$DS_CONFIG" \
  "$@"
