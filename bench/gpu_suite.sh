#!/usr/bin/env bash
# The accelerator figures of bench/RESULTS.md in one short run (~10 min on one H100/H200).
#
#   bash bench/gpu_suite.sh [OUT_DIR] [PEAK_TFLOPS]
#
# Appends JSON lines to OUT_DIR/{panet,sccan,hdmnet,pahnet,symnet,ssp,pspnet}_gpu.jsonl (default
# bench/results); copy them into bench/results and run `python bench/results.py`.
# PEAK_TFLOPS (default 989: H100/H200 SXM dense bf16) gives the MFU column; float32 runs use
# TF32 matmuls unless jax_default_matmul_precision says otherwise.
# Official PyTorch checkouts for the JAX/PyTorch ratio: REFS=/path with panet/ sccan/ hdmnet/
# pahnet/ symnet/ ssp/ inside (kaixin96/PANet, Sam1224/SCCAN, Pbihao/HDMNet, tianyu-zou/PAHNet,
# Sunbaoquan/Sym-Net, fanq15/SSP); each missing one is skipped.
# SMOKE=1 runs every command at toy sizes (checks the command lines on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PEAK=${2:-989}
PY=${PY:-.venv/bin/python}
REFS=${REFS:-}
S=473; B8=8; B4=4; N=20; E=50; EP=1000; NS=5; IMG=600
if [[ "${SMOKE:-0}" == 1 ]]; then S=65; B8=2; B4=2; N=1; E=2; EP=2; NS=1; IMG=120; fi
mkdir -p "$OUT"

run() {  # file, then bench/run.py arguments; a failure is reported and the suite goes on
  local file=$1; shift
  echo "+ bench/run.py $*" >&2
  "$PY" bench/run.py "$@" --peak-tflops "$PEAK" --out "$OUT/$file" || echo "FAILED: $*" >&2
}

# 1. Evaluation throughput: 1000 one-shot episodes = steps x batch, scored at original size.
run sccan_gpu.jsonl --model sccan --mode eval --size $S --batch $E --steps $N --warmup 2 --eval-fn score
run sccan_gpu.jsonl --model sccan --mode eval --size $S --batch $E --steps $N --warmup 2 --eval-fn score --dtype bfloat16
run hdmnet_gpu.jsonl --model hdmnet --mode eval --size $S --batch $E --steps $N --warmup 2 --eval-fn score --score original
run panet_gpu.jsonl --model panet --mode eval --size $S --batch $E --steps $N --warmup 2 --eval-fn score
# 1b. The test protocol end to end (stored lists -> decode -> transform -> model -> scoring),
#     1000 episodes x 5 seeds, frozen-encoder cache on and off (bench/eval_protocol.py).
for model in sccan hdmnet; do
  for shot in 1 5; do
    run ${model}_gpu.jsonl --mode eval_protocol --model $model --size $S --shot $shot \
      --episodes $EP --seeds $NS --batch $B8 --num-images $IMG
  done
  run ${model}_gpu.jsonl --mode eval_protocol --model $model --size $S --shot 1 \
    --episodes $EP --seeds 1 --batch $B8 --num-images $IMG --no-cache
done
# 2. Backbone forward MFU (frozen dilated ResNet-50 + PPM of the base learner).
run pspnet_gpu.jsonl --model pspnet --mode eval --size $S --batch $E --steps $N --warmup 2
run pspnet_gpu.jsonl --model pspnet --mode eval --size $S --batch $E --steps $N --warmup 2 --dtype bfloat16
# 3. Training at the papers' batch and size, float32 and bf16.
for dt in float32 bfloat16; do
  run sccan_gpu.jsonl --model sccan --mode train --size $S --batch $B8 --steps $N --warmup 2 --dtype $dt
  run hdmnet_gpu.jsonl --model hdmnet --mode train --size $S --batch $B4 --steps $N --warmup 2 --dtype $dt
  run pahnet_gpu.jsonl --model sccan_pahnet --mode train --size $S --batch $B8 --steps $N --warmup 2 --dtype $dt
  run pahnet_gpu.jsonl --model hdmnet_pahnet --mode train --size $S --batch $B4 --steps $N --warmup 2 --dtype $dt
  run symnet_gpu.jsonl --model symnet --mode train --size $S --batch $B8 --steps $N --warmup 2 --dtype $dt
done
run panet_gpu.jsonl --model panet --mode train --size 417 --batch 1 --steps $N --warmup 2
# 4. JAX vs the official PyTorch code on the same device, training at the papers' batch.
#    model:checkout under REFS:size:batch:results file
for spec in panet:panet:417:1:panet sccan:sccan:$S:$B8:sccan hdmnet:hdmnet:$S:$B4:hdmnet \
            sccan_pahnet:pahnet:$S:$B8:pahnet hdmnet_pahnet:pahnet:$S:$B4:pahnet \
            symnet:symnet:$S:$B8:symnet ssp:ssp:$S:$B4:ssp; do
  IFS=: read -r model repo size batch file <<< "$spec"
  [[ -n "$REFS" && -d "$REFS/$repo" ]] || { echo "skipped compare $model: no \$REFS/$repo" >&2; continue; }
  jax_arg=(); [[ $model == symnet && $size != 473 ]] && jax_arg=(--jax-arg=--field=scales=\(\))
  "$PY" bench/compare.py --repo "$REFS/$repo" --model $model --mode train --size $size --batch $batch \
    --steps $N --warmup 2 "${jax_arg[@]}" --out "$OUT/${file}_gpu.jsonl" || echo "FAILED: compare $model" >&2
done
