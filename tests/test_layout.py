"""The package's shape: one import name, dependencies that run one way, an install beside proto-plus."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# repository folder -> installed package, lowest layer first: a layer imports only layers before it
LAYERS = [("proto", "actserve.proto"), ("sae", "actserve.sae"), ("services", "actserve.services"),
          ("offline", "actserve.offline"), ("clients", "actserve.clients"), ("actserve", "actserve")]


def module_name(path: Path) -> str:
    folder, package = next((f, p) for f, p in LAYERS if path.parts[len(REPO.parts)] == f)
    rest = path.relative_to(REPO / folder).with_suffix("").parts
    rest = rest[:-1] if rest[-1] == "__init__" else rest
    return ".".join((package, *rest))


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in the file (function bodies included,
    so that no local import can hide a cycle)."""
    files = [p for folder, _ in LAYERS for p in (REPO / folder).rglob("*.py") if not p.name.endswith("_pb2.py")]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    return max(i for i, (_, package) in enumerate(LAYERS) if module == package or module.startswith(package + "."))


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_dependencies_run_one_way():
    graph = import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if layer_of(t) > layer_of(m) and t != "actserve")  # the root package only holds __version__
    assert not upward, "imports from a higher layer: " + "; ".join(upward)
    assert all(t.startswith("actserve.sae") for m, ts in graph.items() if m.startswith("actserve.sae") for t in ts)
    testing_users = sorted(m for m, ts in graph.items() if "actserve.testing" in ts)
    assert not testing_users, f"the service imports test helpers: {testing_users}"


@pytest.mark.slow
def test_wheel_installs_beside_proto_plus(tmp_path):
    """Installed from its wheel, actserve adds one top-level name; proto-plus (import name `proto`)
    installs and imports beside it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("actserve-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "proto-plus"], check=True, capture_output=True)
    check = (
        "import importlib, importlib.metadata as md, actserve, actserve.proto.stream_pb2, proto\n"
        "assert 'proto-plus' in {d.metadata['Name'] for d in md.distributions()}, 'no proto-plus'\n"
        "assert 'site-packages' in proto.__file__ and hasattr(proto, 'Message'), proto.__file__\n"
        "for name in ('services', 'clients', 'sae', 'offline'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise AssertionError(f'{name} is importable')\n"
        "print(sorted(p.parts[0] for p in map(__import__('pathlib').PurePath, (str(f) for f in md.files('actserve')))"
        " if not p.parts[0].endswith(('.dist-info', '.pth')) and p.parts[0] != '..'))\n"
    )
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert set(eval(out.stdout)) == {"actserve"}, out.stdout  # besides the `actserve` script


def test_cli_defaults_are_the_option_dataclasses_defaults():
    """Every flag whose name is a field of the command's options dataclass defaults to that field's
    default: defaults are written once, in the dataclass (the flags are generated from it; demo's
    three are written beside DemoOptions, whose module imports the whole pipeline)."""
    import dataclasses

    from actserve.cli import build_parser, dataclass_from_args
    from actserve.clients.eval_options import EvalOptions, FeatureOptions
    from actserve.clients.train_options import TrainOptions
    from actserve.demo import DemoOptions
    from actserve.services.build_options import BuildOptions, WeightProcessing
    from actserve.services.serve_options import ServeOptions

    parser = build_parser()
    build = ("cache", "build", "--model", "m", "--dataset", "d", "--hooks", "h", "--tokens", "1", "--out", "o")
    commands = {
        build: BuildOptions,
        ("eval", "--sae", "s", "--cache", "c", "--out", "o"): EvalOptions,
        ("features", "--sae", "s", "--cache", "c", "--out", "o"): FeatureOptions,
        ("serve", "--cache", "c"): ServeOptions,
        ("train", "--server", "s", "--cache", "c", "--hook", "h", "--tokens", "1", "--out", "o"): TrainOptions,
        ("demo",): DemoOptions,
    }
    checked = 0
    for argv, options in commands.items():
        args = vars(parser.parse_args(list(argv)))
        for f in dataclasses.fields(options):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in args and default is not dataclasses.MISSING:
                value = args[f.name]
                value = tuple(value) if f.metadata.get("repeat") else json.loads(value) if isinstance(default, dict) else value
                assert value == default, f"{' '.join(argv[:2])} --{f.name}: {value!r} != {default!r}"
                checked += 1
    assert checked > 60
    switched = parser.parse_args([*build, "--no-fold-ln", "--storage-options", '{"anon": true}'])
    assert dataclass_from_args(BuildOptions, switched, processing=dataclass_from_args(WeightProcessing, switched)) == \
        BuildOptions(model="m", dataset="d", hooks="h", tokens=1, out="o", storage_options={"anon": True},
                     processing=WeightProcessing(fold_ln=False))
