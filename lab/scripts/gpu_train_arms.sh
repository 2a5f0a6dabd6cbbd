#!/usr/bin/env bash
# Continue the bundled tiny LLaVA's QA training in several arms side by side on one GPU, then score the bundled
# model and every arm (transformers, greedy, uncompressed) on the whole v1 test split, on the same scenes drawn by
# spec v2 with digit strokes 2 and 5 (the held-out renderings when an arm trains on --strokes 3,4), on the harder
# split (accuracy per difficulty) and on 600 fresh validation scenes (lab/benchmarks/heldout.py: 3027 single-turn
# questions, standard error ~0.7 points, where the test split's 500 questions cannot tell two arms 2 points apart),
# all in one call, so that a lent GPU's minutes go to training. An arm for the spec-v2 goals, e.g.
#   'v2=--spec-version 2 --strokes 3,4 --size-jitter 0.08 --color-jitter 16 --both-spellings --hard-share 0.3'
#
#   INIT=tiny_llava_qlook_digit3_qa1494.pt bash lab/scripts/gpu_train_arms.sh SECONDS 'a=' 'b=--look-weight 1'
#
# Each arm is NAME=EXTRA-FLAGS added to the common command (lab/training.md's recipe; a later flag wins
# over an earlier one, so an arm may override a common value). Environment:
#   DEV (cuda)          torch device; on cpu the runs are tiny dry runs (no bf16)
#   WORKERS (7)         render workers per arm (16 cores: 2 arms x 7, 3 arms x 4)
#   PY (python3)        the interpreter with torch and transformers (vLLM is not needed)
#   OUT (/tmp/out)      results: model-NAME.safetensors, wh-NAME.pt and small.tgz (logs, curves, test JSONs)
#   BUNDLED             the served bundled model folder (tokenizer, processor, config); default: built here
#   LIMIT               score only the first N questions of each test set and N held-out scenes (default: all
#                       500 of each test set and 600 scenes)
#   INIT                the checkpoint to continue (required): the bundled model's weights with their per-patch
#                       heads are tiny_llava_qlook_digit3_qa1494.pt, which lab/training.md says how to get from git
set -euo pipefail
seconds=${1:?usage: gpu_train_arms.sh SECONDS NAME=FLAGS [NAME=FLAGS ...]}
shift
[ $# -ge 1 ] || { echo "give at least one arm, e.g. 'control='" >&2; exit 2; }
DEV=${DEV:-cuda}; WORKERS=${WORKERS:-7}; PY=${PY:-python3}; OUT=${OUT:-/tmp/out}
INIT=$(realpath "${INIT:?set INIT to the checkpoint to continue (lab/training.md: the bundled weights with their heads)}")
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repo root: benchmarks, vllm_tokcomp and lab/
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/lab${PYTHONPATH:+:$PYTHONPATH}"  # tokcomp_lab
work=$(mktemp -d)
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

$PY - <<'PY' 2>&1 | tee "$OUT/setup.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
from vllm_tokcomp.bench.accuracy import default_dataset
print("test split", default_dataset())
PY
if [ -z "${BUNDLED:-}" ]; then
  BUNDLED=$($PY -c "from vllm_tokcomp.bench.accuracy import model_or_default; print(model_or_default(None))" | tail -n 1)
fi
# the test sets each model is scored on, and their data folders (empty: the v1 test split, accuracy_positions.py's
# default); beside v1's (docs/dataset.md): the same 250 scenes drawn by spec v2 with strokes no arm trains on, and the
# harder split's 250 scenes
sets=(test strokes-2-5 harder)
declare -A set_data=([test]="" [strokes-2-5]="$work/strokes-2-5/test" [harder]="$work/harder/hard")
$PY -m vllm_tokcomp.data.generate "$work/strokes-2-5" --seed 0 --test 250 --spec-version 2 --strokes 2,5 \
  >> "$OUT/setup.log" 2>&1
$PY -m vllm_tokcomp.data.generate "$work/harder" --seed 0 --hard 250 >> "$OUT/setup.log" 2>&1
echo "bundled model $BUNDLED, setup $(elapsed)" | tee -a "$OUT/setup.log"

bf16=(); [ "$DEV" = cuda ] && bf16=(--bf16)
common=(--init "$INIT" --clip-steps 0 --qa-steps 100000 --time-limit "$seconds" --qa-batch 16 --qa-lr 5e-4
        --questions-per-image 16 --qa-dense-weight 0.5 --position-weight 0.3 --tower-lr-scale 1 --text-layers 8
        --look-weight 0.3 --compress-prob 0.5 --eval-squeeze uniform:64 --save-every 400 --eval-images 256
        --device "$DEV" "${bf16[@]}" --workers "$WORKERS" --threads 1 --tokenizer-json "$BUNDLED/tokenizer.json")
names=()
for arm in "$@"; do
  name=${arm%%=*}; flags=${arm#*=}
  [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bad arm name in '$arm'" >&2; exit 2; }
  names+=("$name")
  # shellcheck disable=SC2086 # the arm's flags are meant to split
  $PY -m tokcomp_lab.train.llava "$work/run-$name" "${common[@]}" $flags > "$OUT/train-$name.log" 2>&1 &
done
wait
echo "trained $(elapsed)"

score() {  # NAME MODEL-FOLDER: the three test sets one after another (one model on the device at a time per arm)
  local set data
  for set in "${sets[@]}"; do
    data=(); [ -n "${set_data[$set]}" ] && data=(--data "${set_data[$set]}")
    $PY lab/benchmarks/accuracy_positions.py --model "$2" --budgets "" ${LIMIT:+--limit "$LIMIT"} "${data[@]}" \
      --device "$DEV" --out "$OUT/$set-$1" >> "$OUT/eval-$1.log" 2>&1
  done
}
score bundled "$BUNDLED" &
for name in "${names[@]}"; do
  tail -n 2 "$OUT/train-$name.log"
  cp "$work/run-$name/model.safetensors" "$OUT/model-$name.safetensors"
  cp "$work/run-$name/weights_and_heads.pt" "$OUT/wh-$name.pt"
  cp "$work/run-$name/log.jsonl" "$OUT/log-$name.jsonl"
  # built, not copied from the bundled folder: an arm's config follows its weights (e.g. a --rope-theta arm)
  $PY -m vllm_tokcomp.tiny.llava_builder "$work/model-$name" --weights "$work/run-$name/model.safetensors" \
    > "$OUT/build-$name.log" 2>&1
  score "$name" "$work/model-$name" &
done
heldout=("bundled=$BUNDLED")
for name in "${names[@]}"; do heldout+=("$name=$OUT/model-$name.safetensors"); done
$PY lab/benchmarks/heldout.py "${heldout[@]}" --tokenizer "$BUNDLED/tokenizer.json" --device "$DEV" \
  ${LIMIT:+--scenes "$LIMIT"} --out "$OUT/heldout" > "$OUT/heldout.log" 2>&1 &
wait
echo "scored $(elapsed)"
for name in bundled "${names[@]}"; do
  for set in "${sets[@]}"; do
    $PY -c "import json; d = json.load(open('$OUT/$set-$name.json')); a = d['arms']['576']
print('$name', '$set', d['n'], round(a['accuracy'], 3), {k: round(v, 3) for k, v in a['per_type'].items()},
      {k: round(v, 3) for k, v in a.get('per_difficulty', {}).items()})" || echo "$name $set: scoring failed"
  done
done | tee "$OUT/summary.txt"
small=(setup.log summary.txt heldout.log)
if [ -f "$OUT/heldout.md" ]; then
  tee -a "$OUT/summary.txt" < "$OUT/heldout.md"; small+=(heldout.json heldout.md)
else
  echo "held-out scoring failed: see heldout.log" | tee -a "$OUT/summary.txt"
fi
for name in bundled "${names[@]}"; do
  for set in "${sets[@]}"; do [ -f "$OUT/$set-$name.json" ] && small+=("$set-$name.json"); done
  small+=("eval-$name.log")
done
for name in "${names[@]}"; do small+=("train-$name.log" "log-$name.jsonl"); done
tar czf "$OUT/small.tgz" -C "$OUT" "${small[@]}"
(cd "$OUT" && rm -f "${small[@]}" && for set in "${sets[@]}"; do rm -f "$set"-*.md; done)
rm -rf "$work"
ls -la "$OUT"
