#!/usr/bin/env bash
# Every quality number in the README comes from this script, then `diffpref world report`.
# It runs on 2 CPU cores: two lanes of single-threaded jobs side by side. Each step is skipped when
# its output already exists, so an interrupted run continues where it stopped.
#
#   bash bench/world_experiments.sh            # all (about three and a half hours on 2 cores)
#   diffpref world report --results outputs --out reports/world
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
run() { local done_marker=$1; shift; [ -e "$done_marker" ] && return 0; "$@"; }

# 1. Data: two users with different tastes for the single-user trainers; for PPD, a pool of pairs
#    (generated for 48 users) that 96 other users rate (configs/embedded_ppd.yaml explains why).
for user in red_large dark_small; do
  run data/world_$user/pairs.parquet diffpref world make-data --out data/world_$user \
      --users-file configs/users/$user.json --pairs-per-user 1000 --seed 0 --steps 15 --batch-size 100 &
done
wait
run data/world_ppd_p02/pairs.parquet diffpref world make-data --out data/world_ppd_p02 \
    --users-file configs/users/ppd_train.json --pairs-per-user 64 --seed 1 --steps 15 --batch-size 100 --name-prob 0.2 &
run data/world_ppd_p02b/pairs.parquet diffpref world make-data --out data/world_ppd_p02b \
    --users-file configs/users/ppd_train.json --pairs-per-user 192 --seed 3 --steps 15 --batch-size 100 --name-prob 0.2 &
wait
run data/world_ppd_pool/pairs.parquet diffpref world relabel \
    --pool data/world_ppd_p02/pairs.parquet data/world_ppd_p02b/pairs.parquet \
    --users-file configs/users/ppd_train_pool.json --pairs-per-user 400 --decided-only --seed 5 --out data/world_ppd_pool

# 2. Single-user preference tuning: DPO, InPO, KTO, MaPO on each user (LoRA, shipped defaults).
for method in dpo inpo kto mapo; do
  for user in red_large dark_small; do
    run outputs/${method}_$user/summary.json diffpref train --config configs/embedded_$method.yaml \
        data_path=data/world_$user/pairs.parquet output_dir=outputs/${method}_$user threads=1 report_to=none &
  done
  wait
done

# 3. PPD: one model for all 96 training users (configs/users/ppd_train_pool.json, from `diffpref world make-users`).
run outputs/embedded_ppd/ppd_config.json diffpref train --config configs/embedded_ppd.yaml threads=1 report_to=none

# 4. PPD evaluation: shots curve for unseen users, seen users at K=4, per-user DPO users, interpolation.
mkdir -p outputs/ppd_eval
python -c "
from diffpref.world.users import load_users, save_users
save_users(load_users('configs/users/ppd_train_pool.json')[:8], 'outputs/ppd_eval/seen_users.json')
save_users(load_users('configs/users/red_large.json') + load_users('configs/users/dark_small.json'), 'outputs/ppd_eval/dpo_users.json')"
# written to .tmp first: an interrupted eval must not leave a file that marks it done
ev() { local name=$1; shift; run outputs/ppd_eval/$name.json sh -c "diffpref world eval --adapter outputs/embedded_ppd --steps 20 --json $* > outputs/ppd_eval/$name.json.tmp && mv outputs/ppd_eval/$name.json.tmp outputs/ppd_eval/$name.json"; }
for k in 4 1 2 8; do ev unseen_k$k --users configs/users/ppd_unseen.json --shots $k --prompts 100; done &
{ ev seen_k4 --users outputs/ppd_eval/seen_users.json --shots 4 --prompts 100
  ev dpo_users_k4 --users outputs/ppd_eval/dpo_users.json --shots 4 --prompts 200
  run outputs/ppd_eval/interpolation.json python -m diffpref.experiments.interpolation --adapter outputs/embedded_ppd \
      --users configs/users/opposites.json --out outputs/ppd_eval/interpolation.json; } &
wait

# 4b. The issue's upper bound on the unseen users themselves: a per-user DPO LoRA from 1000 of each user's
#     pairs, against PPD with 4 and 32 shots on the same 60 prompts and seeds.
ev unseen_k4_p60 --users configs/users/ppd_unseen.json --shots 4 --prompts 60 &
ev unseen_k32_p60 --users configs/users/ppd_unseen.json --shots 32 --prompts 60 &
wait
run outputs/ppd_dpo_upper_bound/summary.json bash bench/ppd_dpo_upper_bound.sh configs/users/ppd_unseen.json \
    outputs/ppd_dpo_upper_bound
# the same bound trained longer, and at lower betas (name of the run, then its DPO_OVERRIDES)
for variant in "900:max_train_steps=900 eval_every=300" "beta1000:beta=1000" "beta250:beta=250"; do
  name=${variant%%:*}
  run outputs/ppd_dpo_upper_bound_$name/summary.json env DPO_OVERRIDES="${variant#*:}" \
      bash bench/ppd_dpo_upper_bound.sh configs/users/ppd_unseen.json outputs/ppd_dpo_upper_bound_$name
done

# 5. The app: the 12 unseen users as simulated raters answer the rating service's pairs, active vs random.
run outputs/app_raters.json python -m diffpref.experiments.simulate --users configs/users/ppd_unseen.json --ratings 10 \
    --prompts 32 --candidate-prompts 2 --out outputs/app_raters.json > /dev/null
