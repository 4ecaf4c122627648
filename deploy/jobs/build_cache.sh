#!/usr/bin/env bash
# Build an activation cache as a Ray job: `actserve cache build` on the cluster, one model-host
# actor per GPU, shards written straight to S3. Rerun with the same settings to resume.
#
#   CACHE_URL=s3://my-bucket/gpt2-small-resid deploy/jobs/build_cache.sh
#
# Environment [default]:
#   CACHE_URL        required: where the cache goes, s3://bucket/prefix
#   MODEL            [gpt2] TransformerLens name, or a Hugging Face GPT-2 directory on the nodes
#   DATASET          [Skylion007/openwebtext] Hugging Face dataset (streamed), or a path on the nodes
#   HOOKS            [blocks.*.hook_resid_pre] hook names and/or patterns, comma-separated
#   TOKENS           [300000000] train-split tokens
#   EVAL_TOKENS      [1000000] held-out eval-split tokens
#   CONTEXT_SIZE     [128] tokens per sequence, BOS included
#   DTYPE            [float16]
#   ACTORS           [4] model hosts, one GPU each (4 = one g5.12xlarge)
#   STORAGE_OPTIONS  [{}] fsspec options, JSON: '{"client_kwargs": {"endpoint_url": "https://..."}}'
#   EXTRA_ARGS       more `actserve cache build` flags, split on spaces
#   RAY_ADDRESS      [http://127.0.0.1:8265] the job server (`ray dashboard deploy/aws-cluster.yaml`)
#
# The driver runs on a GPU node (see ON_GPU_NODE in lib.sh): `cache build` gives its model hosts
# a GPU each only when the driver itself sees CUDA. Logs follow until the job ends; Ctrl-C stops
# following, not the job (`ray job stop ID` does that).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

require CACHE_URL "where the cache goes, e.g. CACHE_URL=s3://my-bucket/gpt2-small-resid"
MODEL=${MODEL:-gpt2}
DATASET=${DATASET:-Skylion007/openwebtext}
HOOKS=${HOOKS:-blocks.*.hook_resid_pre}
TOKENS=${TOKENS:-300000000}
EVAL_TOKENS=${EVAL_TOKENS:-1000000}
CONTEXT_SIZE=${CONTEXT_SIZE:-128}
DTYPE=${DTYPE:-float16}
ACTORS=${ACTORS:-4}
STORAGE_OPTIONS=${STORAGE_OPTIONS:-"{}"}
read -ra extra <<< "${EXTRA_ARGS:-}"
whole TOKENS
whole EVAL_TOKENS 0
whole CONTEXT_SIZE
whole ACTORS
need_ray

exec ray job submit \
  --entrypoint-resources "$ON_GPU_NODE" \
  --runtime-env-json "{\"env_vars\": {$PROGRESS_ENV}}" \
  -- actserve cache build \
  --model "$MODEL" --dataset "$DATASET" --hooks "$HOOKS" \
  --tokens "$TOKENS" --eval-tokens "$EVAL_TOKENS" --context-size "$CONTEXT_SIZE" --dtype "$DTYPE" \
  --out "$CACHE_URL" --storage-options "$STORAGE_OPTIONS" --actors "$ACTORS" \
  ${extra[@]+"${extra[@]}"}
