#!/usr/bin/env bash
# Step 5 of `make demo`: distill the demo model (4 layers) into a 2-layer student initialised
# from teacher blocks 0 and 3, on TP=2 x DP=2 (4 CPU processes), export it to Hugging Face and
# generate with `transformers`. Usage: launch/demo_distill.sh OUT_DIR DATA_PREFIX
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
DATA=$2
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
ITERS=${DISTILL_ITERS:-60}

"$DS" --hostfile launch/hostfile.localhost --no_ssh_check --master_addr 127.0.0.1 \
  --master_port 29613 mtnlg/distill.py \
  --teacher "$OUT/ckpt" --student-num-layers 2 \
  --student-init teacher-layers --student-init-layers 0,3 \
  --kd-temperature 2.0 --kd-alpha 0.9 --kd-loss forward-kl \
  --tensor-model-parallel-size 2 --seq-length 128 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
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
