"""deploy/: the `ray up` cluster YAMLs, the `ray job submit` scripts and the example sweep file.

Cluster YAMLs are checked the way `ray up` checks them before it calls AWS
(ray.autoscaler._private.commands._bootstrap_config): `prepare_config` merges the provider's
defaults (ray/autoscaler/aws/defaults.yaml supplies cluster_synced_files, docker, ...), folds
setup_commands into head/worker_setup_commands and fills per-type min/max workers; then
`validate_config` checks the result against ray/autoscaler/ray-schema.json with jsonschema and
demands cluster_synced_files. Validating the raw file with validate_config would fail on that
field alone, which no hand-written YAML carries. The one step of `ray up` left out is the AWS
provider's resource autodetection (DescribeInstanceTypes), which only fills node types that omit
`resources`; ours declare theirs, and a test below holds them to it.

Job scripts are run for real against a stub `ray` on PATH that records its arguments: with a
required variable missing they must exit non-zero naming it without calling ray, and with every
variable set they must submit the intended entrypoint.
"""
from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
JOBS = DEPLOY / "jobs"
CLUSTER_YAMLS = sorted(DEPLOY.glob("*cluster*.yaml"))
SCRIPTS = sorted(JOBS.glob("*.sh"))
ENTRY_SCRIPTS = [p for p in SCRIPTS if p.name != "lib.sh"]

CACHE = "s3://test-bucket/gpt2-small-resid"
TOKEN = "0123456789abcdef"
SERVER = "grpc://ip-10-0-1-23:8815"
# Each entry script's required variables, with values that pass its checks.
REQUIRED = {
    "build_cache.sh": {"CACHE_URL": CACHE},
    "serve.sh": {"CACHE_URL": CACHE, "ACTSERVE_TOKEN": TOKEN},
    "sweep.sh": {"CACHE_URL": CACHE, "SERVER": SERVER, "ACTSERVE_TOKEN": TOKEN},
    "evaluate.sh": {"CACHE_URL": CACHE, "SAES": "/mnt/actserve/sweeps/x/saes/*"},
}

