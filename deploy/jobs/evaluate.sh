#!/usr/bin/env bash
# Evaluate SAEs as a Ray job: `actserve eval` on one GPU of the cluster, against the cache's
# held-out eval split (read from S3). Writes eval.json, eval.md and density plots to OUT.
# A sweep already evaluates its SAEs; use this for SAEs trained elsewhere or a longer evaluation.
#
#   CACHE_URL=s3://my-bucket/gpt2-small-resid SAES='/mnt/actserve/sweeps/gpt2-resid-pre/saes/*' \
#     deploy/jobs/evaluate.sh
#
# Environment [default]:
#   CACHE_URL        required: the cache the SAEs were trained on
#   SAES             required: SAE directories on the cluster, space-separated; glob patterns are
#                    expanded there (quote them here), and only directories with a cfg.json count
#   OUT              [/mnt/actserve/eval/<UTC date-time>] report directory on the cluster
#   MAX_TOKENS       [the whole eval split] eval tokens to use
#   DEVICE           [cuda]
#   GPUS             [1 with DEVICE=cuda, else 0] GPUs reserved for the evaluator; with 0 it runs
#                    on the head node
#   STORAGE_OPTIONS  [{}] fsspec options, JSON
#   RAY_ADDRESS      [http://127.0.0.1:8265] the job server (`ray dashboard deploy/aws-cluster.yaml`)
#
# Logs follow until the job ends; Ctrl-C stops following, not the job.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

require CACHE_URL "the cache the SAEs were trained on, e.g. CACHE_URL=s3://my-bucket/gpt2-small-resid"
require SAES "SAE directories on the cluster, e.g. SAES='/mnt/actserve/sweeps/gpt2-resid-pre/saes/*'"
OUT=${OUT:-/mnt/actserve/eval/$(date -u +%Y%m%d-%H%M%S)}
MAX_TOKENS=${MAX_TOKENS:-}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then GPUS=${GPUS:-0}; else GPUS=${GPUS:-1}; fi
STORAGE_OPTIONS=${STORAGE_OPTIONS:-"{}"}
[ -z "$MAX_TOKENS" ] || whole MAX_TOKENS
whole GPUS 0
need_ray

# Runs on the cluster: $1 SAES, $2 CACHE_URL, $3 OUT, $4 DEVICE, $5 MAX_TOKENS, $6 STORAGE_OPTIONS.
remote='set -euo pipefail
saes=()
for pattern in $1; do
  for dir in $pattern; do
    if [ -f "$dir/cfg.json" ]; then saes+=(--sae "$dir"); fi
  done
done
[ ${#saes[@]} -gt 0 ] || { echo "evaluate: no SAE directory with a cfg.json matches SAES=$1" >&2; exit 2; }
args=(--cache "$2" --out "$3" --device "$4" --storage-options "$6")
if [ -n "$5" ]; then args+=(--max-tokens "$5"); fi
exec actserve eval "${saes[@]}" "${args[@]}"'

# A whole GPU for the evaluator's model and SAEs; reserving it also places the driver on a GPU
# node (CUDA_VISIBLE_DEVICES names the reserved one). Reserving nothing pins it to the head.
ray job submit \
  --entrypoint-num-gpus "$GPUS" \
  --runtime-env-json "{\"env_vars\": {$PROGRESS_ENV}}" \
  -- bash -c "$remote" evaluate "$SAES" "$CACHE_URL" "$OUT" "$DEVICE" "$MAX_TOKENS" "$STORAGE_OPTIONS"
echo "report: $OUT on the cluster (ray rsync-down deploy/aws-cluster.yaml $OUT/ ./eval/)"
