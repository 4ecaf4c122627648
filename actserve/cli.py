"""The `actserve` command. Each subcommand's flags are generated from the options dataclass of the
module that does the work (BuildOptions, ServeOptions, TrainOptions, EvalOptions, FeatureOptions:
defaults and help written once, on their fields), parsed and validated here, at the edge.

Those dataclasses live in light modules; the modules that do the work (TransformerLens, Ray, Arrow
Flight) are imported by the subcommand that runs them, so that `--help` and the light commands
start at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import typing
from pathlib import Path

from actserve.clients import sweep_spec
from actserve.clients.eval_options import EvalOptions, FeatureOptions
from actserve.clients.train_options import TrainOptions
from actserve.services.build_options import BuildOptions, WeightProcessing
from actserve.services.data import DatasetError
from actserve.services.serve_options import ServeOptions
from actserve.services.storage import CacheError

EPILOG = """examples:
  actserve demo                                   # the whole pipeline, offline, on this machine
  actserve tiny-model --out models/tiny           # the small offline GPT-2-architecture model
  actserve cache build --model models/tiny --dataset corpus.jsonl \\
      --hooks 'blocks.*.hook_resid_pre' --tokens 1000000 --eval-tokens 50000 --out cache/tiny
  actserve cache info cache/tiny
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default where there is one to show: not for switches, required
    flags or empty defaults, nor where the help text states it already."""

    def _get_help_string(self, action):
        if action.required or action.nargs == 0 or action.default in (None, "", (), [], "{}") or "default" in action.help:
            return action.help
        if isinstance(action.default, tuple):  # a comma-list flag's default, as it would be typed
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Bad input found at the edge: printed as one line, exit code 2."""


def parse_json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON ({e.msg} at position {e.pos}): {text!r}") from e
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


# --- subcommands -------------------------------------------------------------------------------


def cmd_tiny_model(args) -> int:
    from actserve.offline.tiny_model import make_tiny_model

    result = make_tiny_model(args.out, seed=args.seed, train_seconds=args.seconds, max_steps=args.steps)
    print(json.dumps(result, indent=1))
    return 0


def cmd_cache_build(args) -> int:
    from actserve.services.build import build_cache
    from actserve.services.manifest import summary

    opts = dataclass_from_args(BuildOptions, args, processing=dataclass_from_args(WeightProcessing, args))
    manifest = build_cache(opts, progress=not args.quiet, ray_address=args.ray_address)
    print(summary(manifest, opts.out))
    return 0


def cmd_cache_info(args) -> int:
    from actserve.services.manifest import manifest_to_json, read_manifest, summary

    options = parse_json_object(args.storage_options, "--storage-options")
    manifest = read_manifest(args.url, options)
    if manifest is None:
        raise CacheError(f"no cache at {args.url} (no manifest.json there)")
    print(manifest_to_json(manifest) if args.json else summary(manifest, args.url), end="" if args.json else "\n")
    return 0


def cmd_cache_verify(args) -> int:
    from actserve.services.verify import verify_cache

    problems = verify_cache(args.url, parse_json_object(args.storage_options, "--storage-options"))
    for problem in problems:
        print(f"{args.url}: {problem}")
    if problems:
        print(f"actserve: error: {len(problems)} problem(s) in {args.url}", file=sys.stderr)
        return 2
    print(f"{args.url}: verified: complete, every shard's size, checksum and pages sound")
    return 0


def csv_of(kind, flag: str):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma list of {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values
    return parse


def cmd_train(args) -> int:
    from actserve.clients.trainer import train_from_server

    opts = dataclass_from_args(TrainOptions, args)
    paths = train_from_server(opts, args.server, args.cache, token=os.environ.get(args.token_env),
                              progress=not args.quiet, reconnect_timeout=args.reconnect_timeout)
    for path in paths:
        print(path)
    return 0


def cmd_eval(args) -> int:
    from actserve.clients.evaluator import eval_table, evaluate

    opts = dataclass_from_args(EvalOptions, args)
    print(eval_table(evaluate(opts, progress=not args.quiet)), end="")
    print(f"report: {Path(opts.out) / 'eval.json'}, {Path(opts.out) / 'eval.md'}, density PNGs in {opts.out}")
    return 0


def cmd_features(args) -> int:
    from actserve.clients.features import build_feature_browser

    opts = dataclass_from_args(FeatureOptions, args)
    index = build_feature_browser(opts, progress=not args.quiet)
    print(f"feature browser: {index}")
    print(f"per SAE, in {opts.out}/<SAE>/: top_activations.parquet, features.parquet, summary.json, index.html")
    return 0


def cmd_sweep(args) -> int:
    from actserve.clients.sweep import run_sweep
    from actserve.clients.sweep_spec import load_sweep

    results = run_sweep(load_sweep(args.sweep), progress=not args.quiet)
    spec_out = Path(load_sweep(args.sweep).out)
    print((spec_out / "results.md").read_text(), end="")
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} points trained; table: {spec_out / 'results.csv'}")
    return 1 if failed else 0


