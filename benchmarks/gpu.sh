#!/usr/bin/env bash
# The CUDA tests plus the GPU benchmarks, in one go, in under 10 minutes on one GPU.
# Writes every figure under results/benchmarks/<machine>/ (JSON, with the machine named) and a
# log of what ran. On the lent GPU machine (torch, no ray/nibabel): first build the carry here
# once with ../shared/tools/gpu-carry.sh, then run, with carry [".gpu-carry"]:
#   bash .gpu-carry/install.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu.sh
# Each step has its own time limit so one slow step cannot eat the others' time; a failed step
# is recorded and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')")
if [ "$gpu" = none ]; then echo "gpu.sh: no CUDA device visible to torch" >&2; exit 2; fi
machine=$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
out=results/benchmarks/$machine
mkdir -p "$out"
log=$out/gpu-run.log
{ echo "machine: $gpu"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } | tee "$log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
}

data_args=()
if [ -d ../shared/data/Task04_Hippocampus ]; then data_args=(--data ../shared/data/Task04_Hippocampus); fi

step cuda-tests 90 python3 -m pytest -q -m cuda tests/trainers/test_cuda.py -p no:cacheprovider
step loss 120 python3 benchmarks/bench_loss.py --device cuda --out "$out/bench_loss.json"
step ray-stage 150 python3 benchmarks/bench_ray_stage.py --device cuda "${data_args[@]}" --out "$out/bench_ray_stage.json"
step packing 120 python3 benchmarks/bench_packing.py --device cuda "${data_args[@]}" --out "$out/bench_packing.json"
# fused fine-tunes: K = 1, 2, 4 batch-8 fine-tunings fused (vmap and loop passes) vs separate;
# synthetic slices (no data preparation in the time limit); goal: vs_one >= 3 at K = 4
step fused 90 python3 benchmarks/bench_fused.py --device cuda --k 1 2 4 --passes vmap loop --base-channels 32 --steps-per-epoch 20 --epochs 3 --rounds 2 --out "$out/bench_fused.json"
echo "figures in $out" | tee -a "$log"
