# Sourced by deploy/jobs/*.sh: the checks they share and how they reach the cluster.
# shellcheck shell=bash

# The cluster's job server. `ray dashboard deploy/aws-cluster.yaml` forwards it to this port.
# Set explicitly: with no address, `ray job submit` would start a local Ray and run the job here.
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

# A job driver that must run on a GPU node without holding a GPU: the `gpu_node` resource that
# the GPU node type of deploy/aws-cluster.yaml declares (1 per node, so up to 100 such drivers).
ON_GPU_NODE='{"gpu_node": 0.01}'

# tqdm reads TQDM_* defaults from the environment: one progress line per minute in the job log
# instead of ten per second.
PROGRESS_ENV='"TQDM_MININTERVAL": "60"'

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# require NAME HINT: NAME is set and not empty, or exit naming it.
require() {
  [ -n "${!1:-}" ] || die "$1 is not set: $2"
}

# whole NAME [0]: NAME is a whole number (> 0 unless the second argument is 0).
whole() {
  local value=${!1}
  [[ $value =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$value'"
  [ "${2:-1}" = 0 ] || [ "$value" -gt 0 ] || die "$1 must be > 0, got '$value'"
}

# json_safe NAME: NAME can sit inside a JSON string as is (no quote, backslash or control
# character); the scripts pass such values to the job through --runtime-env-json.
json_safe() {
  local value=${!1}
  [[ $value != *[\"\\]* && $value != *[[:cntrl:]]* ]] || die "$1 must not contain quotes, backslashes or control characters"
}

need_ray() {
  command -v ray > /dev/null 2>&1 \
    || die "the ray command is not on PATH: pip install 'ray[default]==2.60.0' (the cluster's Ray version)"
}
