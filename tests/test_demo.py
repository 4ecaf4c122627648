"""The README's main command, at reduced size: `./dev demo --tokens N --workdir DIR`."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The two commands of the README's quickstart block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_quickstart_is_what_ci_and_this_test_run():
    demo, tests = readme_commands()
    assert demo == "./dev demo" and tests == "./dev test"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./dev test$", ci, re.M), ci


def test_failed_setup_is_one_line_naming_the_free_disk(tmp_path):
    """`./dev`'s install failing (here an unknown torch version; on a CI machine, a full disk) ends in
    one line that says how much disk was free, and the environment is not marked installed."""
    venv = tmp_path / "venv"
    env = {**os.environ, "ACTSERVE_VENV": str(venv), "ACTSERVE_TORCH": "torch==0.0.1"}
    proc = subprocess.run(["./dev", "python", "-c", "pass"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.fullmatch(rf"\./dev: 'pip install torch==0\.0\.1' failed with \d+ MB free on {re.escape(str(venv))}'s disk "
                        r"\(the environment takes about 2\.5 GB\)", last), last
    assert not list(venv.glob(".actserve-installed-*"))


@pytest.mark.slow
def test_demo_at_reduced_size(tmp_path):
    demo, _ = readme_commands()
    tokens = 131_072
    proc = subprocess.run([*demo.split(), "--tokens", str(tokens), "--eval-tokens", "16384", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / f"demo-{tokens}" / "demo.json").read_text())
    results = report["results"]
    layers = {r["layer"] for r in results if r["architecture"] == "standard"}
    assert layers == {0, 1, 2, 3}  # a row per layer of the tiny model
    assert {r["architecture"] for r in results} == {"standard", "jumprelu", "topk"}  # compared on the middle layer
    assert all(r["l0"] < r["d_sae"] / 8 for r in results)  # sparse, even at this budget
    out = tmp_path / f"demo-{tokens}"
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "features" / "index.html").exists()
    assert f"{out / 'features' / 'index.html'}" in proc.stdout
    for r in results:
        assert r["status"] == "ok" and 0 < r["explained_variance"] <= 1 and r["ce_recovered"] is not None
        assert Path(r["density_png"]).stat().st_size > 1000
    table = (tmp_path / f"demo-{tokens}" / "eval" / "eval.md").read_text()
    assert len(table.splitlines()) == 2 + len(results) and "CE recovered" in table
    assert "CE recovered" in proc.stdout  # the table is printed


@pytest.mark.parametrize("flag", ["--tokens", "--eval-tokens"])
def test_demo_rejects_bad_token_counts(tmp_path, capsys, flag):
    from actserve.cli import main as cli_main

    assert cli_main(["demo", "--workdir", str(tmp_path / "w"), flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"actserve: error: {flag} must be > 0, got 0"
    assert not (tmp_path / "w").exists()  # nothing made before the input is checked
