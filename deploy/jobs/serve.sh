#!/usr/bin/env bash
# Serve a cache to the cluster as a Ray job: `actserve serve` on the head node, bound to all
# interfaces with a bearer token, shards fetched from S3 into a node-local cache. Runs until
# `ray job stop ID`. Prints the grpc:// location trainers connect to (SERVER for sweep.sh).
#
#   export ACTSERVE_TOKEN=$(openssl rand -hex 24)
#   CACHE_URL=s3://my-bucket/gpt2-small-resid deploy/jobs/serve.sh
#
# Environment [default]:
#   CACHE_URL        required: the cache to serve, s3://bucket/prefix
#   ACTSERVE_TOKEN   required: the bearer token every client must send; a server reachable from
#                    other nodes refuses to start without one
#   PORT             [8815] first port; with SERVERS=K, PORT..PORT+K-1
#   SERVERS          [1] server processes; one serves ~2 GB/s (deploy/README.md, sizing)
#   LOCAL_CACHE_GB   [200] bound of the node-local shard cache (the head's disk is 500 GB)
#   STORAGE_OPTIONS  [{}] fsspec options, JSON
#   EXTRA_ARGS       more `actserve serve` flags, split on spaces
#   WAIT_S           [300] how long to wait for the server to print its location
#   RAY_ADDRESS      [http://127.0.0.1:8265] the job server (`ray dashboard deploy/aws-cluster.yaml`)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

require CACHE_URL "the cache to serve, e.g. CACHE_URL=s3://my-bucket/gpt2-small-resid"
require ACTSERVE_TOKEN "the server's bearer token, e.g. export ACTSERVE_TOKEN=\$(openssl rand -hex 24)"
PORT=${PORT:-8815}
SERVERS=${SERVERS:-1}
LOCAL_CACHE_GB=${LOCAL_CACHE_GB:-200}
STORAGE_OPTIONS=${STORAGE_OPTIONS:-"{}"}
WAIT_S=${WAIT_S:-300}
read -ra extra <<< "${EXTRA_ARGS:-}"
whole PORT
whole SERVERS
whole WAIT_S
json_safe ACTSERVE_TOKEN
need_ray

id="actserve-serve-$(date -u +%Y%m%d-%H%M%S)"
# No entrypoint resources: a driver that asks for none runs on the head node, where the network
# and the shard cache disk are sized for serving. With SERVERS > 1 the server processes are Ray
# actors of 1 CPU each; Ray's default scheduling prefers the driver's node while it is less than
# half busy, so keep SERVERS well under half the head's 32 CPUs.
ray job submit --no-wait --submission-id "$id" \
  --runtime-env-json "{\"env_vars\": {\"ACTSERVE_TOKEN\": \"$ACTSERVE_TOKEN\"}}" \
  -- actserve serve --cache "$CACHE_URL" --host 0.0.0.0 --port "$PORT" --servers "$SERVERS" \
  --local-cache-gb "$LOCAL_CACHE_GB" --storage-options "$STORAGE_OPTIONS" \
  ${extra[@]+"${extra[@]}"} >&2   # stdout carries only the lines below: eval "$(serve.sh | grep ^export)"

# The server prints each grpc:// location on its own line once it listens.
deadline=$((SECONDS + WAIT_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  locations=$(ray job logs "$id" 2> /dev/null | grep -Eo '^grpc(\+tls)?://[^ ]+' || true)
  if [ -n "$locations" ]; then
    echo "serving $CACHE_URL at:"
    echo "$locations"
    echo "export SERVER=$(echo "$locations" | head -n 1)"
    echo "stop with: ray job stop $id"
    exit 0
  fi
  case $(ray job status "$id" 2> /dev/null) in
    *FAILED* | *STOPPED* | *SUCCEEDED*)
      ray job logs "$id" | tail -n 20 >&2
      die "the server job $id ended before listening (its log is above)" ;;
  esac
  sleep 5
done
die "no grpc:// location in the log of $id after ${WAIT_S}s; check: ray job logs $id"
