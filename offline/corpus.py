"""English prose that every machine already has: the Python standard library's own documentation.

`write_stdlib_corpus` collects the docstrings of the standard library's modules, classes,
functions and methods, plus the reference-manual topics that `pydoc` ships (`pydoc_data.topics`),
and writes them as JSON lines `{"text": ...}`, readable by `datasets.load_dataset("json", ...)`.
The content is a pure function of the Python build: modules are walked in sorted order, members
in sorted order, and repeated texts are kept once.

Importing several hundred modules has side effects (signal handlers, readline completers, printed
output, cached module objects), so the walk runs in a child interpreter started in isolated mode
(`-I -S`): no site-packages, so no third-party package can shadow or patch a standard module
(setuptools replaces `distutils`, for example), and the caller's process stays untouched.
"""

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import warnings

# Modules whose import opens a browser or a window, prints, or starts an application.
SKIPPED_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo"})
# Script entry points run when imported; test suites are not documentation.
SKIPPED_NAME_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})

# One-line docstrings such as "Return self==value." carry little prose.
MIN_DOC_CHARS = 40


def write_stdlib_corpus(path) -> int:
    """Write the standard library's docstrings to `path` as JSON lines; return the document count."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial_path = path + ".partial"
    child = subprocess.run(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), partial_path],
        capture_output=True,  # modules that print on import must not reach the caller's terminal
        text=True,
        timeout=600,
    )
    if child.returncode != 0:
        raise RuntimeError(f"collecting standard-library docstrings failed: {child.stderr.strip()[-2000:]}")
    os.replace(partial_path, path)
    return int(child.stdout.strip().splitlines()[-1])


def _module_names() -> list[str]:
    """Every importable standard-library module and submodule worth reading, sorted by dotted name.

    Private modules are included: many public classes are defined, and documented, in them
    (concurrent.futures._base, importlib._bootstrap, _pydecimal).
    """
    names = []
    for top_name in sorted(sys.stdlib_module_names):
        if _is_skipped(top_name):
            continue
        module = _import_or_none(top_name)
        if module is None:
            continue
        names.append(top_name)
        if hasattr(module, "__path__"):
            for submodule in pkgutil.walk_packages(module.__path__, prefix=top_name + ".", onerror=lambda _: None):
                if not _is_skipped(submodule.name):
                    names.append(submodule.name)
    return sorted(set(names))


def _is_skipped(dotted_name: str) -> bool:
    parts = dotted_name.split(".")
    return parts[0] in SKIPPED_MODULES or any(
        part in SKIPPED_NAME_PARTS or part.startswith(("test_", "_test")) for part in parts
    )


def _import_or_none(name):
    try:
        return importlib.import_module(name)
    except Exception:  # platform-specific or optional modules (winreg, curses without ncurses...)
        return None


def _documented_objects(module):
    """The module, then its own classes and functions, then each class's documented members."""
    yield module
    for _, member in sorted(vars(module).items()):
        # Re-exported names are documented where they are defined.
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            yield member
            for _, attribute in sorted(vars(member).items()):
                if inspect.isroutine(attribute) or isinstance(attribute, (property, classmethod, staticmethod)):
                    yield attribute
        elif inspect.isroutine(member):
            yield member


def _docstring(obj) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    return doc if len(doc) >= MIN_DOC_CHARS else None


def _collect_texts() -> list[str]:
    texts = []
    for name in _module_names():
        module = _import_or_none(name)
        if module is None:
            continue
        texts.extend(doc for doc in map(_docstring, _documented_objects(module)) if doc)
        if name == "pydoc_data.topics":
            # The language reference's prose, as `help("if")` shows it.
            texts.extend(inspect.cleandoc(text).strip() for _, text in sorted(module.topics.items()))
    return list(dict.fromkeys(texts))  # drop repeats, keep first occurrences in order


def _write_jsonl(texts: list[str], path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    # Child-interpreter entry point used by write_stdlib_corpus.
    warnings.simplefilter("ignore")  # deprecated modules warn on import
    collected = _collect_texts()
    _write_jsonl(collected, sys.argv[1])
    print(len(collected))
