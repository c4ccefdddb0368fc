#!/usr/bin/env bash
# PPD's upper bound from the issue: a per-user DPO LoRA (the trainers' shipped `embedded_dpo.yaml`)
# trained on each user's own 1000 decided pairs, evaluated on the prompts and seeds that
# `diffpref world eval --users FILE --prompts 60 --steps 20` uses for PPD (the trainer's end evaluation
# with `eval_prompts=60`, seed 0, is that same set). PPD reads a user from K pairs; this reads 1000.
#
#   bash bench/ppd_dpo_upper_bound.sh [USERS_FILE] [OUT_DIR]      # 12 unseen users: ~25 min on 2 cores
#   DPO_OVERRIDES="max_train_steps=900 eval_every=300" bash bench/ppd_dpo_upper_bound.sh   # longer, with a curve
#
# Data: the PPD pool (`data/world_ppd_pool`'s sources, see configs/embedded_ppd.yaml) rated by each
# user alone (`world relabel --decided-only`, into data/world_dpo_upper/USER), so no new images are drawn.
# Writes OUT_DIR/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
users_file=${1:-configs/users/ppd_unseen.json}
out=${2:-outputs/ppd_dpo_upper_bound}
pool=(data/world_ppd_p02/pairs.parquet data/world_ppd_p02b/pairs.parquet)
for f in "${pool[@]}"; do
  [ -e "$f" ] || { echo "missing $f: make the PPD pool first (commands in configs/embedded_ppd.yaml)" >&2; exit 1; }
done
mkdir -p "$out"
mapfile -t ids < <(python -c "
import sys
from diffpref.world.users import load_users, save_users
for user in load_users(sys.argv[1]):
    save_users([user], f'$out/{user.user_id}.json')
    print(user.user_id)" "$users_file")

one_user() {
  local id=$1
  [ -e "$out/$id/summary.json" ] && return 0
  # the data depend on the user alone: runs with other DPO_OVERRIDES share them
  [ -e "data/world_dpo_upper/$id/pairs.parquet" ] || diffpref world relabel --pool "${pool[@]}" --users-file "$out/$id.json" \
      --pairs-per-user 1000 --decided-only --seed 11 --out "data/world_dpo_upper/$id" > "$out/$id.log" 2>&1
  diffpref train --config configs/embedded_dpo.yaml data_path="data/world_dpo_upper/$id/pairs.parquet" output_dir="$out/$id" \
      eval_every=0 eval_prompts=60 threads=1 report_to=none ${DPO_OVERRIDES:-} >> "$out/$id.log" 2>&1
  echo "$id done" >&2
}
# two lanes of single-threaded jobs (2 cores)
for ((i = 0; i < ${#ids[@]}; i += 2)); do
  one_user "${ids[i]}" &
  if ((i + 1 < ${#ids[@]})); then one_user "${ids[i+1]}" & fi
  wait
done
python - "$out" "${ids[@]}" <<'EOF'
import json, os, sys
from pathlib import Path
out, ids = Path(sys.argv[1]), sys.argv[2:]
per_user = {}
for uid in ids:
    run = json.loads((out / uid / "summary.json").read_text())
    final = run["eval"]
    history = [json.loads(line) for line in (out / uid / "history.jsonl").read_text().splitlines()]
    curve = {h["step"]: h["win_rate_vs_base"] for h in history if "win_rate_vs_base" in h}
    curve[run["steps"]] = final["win_rate_vs_base"]
    per_user[uid] = {"win_rate": final["win_rate_vs_base"], "adherence": final["adherence"],
                     "base_adherence": final["base_adherence"], "win_rate_by_step": curve}
mean = lambda values: sum(values) / len(values)
steps = sorted(set.intersection(*(set(v["win_rate_by_step"]) for v in per_user.values())))
summary = {"overrides": os.environ.get("DPO_OVERRIDES", ""),
           "win_rate_vs_base": mean([v["win_rate"] for v in per_user.values()]),
           "win_rate_by_step": {s: mean([v["win_rate_by_step"][s] for v in per_user.values()]) for s in steps},
           "adherence": mean([v["adherence"] for v in per_user.values()]),
           "base_adherence": mean([v["base_adherence"] for v in per_user.values()]), "per_user": per_user}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "per_user"}))
EOF