def run_serve_command(args) -> int:
    from actserve.services.run_server import serve

    serve(dataclass_from_args(ServeOptions, args))
    return 0


def cmd_demo(args) -> int:
    from actserve.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(workdir=Path(args.workdir), tokens=args.tokens, eval_tokens=args.eval_tokens))


# --- parser ------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name.replace("_", "-"))


def flag_fields(cls):
    """(field, type, flag) of each field of the options dataclass `cls` that has --help text
    (services/options.py); the command sets the others itself."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name], flag_name(f)) for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls` (flag_fields), with its default and help from the field: tuples
    take comma lists (or, with `repeat`, the flag repeated), dicts a JSON object, bools are
    switches (a field defaulting to True is switched off), fields without a default are required."""
    for f, kind, flag in flag_fields(cls):
        kwargs = {"help": f.metadata["help"], "dest": f.name}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if kind is bool:
            p.add_argument(flag, action="store_false" if f.default else "store_true", **kwargs)
            continue
        kwargs["metavar"] = f.metadata.get("metavar", flag[2:].upper().replace("-", "_"))
        if kind is dict:  # parsed in dataclass_from_args, so that bad JSON is one line like other bad input
            kwargs["default"] = json.dumps(kwargs["default"])
        elif typing.get_origin(kind) is tuple and f.metadata.get("repeat"):
            kwargs["action"] = "append"
            if "default" in kwargs:
                kwargs["default"] = list(kwargs["default"])  # argparse appends to a copy of a list default
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = csv_of(typing.get_args(kind)[0], flag)
            kwargs["metavar"] += ",..."
        else:
            kwargs["type"] = next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            del kwargs["metavar"]
        p.add_argument(flag, **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, **fields):
    """`cls` from its flags' values (add_dataclass_flags) and the other `fields` given."""
    for f, kind, flag in flag_fields(cls):
        value = getattr(args, f.name)
        if kind is dict:
            value = parse_json_object(value, flag)
        elif f.metadata.get("repeat"):  # the repeated flag's list
            value = tuple(value)
        fields[f.name] = value
    return cls(**fields)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; its func runs the server and returns 0."""
    p = subparsers.add_parser(
        "serve", help="stream cached activations over Arrow Flight",
        description="Serve one or more activation caches over Arrow Flight (gRPC): shuffled, exactly-once "
                    "epochs for trainers, whole sequences for evaluators. Prints each grpc:// location, runs "
                    "until interrupted. Wire contract: proto/stream.proto.",
        formatter_class=HelpFormatter)
    add_dataclass_flags(p, ServeOptions)
    p.set_defaults(func=run_serve_command)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actserve",
        description="Compute transformer activations once, cache them as Parquet on any fsspec URL "
                    "(local disk, s3://), and stream them to SAE trainers and evaluators.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end run on this machine: model, cache, server, trainers, eval",
                       description="Make the offline tiny model (once), cache every layer's residual stream on local "
                                   "disk, serve it over Arrow Flight, train one SAE per layer (plus JumpReLU and TopK on the middle layer) "
                                   "concurrently against the server, evaluate them and print the seed-style table.")
    p.add_argument("--workdir", default="actserve-work", help="where the model, corpus and cache go (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="train tokens to cache (at most what the local corpus holds, ~0.5M) and to train each SAE on "
                        "(several epochs when the cache holds fewer) (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=100_000, help="held-out eval tokens (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tiny-model", help="train the small offline GPT-2-architecture model",
                       description="Train a small GPT-2-architecture model and its BPE tokenizer on the "
                                   "Python standard library's docstrings (present on every machine), "
                                   "deterministic for a seed, saved as a Hugging Face model directory "
                                   "that --model accepts.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=None, help="training time budget instead of the default 800 steps")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --seconds; deterministic)")
    p.set_defaults(func=cmd_tiny_model)

    cache = sub.add_parser("cache", help="build or inspect an activation cache").add_subparsers(
        dest="cache_command", required=True, metavar="SUBCOMMAND")
    p = cache.add_parser(
        "build", help="run a dataset through the model and cache hook activations",
        description="Run a tokenized dataset through a TransformerLens model on Ray actors and write "
                    "the activations of every requested hook, from one forward pass, as Parquet shards "
                    "plus manifest.json. Rerunning the same command resumes an interrupted build.",
        formatter_class=HelpFormatter)
    add_dataclass_flags(p, BuildOptions)
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(p, WeightProcessing)
    p.set_defaults(func=cmd_cache_build)

    add_serve_parser(sub)

    p = sub.add_parser(
        "train", help="train SAEs on one hook's activations streamed from a server",
        description="Train one SAE (or several configs on the same batches: comma lists in --arch, --expansion, "
                    "--l1-coefficient, --k, --lr) on one hook, streaming shuffled activations from an actserve "
                    "server. Checkpoints every --checkpoint-every tokens; rerun the same command to resume. "
                    "Writes the SAE in SAELens's layout (cfg.json, sae_weights.safetensors, sparsity.safetensors) "
                    "and metrics.jsonl.",
        formatter_class=HelpFormatter)
    p.add_argument("--server", required=True, help="grpc:// location of `actserve serve`")
    p.add_argument("--cache", required=True, help="cache name or URL, as the server serves it")
    add_dataclass_flags(p, TrainOptions)
    p.add_argument("--token-env", default="ACTSERVE_TOKEN", help="environment variable holding the server's bearer token")
    p.add_argument("--reconnect-timeout", type=float, default=60.0,
                   help="seconds to keep retrying (with backoff) an unreachable server before giving up")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="CE-loss-recovered scoring of SAEs on the cache's eval split",
        description="Score SAEs on the cache's held-out eval split: CE clean / with reconstruction / zero-ablated, "
                    "CE recovered, KL, explained variance, L0, L1, alive and dense features, norm ratio. "
                    "Residual hooks run only the layers after the hook, from the cached activations. Writes "
                    "eval.json, eval.md (the seed's table) and a log10 feature-density PNG per SAE.",
        formatter_class=HelpFormatter)
    add_dataclass_flags(p, EvalOptions)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "features", help="feature browser: what each SAE feature fires on in the eval split",
        description="Encode the cache's eval split with each SAE (no model forward: the activations are cached) "
                    "and keep, in one pass with bounded memory, every feature's firing density, max activation, "
                    "top-K activating tokens with their context, a histogram of its activations and, for "
                    "residual-stream hooks, the tokens its decoder direction promotes and suppresses (logit lens). "
                    "Writes top_activations.parquet, features.parquet and a static HTML browser (OUT/index.html) "
                    "that opens from the file system.",
        formatter_class=HelpFormatter)
    add_dataclass_flags(p, FeatureOptions)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("sweep", help="train a grid of SAEs concurrently on Ray, then evaluate them",
                       description=sweep_spec.__doc__,  # the sweep file's format
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = cache.add_parser("info", help="print a cache's summary", description="Print the summary of the cache at URL.")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print manifest.json instead")
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options")
    p.set_defaults(func=cmd_cache_info)

    p = cache.add_parser("verify", help="check every shard of a cache fully",
                         description="Read every committed shard of the cache at URL: size, whole-file sha256 (when "
                                     "the manifest records it), every data page's checksum, row count. Prints one "
                                     "line per problem; exit code 2 when there is any.")
    p.add_argument("url")
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options")
    p.set_defaults(func=cmd_cache_verify)
    return parser


def error_message(e: BaseException) -> str:
    """One line for the user; Ray wraps errors raised inside actors, so unwrap to the cause."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


OS_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.EADDRINUSE: "the address (port) is already in use",
             errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}


def os_errno(e: OSError) -> int | None:
    """The error's errno; pyarrow's OSErrors leave it None and carry it in the text ("[errno 28]")."""
    if e.errno is not None:
        return e.errno
    match = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
    return int(match.group(1)) if match else None


def os_error_message(e: OSError) -> str:
    """One line for an expected system failure (disk full, port in use, permission denied...)."""
    cause = getattr(e, "cause", None)  # raised in a Ray actor
    if isinstance(cause, OSError):
        e = cause
    what = OS_ERRORS.get(os_errno(e))
    where = f": {e.filename}" if e.filename else f": {e.strerror}" if e.strerror else ""
    if what:
        return f"{what}{where}"
    return error_message(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, CacheError, DatasetError, ConnectionError) as e:
        print(f"actserve: error: {error_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, port in use, permission denied, storage unreachable
        print(f"actserve: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
