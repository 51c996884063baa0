#!/usr/bin/env bash
# The main job on a fresh machine: set up, then quantize the embedded SmolLM2-135M to 3 and 4
# bits (per channel and with groups of 64 and 128) and print the WikiText-2 perplexity table.
#   usage: bash scripts/main_job.sh [--windows N]   (default 8 windows of 2048 tokens; 0 = all)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/ppl_table.py --out ppl_table.json "$@"
