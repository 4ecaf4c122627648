#!/usr/bin/env bash
# Run a sweep as a Ray job: `actserve sweep FILE` with its driver on a GPU node, one trainer task
# per grid point (gpus_per_trainer each) reading from a running `serve.sh` server, then the
# evaluator over every SAE and the results table in the file's `out:` directory.
#
#   CACHE_URL=s3://my-bucket/gpt2-small-resid SERVER=grpc://ip-10-0-1-23:8815 deploy/jobs/sweep.sh
#
# Environment [default]:
#   CACHE_URL       required: the cache, as the server serves it (replaces the file's `cache:`)
#   SERVER          required: the grpc:// location serve.sh printed (replaces `server:`)
#   ACTSERVE_TOKEN  required: the server's bearer token (replaces `token:`)
#   SWEEP           [deploy/sweep-gpt2.yaml] the sweep file, on this machine
#   OUT             [the file's `out:`] results directory on the cluster; keep it under
#                   /mnt/actserve, the directory every node shares
#   TOKENS          [the file's `tokens:`] tokens per trainer, e.g. 2000000 for a smoke test
#   RAY_ADDRESS     [http://127.0.0.1:8265] the job server (`ray dashboard deploy/aws-cluster.yaml`)
#
# The file travels alone as the job's working directory. A repository copy there would go first on
# PYTHONPATH and shadow the package `ray up` installed on the nodes, all but the generated proto
# modules (.gitignore keeps them out of the upload): two versions of the code in one job. Code
# reaches the cluster through `ray up` (file_mounts + pip install -e). The values above are filled
# in on the cluster, so the token is never written into a file here.
# Logs follow until the job ends; Ctrl-C stops following, not the job.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

require CACHE_URL "the cache URL the server serves, e.g. CACHE_URL=s3://my-bucket/gpt2-small-resid"
require SERVER "the location deploy/jobs/serve.sh printed, e.g. SERVER=grpc://ip-10-0-1-23:8815"
require ACTSERVE_TOKEN "the token the server was started with (deploy/jobs/serve.sh)"
SWEEP=${SWEEP:-$(dirname "$0")/../sweep-gpt2.yaml}
OUT=${OUT:-}
TOKENS=${TOKENS:-}
[ -f "$SWEEP" ] || die "SWEEP=$SWEEP: no such file"
[[ $SERVER =~ ^grpc(\+tls)?://[^/]+:[0-9]+$ ]] || die "SERVER must look like grpc://HOST:PORT, got '$SERVER'"
[ -z "$TOKENS" ] || whole TOKENS
for name in CACHE_URL SERVER ACTSERVE_TOKEN OUT; do json_safe "$name"; done
need_ray

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
cp "$SWEEP" "$workdir/sweep.yaml"

# Runs on the cluster, in the working directory: the sweep file with the environment's values.
resolve='import os, yaml
spec = yaml.safe_load(open("sweep.yaml"))
spec.update(cache=os.environ["CACHE_URL"], server=os.environ["SERVER"], token=os.environ["ACTSERVE_TOKEN"])
if os.environ.get("OUT"):
    spec["out"] = os.environ["OUT"]
if os.environ.get("TOKENS"):
    spec["tokens"] = int(os.environ["TOKENS"])
yaml.safe_dump(spec, open("resolved.yaml", "w"), sort_keys=False)'

env_json="{\"env_vars\": {$PROGRESS_ENV, \"CACHE_URL\": \"$CACHE_URL\", \"SERVER\": \"$SERVER\",
  \"ACTSERVE_TOKEN\": \"$ACTSERVE_TOKEN\", \"OUT\": \"$OUT\", \"TOKENS\": \"$TOKENS\"}}"
ray job submit \
  --working-dir "$workdir" \
  --entrypoint-resources "$ON_GPU_NODE" \
  --runtime-env-json "$env_json" \
  -- bash -c "python -c '$resolve' && exec actserve sweep resolved.yaml"
