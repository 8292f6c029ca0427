#!/usr/bin/env bash
# The CPU rows of RESULTS.md's protocol table: cached vs plain vs the official forward, SCCAN and
# HDMNet at 241 px, 1- and 5-shot, one after the other (run on an otherwise idle machine).
#
#   REFS=/tmp/refs bash bench/eval_protocol_cpu.sh [EPISODES] [PLAIN_EPISODES]
#
# The plain path costs the same per episode however long the list, so it runs PLAIN_EPISODES
# (default 6) per seed; the cached path EPISODES (default 100) per seed, 2 seeds each.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/eval_protocol_cpu.jsonl}
REFS=${REFS:-}
EP=${1:-100}; PLAIN=${2:-6}
for model in sccan hdmnet; do
  for shot in 1 5; do
    "$PY" bench/run.py --mode eval_protocol --model $model --size 241 --shot $shot \
      --episodes $EP --seeds 2 --out "$OUT" || echo "FAILED: $model $shot cached" >&2
    "$PY" bench/run.py --mode eval_protocol --model $model --size 241 --shot $shot \
      --episodes $PLAIN --seeds 2 --no-cache --out "$OUT" || echo "FAILED: $model $shot plain" >&2
    if [[ -n "$REFS" && -d "$REFS/$model" ]]; then
      "$PY" bench/torch_ref.py --repo "$REFS/$model" --model $model --mode eval --size 241 \
        --batch 1 --shot $shot --steps 3 --warmup 1 --device cpu --out "$OUT" \
        || echo "FAILED: $model $shot official" >&2
    fi
  done
done
