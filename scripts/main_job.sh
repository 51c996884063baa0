#!/usr/bin/env bash
# The main job on a fresh machine (CPU is enough, ~15 min on 2 cores):
#   1. set up (scripts/setup.sh);
#   2. quantize the embedded SmolLM2-135M to 3 and 4 bits (per channel, groups of 64 and 128)
#      and print the WikiText-2 perplexity table (ppl_table.json);
#   3. PEQA: fine-tune only the scales of the 3-bit (g128) model on WikiText-2 validation
#      (recipe smollm2_w3_wikitext, into runs/main-w3) and print test perplexity before and
#      after (main_w3_eval.json).
#   usage: bash scripts/main_job.sh [--windows N]   (ppl table: first N windows of 2048 tokens; 0 = all)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/ppl_table.py --out ppl_table.json "$@"
peqa finetune smollm2_w3_wikitext --out runs/main-w3 --overwrite
peqa eval runs/main-w3/base --delta runs/main-w3/final --tasks wikitext --limit 8 \
  --json main_w3_eval.json
