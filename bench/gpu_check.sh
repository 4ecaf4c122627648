#!/usr/bin/env bash
# The GPU figures of bench/README.md in one run on a lent device machine, which has Python 3.12,
# PyTorch with CUDA, pyarrow, transformers and numpy but not Ray, TransformerLens, datasets or
# actserve, and reaches no package index. Three commands:
#
#   bench/gpu_check.sh pack   # here: what that machine lacks, in the versions of this project's
#                             # environment, built for CPython 3.12 x86-64, as .gpu-kit/site.tar.xz
#   bench/gpu_check.sh run    # there: unpacks it to /tmp/site and runs the benchmarks; logs to $OUT
#   bench/gpu_check.sh build  # there: where the build's time goes (bench/build_parts.py), then the
#                             # build to the disk and to memory (/dev/shm)
#
# With the device tool (the kit, the tiny model's tokenizer and the corpus travel as carried paths):
#   run(command="bench/gpu_check.sh run", timeout_s=570,   # the steps' limits add up to 9 minutes
#       carry=[".gpu-kit", "actserve-work/tiny-model", "actserve-work/corpus.jsonl"])
#   run(command="bench/gpu_check.sh build", timeout_s=570, carry=[...the same])
#
# The kit leaves out Ray's Java jars, dashboard web client and libraries (RLlib, Tune, Serve, Train,
# Data), which actserve does not use, so that it fits one call's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.gpu-kit
# what the device image lacks; versions are this project's environment's
packages=(ray transformer-lens better-abc beartype fancy-einsum typeguard datasets dill
          multiprocess zlib-ng simple-parsing docstring-parser jsonschema jsonschema-specifications referencing rpds-py
          protobuf)
ray_unused=(jars rllib tune serve train data llm dashboard/client)

pack() {
  # the environment whose versions the kit takes, and the tiny model and corpus the run needs
  ./dev python -c "from pathlib import Path; from actserve.demo import prepare_model; prepare_model(Path('actserve-work'))"
  local pins stage
  pins=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
         "${packages[@]}")
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --target "$stage/site" $pins
  .venv/bin/python -m pip install -q --no-deps --upgrade --target "$stage/site" .  # actserve, its protos generated here
  for dir in "${ray_unused[@]}"; do rm -rf "$stage/site/ray/$dir"; done
  rm -rf "$stage/site/bin"
  mkdir -p "$kit"
  tar -cJf "$kit/site.tar.xz" -C "$stage/site" .
  echo "$kit/site.tar.xz: $(du -m "$kit/site.tar.xz" | cut -f1) MiB (one device call carries at most 64 MiB)"
}

step() {  # step LOG COMMAND...: the command's output to the screen and $out/LOG; a failure is reported, not fatal
  local log=$1
  shift
  "$@" 2>&1 | tee "$out/$log" || echo "gpu_check: $log: exit status ${PIPESTATUS[0]}" | tee -a "$out/$log"
}

unpack() {  # the kit to /tmp/site, on the path; then into a folder outside the checkout
  out=${OUT:-/tmp/gpu-check}
  repo=$PWD
  if [ ! -f "$kit/site.tar.xz" ]; then
    echo "gpu_check: no $kit/site.tar.xz here: run 'bench/gpu_check.sh pack' on the machine with the project's environment, and carry $kit" >&2
    exit 1
  fi
  mkdir -p /tmp/site /tmp/gpu-check-run /dev/shm/actserve-work "$out"
  tar -xJf "$kit/site.tar.xz" -C /tmp/site
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  # from elsewhere: Ray puts the driver's directory on its workers' path, and the checkout's actserve/
  # folder is not the installed package (its subpackages live at the checkout's top level)
  cd /tmp/gpu-check-run
}

machine() {  # the machine, and the write speed of the disk the cache goes to, which bounds a build:
  # 2 GiB written and flushed by one stream, then by 4 at once (a build's writers write in parallel)
  nvidia-smi -L; nproc; free -g | head -2; df -h "$repo" | tail -1
  dd if=/dev/zero of="$repo/actserve-work/dd.tmp" bs=16M count=128 conv=fsync 2>&1 | tail -1
  local start i
  start=$(date +%s%N)
  for i in 1 2 3 4; do
    dd if=/dev/zero of="$repo/actserve-work/dd$i.tmp" bs=16M count=32 conv=fsync 2>/dev/null &
  done
  wait
  echo "4 streams at once, flushed: 2 GiB in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  rm -f "$repo"/actserve-work/dd*.tmp
}

run() {
  unpack
  step device.txt machine
  step versions.txt timeout 60 python3 -c "import torch, ray, transformer_lens, pyarrow, actserve.services.build; print('torch', \
torch.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'GPU', torch.cuda.get_device_name())"
  # each step has its own limit, so that one that hangs leaves the others their time; the most
  # wanted figures first. The build: GPT-2 small's shape, random weights, all 12 hook_resid_pre,
  # float16, local disk; the GPU's utilisation sampled beside it
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 >"$out/gpu_util.csv" 2>&1 &
  local smi=$!
  step cache_build.log timeout 240 python3 "$repo/bench/cache_build.py" --workdir "$repo/actserve-work" \
    --gpt2-small-random --tokens 262144 --reps 2
  kill "$smi" || true
  # a GPT-2-small-sized SAE trainer on the GPU, fed by the stream vs from GPU memory
  step trainer.log timeout 120 python3 "$repo/bench/trainer.py" --gpt2-small /tmp/actserve-gpt2-synthetic \
    --tokens 1048576 --device cuda
  # one stream to the CPU and to the GPU
  step stream.log timeout 60 python3 "$repo/bench/stream.py" --dir /tmp/actserve-bench --stream-hooks 1 --shards 16 \
    --epochs 2 --repeat 3
}

build() {  # where a GPU build's time goes: its parts apart, then the build to the disk and to memory
  unpack
  step device.txt machine
  step build_parts.log timeout 240 python3 "$repo/bench/build_parts.py" --workdir "$repo/actserve-work"
  step build_to_disk.log timeout 150 python3 "$repo/bench/cache_build.py" --workdir "$repo/actserve-work" \
    --gpt2-small-random --tokens 262144 --reps 2
  cp -r "$repo/actserve-work/tiny-model" "$repo/actserve-work/corpus.jsonl" /dev/shm/actserve-work/
  step build_to_memory.log timeout 130 python3 "$repo/bench/cache_build.py" --workdir /dev/shm/actserve-work \
    --gpt2-small-random --tokens 262144 --reps 1
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  build) build ;;
  *) echo "usage: bench/gpu_check.sh pack|run|build" >&2; exit 2 ;;
esac
