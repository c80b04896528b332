#!/usr/bin/env bash
# Step 5 of `make demo`: prune the demo model (4 x 128) to half its width with importance scores
# from a calibration pass at its own TP=2 x PP=2 (Minitron), distill the pruned model from the
# original on TP=2 x DP=2 (4 CPU processes; logit KL only, T = 1), export it to Hugging Face and
# generate with `transformers`. Usage: launch/demo_distill.sh OUT_DIR DATA_PREFIX
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
DATA=$2
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
ITERS=${DISTILL_ITERS:-60}
LAUNCH=("$DS" --hostfile launch/hostfile.localhost --no_ssh_check --master_addr 127.0.0.1)

"${LAUNCH[@]}" --master_port 29619 mtnlg/prune.py --load "$OUT/ckpt" \
  --calib-data "$DATA" --split 95,5,0 --calib-samples 64 --no-progress \
  --scores-out "$OUT/importance.safetensors" --output-json "$OUT/prune.json" \
  --target-hidden-size 64 --target-num-attention-heads 2 --target-ffn-hidden-size 256 \
  --save "$OUT/pruned" --tp 2 --pp 1

"${LAUNCH[@]}" --master_port 29613 mtnlg/distill.py \
  --teacher "$OUT/ckpt" --student-load "$OUT/pruned" \
  --kd-temperature 1.0 --kd-alpha 1.0 --kd-loss forward-kl \
  --tensor-model-parallel-size 2 --seq-length 128 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 4e-4 --min-lr 4e-5 --lr-decay-style cosine --lr-warmup-iters 5 \
  --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234 \
  --data-path "$DATA" --split 95,5,0 \
  --log-interval 10 --eval-interval "$ITERS" --eval-iters 2 \
  --save "$OUT/student" --metrics-file "$OUT/distill_metrics.jsonl" \
  --export-hf "$OUT/student_hf" \
  --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

"$PY" - "$OUT/student_hf" <<'PYEOF'
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok("ROMEO:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8,
                     pad_token_id=tok.eos_token_id)
print(f"transformers loaded {type(model).__name__} from {path}; a sample:")
print(tok.decode(out[0]))
PYEOF
