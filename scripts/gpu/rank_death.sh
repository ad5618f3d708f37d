#!/usr/bin/env bash
# On a 2-GPU machine, after a build (scripts/gpu/build.sh): what a surviving rank does when its
# peer dies without our launcher to notice (ranks started by hand, as torchrun or srun start
# them), over NCCL: configs/sizes/60m.yaml on synthetic tokens, distributed.timeout_s=20, rank 1
# killed with SIGKILL after step 3. Prints rank 0's exit status, how long it took to exit, and
# its last lines (what the user sees); logs in $OUT/rank_death_*.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/syn
export NCCL_NVLS_ENABLE=0
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
port=$(( 20000 + RANDOM % 20000 ))
for r in 0 1; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port build-gpu/hybrid-train \
    --config configs/sizes/60m.yaml --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set data.eos_id=100257 \
    --set trainer.global_batch_size=8 --set trainer.micro_batch_size=4 --set trainer.max_steps=100000 \
    --set trainer.eval_interval=0 --set checkpoint.interval=0 --set checkpoint.save_final=false \
    --set distributed.timeout_s=20 --run-dir /tmp/rank_death >"$OUT/rank_death_$r.log" 2>&1 &
  eval "pid$r=$!"
done
for _ in $(seq 300); do grep -q "step 3/" "$OUT/rank_death_0.log" 2>/dev/null && break; sleep 0.2; done
kill -9 "$pid1"
SECONDS=0
while kill -0 "$pid0" 2>/dev/null && [ $SECONDS -lt 120 ]; do sleep 1; done
kill -0 "$pid0" 2>/dev/null && { echo "rank 0 still running after 120 s: killing it"; kill -9 "$pid0"; }
wait "$pid0"
echo "rank 0 exited with status $? ${SECONDS} s after rank 1 was killed (distributed.timeout_s 20); its last lines:"
tail -n 5 "$OUT/rank_death_0.log"
