#!/usr/bin/env bash
# `make demo`: the main job end to end on the CPU, on the Shakespeare corpus stored in the repo.
#   1. preprocess data/demo/shakespeare.jsonl into Megatron's .bin/.idx (GPT-2 BPE, EOD appended)
#   2. pretrain a small GPT with TP=2 x PP=2 on 4 processes through `deepspeed --hostfile`
#   3. plot the loss curve (PNG), 4. evaluate the checkpoint's validation perplexity
#   5. prune it to half its width (importance from a calibration pass at TP=2 x PP=2), distill
#      the pruned model from it, export to Hugging Face, generate with transformers
#   6. generate from the trained checkpoint with mtnlg/generate.py at its TP=2 x PP=2
#   7. zero-shot LAMBADA (Megatron's method) on 300 passages at TP=2 x PP=2
#   8. fine-tune on SST-2 at TP=2 x DP=2, export GPT2ForSequenceClassification, classify with it
# Everything lands in out/demo/. Override ITERS=... for a longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
OUT=${OUT:-out/demo}
ITERS=${ITERS:-150}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VOCAB=data/gpt2-tiny/gpt2-tiny-vocab.json
MERGES=data/gpt2-tiny/gpt2-tiny-merges.txt
LAUNCH=("$DS" --hostfile launch/hostfile.localhost --no_ssh_check --master_addr 127.0.0.1)

rm -rf "$OUT" && mkdir -p "$OUT/data"
echo "== 1/8 preprocess data/demo/shakespeare.jsonl"
"$PY" -m mtnlg.data.preprocess --input data/demo/shakespeare.jsonl \
  --output-prefix "$OUT/data/shakespeare" --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$VOCAB" --merge-file "$MERGES" --append-eod --workers 2
DATA="$OUT/data/shakespeare_text_document"

echo "== 2/8 pretrain: TP=2 x PP=2 x DP=1 on 4 CPU processes (deepspeed --hostfile)"
"${LAUNCH[@]}" --master_port 29611 mtnlg/pretrain.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
  --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234 \
  --data-path "$DATA" --split 95,5,0 --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$VOCAB" --merge-file "$MERGES" \
  --log-interval 10 --eval-interval 50 --eval-iters 2 \
  --save "$OUT/ckpt" --save-interval "$ITERS" \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
  --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

echo "== 3/8 loss curve"
"$PY" -m mtnlg.plot "$OUT/metrics.jsonl" --output "$OUT/loss.png" --title "mtnlg demo"

echo "== 4/8 evaluate the checkpoint at its own TP=2 x PP=2"
"${LAUNCH[@]}" --master_port 29612 mtnlg/evaluate.py --load "$OUT/ckpt" \
  --data-path "$DATA" --split 95,5,0 --eval-samples 64 --output-json "$OUT/eval.json"
cat "$OUT/eval.json"

if [ -f mtnlg/distill.py ] && [ -f mtnlg/prune.py ]; then
  echo "== 5/8 prune to half width (calibration at TP=2 x PP=2), distill the pruned student, export to Hugging Face, generate"
  bash launch/demo_distill.sh "$OUT" "$DATA"
fi

echo "== 6/8 generate from the checkpoint at TP=2 x PP=2 (mtnlg/generate.py, KV cache, seeded top-k sampling)"
"${LAUNCH[@]}" --master_port 29614 mtnlg/generate.py --load "$OUT/ckpt" \
  --prompt "ROMEO:" --temperature 0.8 --top-k 40 --seed 1 --max-new-tokens 48 --output-jsonl "$OUT/gen.jsonl"
"$PY" -c 'import json, sys; r = json.loads(open(sys.argv[1]).readline()); print(r["prompt"] + r["text"])' \
  "$OUT/gen.jsonl"

echo "== 7/8 zero-shot LAMBADA (Megatron's method, first 300 passages) at TP=2 x PP=2"
"${LAUNCH[@]}" --master_port 29616 mtnlg/evaluate.py --load "$OUT/ckpt" --task lambada \
  --data-path data/lambada/lambada_test.jsonl --eval-samples 300 --micro-batch-size 16 \
  --no-progress --output-json "$OUT/lambada.json"
cat "$OUT/lambada.json"

echo "== 8/8 fine-tune on SST-2 sentiment from the checkpoint at TP=2 x DP=2, export to Hugging Face"
"${LAUNCH[@]}" --master_port 29618 mtnlg/finetune.py --task classification --load "$OUT/ckpt" \
  --train-data data/sst2/train.tsv --valid-data data/sst2/dev.tsv --seq-length 64 --truncate \
  --tensor-model-parallel-size 2 --micro-batch-size 16 --global-batch-size 32 --train-iters 200 \
  --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 10 --eval-interval 200 \
  --log-interval 50 --no-progress --save "$OUT/sst2" --export-hf "$OUT/sst2_hf" \
  --metrics-file "$OUT/sst2_metrics.jsonl" --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json
"$PY" - "$OUT/sst2_hf" <<'PYEOF'
import sys
import torch
from transformers import AutoTokenizer, GPT2ForSequenceClassification
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = GPT2ForSequenceClassification.from_pretrained(sys.argv[1]).eval()
texts = ["a charming and often affecting journey", "unflinchingly bleak and desperate"]
batch = tok(texts, return_tensors="pt", padding=True)
with torch.no_grad():
    pred = model(**batch).logits.argmax(-1).tolist()
for text, p in zip(texts, pred):
    label = model.config.id2label[p]  # SST-2: 1 = positive
    print(f"transformers GPT2ForSequenceClassification: {text!r} -> {label}")
PYEOF

echo "demo done: $OUT/loss.png, $OUT/ckpt, $OUT/eval.json, $OUT/pruned, $OUT/student_hf, $OUT/gen.jsonl, $OUT/lambada.json, $OUT/sst2_hf"