# A stand-in for the ray CLI: writes its arguments, NUL-separated, to a new numbered file in
# $RAY_CALLS, copies a --working-dir's files to $RAY_CALLS.workdir (the script deletes its own),
# and for `ray job logs` prints a location the way `actserve serve` does.
FAKE_RAY = """#!/usr/bin/env bash
n=$(ls "$RAY_CALLS" | wc -l)
printf '%s\\0' "$@" > "$RAY_CALLS/$(printf %03d "$n")"
prev=
for arg in "$@"; do
  if [ "$prev" = --working-dir ]; then cp -r "$arg" "$RAY_CALLS.workdir"; fi
  prev=$arg
done
if [ "$1 $2" = "job logs" ]; then echo "grpc://ip-10-0-1-23:8815"; fi
exit 0
"""


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yamls_exist():
    assert CLUSTER_YAMLS, "no deploy/*cluster*.yaml"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_validates_against_rays_schema_as_ray_up_does(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_schema_check_rejects_what_ray_up_would(path):
    """The check above has teeth: the same YAML with a fractional GPU count, or an unknown
    top-level key, fails it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    worker = next(n for n, t in config["available_node_types"].items() if t["resources"].get("GPU"))
    fractional = copy.deepcopy(config)
    fractional["available_node_types"][worker]["resources"]["GPU"] = 0.5
    typo = {**copy.deepcopy(config), "setup_command": ["true"]}
    for bad in (fractional, typo):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_declares_what_the_jobs_rely_on(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is the CPU node"
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker node type with its GPUs declared"
    # the resource the job scripts ask for to put a driver on a GPU node
    (resource,) = json.loads(lib_value("ON_GPU_NODE"))
    for node_type in types.values():
        assert node_type["resources"].get("CPU", 0) > 0, "resources declared, not autodetected"
        assert "IamInstanceProfile" in node_type["node_config"], "S3 through an instance profile"
    for node_type in gpu_types:
        assert node_type["resources"].get(resource) == 1
        assert node_type["max_workers"] >= node_type["min_workers"] >= 0
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())


def test_iam_policies_are_json():
    for path in sorted((DEPLOY / "iam").glob("*.json")):
        assert json.loads(path.read_text())["Statement"], path.name


def lib_value(name: str) -> str:
    out = subprocess.run(["bash", "-c", f'. "$1"; printf %s "${name}"', "-", str(JOBS / "lib.sh")],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_job_script_is_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_entry_script_is_covered_and_executable():
    assert {p.name for p in ENTRY_SCRIPTS} == set(REQUIRED)
    for path in ENTRY_SCRIPTS:
        assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"


@pytest.fixture
def fake_ray(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    calls = tmp_path / "ray-calls"
    calls.mkdir()
    return calls


def run_script(name: str, calls: Path, env: dict) -> subprocess.CompletedProcess:
    """The script with nothing in its environment but PATH (the stub ray first), RAY_CALLS and `env`."""
    path = f"{calls.parent / 'bin'}:/usr/bin:/bin"
    return subprocess.run([str(JOBS / name)], env={"PATH": path, "RAY_CALLS": str(calls), **env},
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def submitted(calls: Path) -> list[list[str]]:
    """The argument lists of every ray call, in order."""
    return [f.read_text().split("\0")[:-1] for f in sorted(calls.iterdir())]


@pytest.mark.parametrize("name,missing", [(n, v) for n, req in REQUIRED.items() for v in req])
def test_job_script_names_a_missing_variable_before_calling_ray(fake_ray, name, missing):
    env = {k: v for k, v in REQUIRED[name].items() if k != missing}
    result = run_script(name, fake_ray, env)
    assert result.returncode != 0
    assert missing in result.stderr and "not set" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert submitted(fake_ray) == []


def test_job_script_rejects_a_bad_number(fake_ray):
    result = run_script("build_cache.sh", fake_ray, {**REQUIRED["build_cache.sh"], "TOKENS": "3e8"})
    assert result.returncode != 0 and "TOKENS" in result.stderr
    assert submitted(fake_ray) == []


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_build_cache_submits_cache_build_on_a_gpu_node(fake_ray):
    result = run_script("build_cache.sh", fake_ray, {**REQUIRED["build_cache.sh"], "EXTRA_ARGS": "--shard-mb 64"})
    assert result.returncode == 0, result.stderr
    (args,) = submitted(fake_ray)
    assert args[:2] == ["job", "submit"]
    assert json.loads(option(args, "--entrypoint-resources")) == json.loads(lib_value("ON_GPU_NODE"))
    json.loads(option(args, "--runtime-env-json"))
    entry = args[args.index("--") + 1:]
    assert entry[:3] == ["actserve", "cache", "build"]
    assert option(entry, "--out") == CACHE
    assert option(entry, "--hooks") == "blocks.*.hook_resid_pre"   # one argument, not globbed here
    assert option(entry, "--tokens") == "300000000"
    assert option(entry, "--shard-mb") == "64"


def test_serve_binds_all_interfaces_with_the_token_and_prints_the_location(fake_ray):
    result = run_script("serve.sh", fake_ray, REQUIRED["serve.sh"])
    assert result.returncode == 0, result.stderr
    assert f"export SERVER={SERVER}" in result.stdout
    submit = submitted(fake_ray)[0]
    assert "--no-wait" in submit and "--entrypoint-resources" not in submit   # on the head
    env = json.loads(option(submit, "--runtime-env-json"))["env_vars"]
    assert env["ACTSERVE_TOKEN"] == TOKEN
    entry = submit[submit.index("--") + 1:]
    assert entry[:2] == ["actserve", "serve"]
    assert option(entry, "--host") == "0.0.0.0" and option(entry, "--cache") == CACHE


def test_sweep_ships_only_the_sweep_file_and_fills_it_in_on_the_cluster(fake_ray, tmp_path):
    result = run_script("sweep.sh", fake_ray, {**REQUIRED["sweep.sh"], "TOKENS": "2000000"})
    assert result.returncode == 0, result.stderr
    (args,) = submitted(fake_ray)
    workdir = Path(f"{fake_ray}.workdir")
    assert sorted(p.name for p in workdir.iterdir()) == ["sweep.yaml"]
    assert (workdir / "sweep.yaml").read_text() == (DEPLOY / "sweep-gpt2.yaml").read_text()
    env = json.loads(option(args, "--runtime-env-json"))["env_vars"]
    assert (env["CACHE_URL"], env["SERVER"], env["ACTSERVE_TOKEN"]) == (CACHE, SERVER, TOKEN)
    entry = args[args.index("--") + 1:]
    assert entry[:2] == ["bash", "-c"]
    # run the cluster-side command here, with a stub actserve, and check the file it resolves
    stub = tmp_path / "stub-bin"
    stub.mkdir()
    (stub / "actserve").write_text('#!/usr/bin/env bash\ncp "$2" resolved-copy.yaml\n')
    (stub / "actserve").chmod(0o755)
    (stub / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # one with pyyaml
    (stub / "python").chmod(0o755)
    run = subprocess.run(entry, cwd=workdir, capture_output=True, text=True, timeout=60,
                         env={**env, "PATH": f"{stub}:/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load((workdir / "resolved-copy.yaml").read_text())
    assert (resolved["cache"], resolved["server"], resolved["token"]) == (CACHE, SERVER, TOKEN)
    assert resolved["tokens"] == 2_000_000 and resolved["out"] == load(DEPLOY / "sweep-gpt2.yaml")["out"]
    assert resolved["grid"] == load(DEPLOY / "sweep-gpt2.yaml")["grid"]


def test_evaluate_expands_sae_patterns_on_the_cluster(fake_ray, tmp_path):
    result = run_script("evaluate.sh", fake_ray, REQUIRED["evaluate.sh"])
    assert result.returncode == 0, result.stderr
    (args,) = submitted(fake_ray)
    assert option(args, "--entrypoint-num-gpus") == "1"
    entry = args[args.index("--") + 1:]
    assert entry[:2] == ["bash", "-c"] and entry[4] == REQUIRED["evaluate.sh"]["SAES"]
    # the cluster-side script: globs expand there, and only directories with a cfg.json count
    for name in ("a", "b", "not an sae"):
        (tmp_path / "saes" / name).mkdir(parents=True)
    for name in ("a", "b"):
        (tmp_path / "saes" / name / "cfg.json").write_text("{}")
    stub = tmp_path / "stub-bin"
    stub.mkdir()
    (stub / "actserve").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (stub / "actserve").chmod(0o755)
    cluster_args = [str(tmp_path / "saes" / "*"), CACHE, "/tmp/out", "cuda", "1000", "{}"]
    run = subprocess.run(entry[:4] + cluster_args, capture_output=True, text=True, timeout=30,
                         env={"PATH": f"{stub}:/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    got = run.stdout.splitlines()
    assert got[0] == "eval"
    assert [got[i + 1] for i, a in enumerate(got) if a == "--sae"] == [str(tmp_path / "saes" / n) for n in ("a", "b")]
    assert option(got, "--max-tokens") == "1000" and option(got, "--cache") == CACHE
    empty = subprocess.run(entry[:4] + [str(tmp_path / "none" / "*")] + cluster_args[1:], capture_output=True,
                           text=True, timeout=30, env={"PATH": f"{stub}:/usr/bin:/bin"})
    assert empty.returncode != 0 and "no SAE directory" in empty.stderr


def test_frontier_sweep_compares_every_architecture_at_equal_l0():
    from actserve.clients.sweep_spec import load_sweep, sweep_points

    points = sweep_points(load_sweep(str(DEPLOY / "sweep-gpt2-frontier.yaml")))
    assert {(p.architectures[0], p.target_l0s[0]) for p in points} == {
        (arch, float(l0)) for arch in ("standard", "gated", "jumprelu", "topk", "batchtopk") for l0 in (16, 32, 64)}
    assert len({p.out for p in points}) == len(points) == 15


def test_example_sweep_is_gpt2_smalls_seed_grid():
    from actserve.clients.sweep_spec import load_sweep, sweep_points

    spec = load_sweep(str(DEPLOY / "sweep-gpt2.yaml"))
    points = sweep_points(spec)
    assert [p.hook for p in points] == [f"blocks.{i}.hook_resid_pre" for i in range(12)]
    for p in points:
        assert (p.architectures, p.expansions, p.target_l0s) == (("standard",), (32,), (32.0,))
        assert (p.tokens, p.batch_size, p.device) == (300_000_000, 4096, "cuda")
    assert spec.gpus_per_trainer == 0.25
    assert spec.out.startswith("/mnt/actserve/")   # the directory every node shares
