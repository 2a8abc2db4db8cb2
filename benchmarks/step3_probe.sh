#!/usr/bin/env bash
# The step-3 candidates of issue 11 and the critic-free algorithms of issue 12 in one device call (see
# benchmarks/README.md): the baseline beside each lever alone, all of them together, GRPO and RLOO (4 answers
# per prompt, no critic) and DeepSpeed-Chat's LoRA recipe. On an 80 GB card the modes that keep the KV cache through training
# (release_memory false) do not fit at batch 256, so they run only where the card has room.
set -uo pipefail
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# Most telling first: each row is appended to $OUT/step3_rows.jsonl as it comes, so a call cut short keeps
# them (`step3_throughput.py --report DIR` prints the tables from what is there).
runs="baseline:256"
if [ "${mem:-0}" -gt 100000 ]; then runs="$runs tuned:256"; fi
runs="$runs tuned_release:256 rollout_lp:256 grpo:256 rloo:256 baseline:32"
if [ "${mem:-0}" -gt 100000 ]; then runs="$runs tuned:32"; fi
runs="$runs tuned_release:32 rollout_lp_z1:256 rollout_lp_kv32:256 lora_rollout_lp:256 rollout_lp:32"
python3 benchmarks/step3_throughput.py --no-check --steps 2 --out "${OUT:-.}" --runs $runs "$@"
