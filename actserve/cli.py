"""The `actserve` command. Each subcommand parses and validates its flags here, at the edge, into
the typed config of the module that does the work (`train`'s flags are generated from TrainOptions).

The modules that do the work (torch, TransformerLens, Ray) are imported by the subcommand that
runs them, so that `--help` and the light commands start at once.
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
from actserve.clients.train_options import TrainOptions
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


def add_processing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fold-ln", dest="fold_ln", action="store_false",
                   help="keep LayerNorm weights unfolded (TransformerLens folds them by default)")
    p.add_argument("--no-center-writing-weights", dest="center_writing_weights", action="store_false",
                   help="do not remove the mean from weights writing to the residual stream")
    p.add_argument("--no-center-unembed", dest="center_unembed", action="store_false")
    p.add_argument("--no-fold-value-biases", dest="fold_value_biases", action="store_false")


def processing_from(args):
    from actserve.services.model import WeightProcessing

    return WeightProcessing(
        fold_ln=args.fold_ln, center_writing_weights=args.center_writing_weights,
        center_unembed=args.center_unembed, fold_value_biases=args.fold_value_biases,
    )


# --- subcommands -------------------------------------------------------------------------------


def cmd_tiny_model(args) -> int:
    from actserve.offline.tiny_model import make_tiny_model

    result = make_tiny_model(args.out, seed=args.seed, train_seconds=args.seconds, max_steps=args.steps)
    print(json.dumps(result, indent=1))
    return 0


def cmd_cache_build(args) -> int:
    from actserve.services.build import BuildOptions, build_cache
    from actserve.services.manifest import summary

    opts = BuildOptions(
        model=args.model, dataset=args.dataset, hooks=args.hooks, out=args.out, tokens=args.tokens,
        eval_tokens=args.eval_tokens, context_size=args.context_size, dtype=args.dtype,
        dataset_split=args.split, text_column=args.text_column, token_column=args.token_column,
        storage_options=parse_json_object(args.storage_options, "--storage-options"),
        actors=args.actors, writers=args.writers, batch_sequences=args.batch_sequences, shard_mb=args.shard_mb,
        processing=processing_from(args), device=args.device,
    )
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
    from actserve.clients.evaluator import EvalOptions, eval_table, evaluate

    opts = EvalOptions(
        saes=tuple(args.sae), cache=args.cache, out=args.out, server=args.server,
        storage_options=parse_json_object(args.storage_options, "--storage-options"),
        max_tokens=args.max_tokens, batch_sequences=args.batch_sequences,
        exclude_bos=not args.include_bos, device=args.device,
    )
    print(eval_table(evaluate(opts, progress=not args.quiet)), end="")
    print(f"report: {Path(args.out) / 'eval.json'}, {Path(args.out) / 'eval.md'}, density PNGs in {args.out}")
    return 0


def cmd_features(args) -> int:
    from actserve.clients.features import FeatureOptions, build_feature_browser

    opts = FeatureOptions(
        saes=tuple(args.sae), cache=args.cache, out=args.out, server=args.server,
        storage_options=parse_json_object(args.storage_options, "--storage-options"),
        max_tokens=args.max_tokens, top=args.top, left=args.left, right=args.right,
        batch_sequences=args.batch_sequences, exclude_bos=not args.include_bos, device=args.device,
    )
    index = build_feature_browser(opts, progress=not args.quiet)
    print(f"feature browser: {index}")
    print(f"per SAE, in {args.out}/<SAE>/: top_activations.parquet, features.parquet, summary.json, index.html")
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

    serve(options_from_args(args))
    return 0


def cmd_demo(args) -> int:
    from actserve.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(workdir=Path(args.workdir), tokens=args.tokens, eval_tokens=args.eval_tokens))


# --- parser ------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name.replace("_", "-"))


def add_dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the options dataclass `cls`, with its default and help from the field:
    tuples take comma lists, bools are switches, fields without a default are required."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kwargs = {"help": f.metadata["help"], "dest": f.name}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is bool:
            p.add_argument(flag_name(f), action="store_true", **kwargs)
            continue
        kwargs["metavar"] = flag_name(f)[2:].upper().replace("-", "_")
        if typing.get_origin(kind) is tuple:
            kwargs["type"] = csv_of(typing.get_args(kind)[0], flag_name(f))
            kwargs["metavar"] += ",..."
        else:
            kwargs["type"] = next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            del kwargs["metavar"]
        p.add_argument(flag_name(f), **kwargs)


def add_eval_split_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    """The flags of the jobs that read SAEs over the cache's eval split (eval, features)."""
    p.add_argument("--sae", action="append", required=True, help="SAE directory (SAELens layout; repeatable)")
    p.add_argument("--cache", required=True, help="cache URL (the manifest is read from it)")
    p.add_argument("--server", default=None,
                   help="grpc:// location of a server of the cache: stream the eval split from it instead of reading shards")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options")
    p.add_argument("--max-tokens", type=int, default=None, help="eval tokens to use (default: the whole eval split)")
    p.add_argument("--batch-sequences", type=int, default=8, help="sequences per batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; its func runs the server and returns 0."""
    p = subparsers.add_parser(
        "serve", help="stream cached activations over Arrow Flight",
        description="Serve one or more activation caches over Arrow Flight (gRPC): shuffled, exactly-once "
                    "epochs for trainers, whole sequences for evaluators. Prints each grpc:// location, runs "
                    "until interrupted. Wire contract: proto/stream.proto.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", action="append", required=True, metavar="[NAME=]URL",
                   help="cache to serve (repeatable); named by NAME or the URL's last path component")
    p.add_argument("--host", default=ServeOptions.host, help="address to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=ServeOptions.port, help="port (0: any free one); with --servers K, ports PORT..PORT+K-1")
    p.add_argument("--servers", type=int, default=ServeOptions.servers, help="server processes (Ray actors when > 1), listed as replicas")
    p.add_argument("--token-env", default=ServeOptions.token_env, help="environment variable holding the bearer token")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without a token")
    p.add_argument("--tls-cert", default=ServeOptions.tls_cert, help="PEM certificate: serve grpc+tls://")
    p.add_argument("--tls-key", default=ServeOptions.tls_key, help="PEM private key of --tls-cert")
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options for the cache URLs")
    p.add_argument("--local-cache-dir", default=ServeOptions.local_cache_dir,
                   help="node-local copy of remote (s3://) shards, shared by the servers of this node")
    p.add_argument("--local-cache-gb", type=float, default=ServeOptions.local_cache_gb,
                   help="size bound of --local-cache-dir (LRU eviction); 0 reads remote shards directly")
    p.add_argument("--max-batch-size", type=int, default=ServeOptions.max_batch_size, help="largest batch_size accepted, tokens")
    p.add_argument("--buffer-tokens", type=int, default=ServeOptions.buffer_tokens,
                   help="default shuffle buffer, tokens (>= 5 x batch x context for 0.9 of a global shuffle's "
                        "distinct sequences per batch); lowered per request to what --stream-memory-gb allows")
    p.add_argument("--max-buffer-tokens", type=int, default=ServeOptions.max_buffer_tokens,
                   help="largest buffer_tokens a request may ask for")
    p.add_argument("--memory-budget-gb", type=float, default=ServeOptions.memory_budget_gb,
                   help="memory all streams together may hold (buffers, reads, batches in flight; not the process's "
                        "baseline nor the page cache); a stream beyond it is refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--stream-memory-gb", type=float, default=ServeOptions.stream_memory_gb,
                   help="memory one stream may hold (two buffer slices, the shard read, two batches); a request "
                        "needing more is refused")
    p.add_argument("--max-streams", type=int, default=ServeOptions.max_streams, help="concurrent streams allowed")
    p.add_argument("--stream-idle-timeout", type=float, default=ServeOptions.stream_idle_timeout,
                   help="seconds a stream may wait for its client to read before the server ends it")
    p.add_argument("--expose-urls", action="store_true", help="show the caches' storage URLs to clients (list-caches, errors)")
    p.add_argument("--debug", action="store_true", help="send clients errors' full text (else one line of at most 1000 characters)")
    p.add_argument("--peer", action="append", default=[], metavar="LOCATION",
                   help="grpc:// location of another server of the same caches, listed as a replica (repeatable)")
    p.add_argument("--ray-address", default=None, help="Ray cluster for --servers > 1 (default: $RAY_ADDRESS, else local)")
    p.set_defaults(func=run_serve_command)
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    storage_options = parse_json_object(args.storage_options, "--storage-options")
    return ServeOptions(
        caches=tuple(args.cache), host=args.host, port=args.port, servers=args.servers, token_env=args.token_env,
        insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key, storage_options=storage_options,
        local_cache_dir=args.local_cache_dir, local_cache_gb=args.local_cache_gb,
        max_batch_size=args.max_batch_size, buffer_tokens=args.buffer_tokens,
        max_buffer_tokens=args.max_buffer_tokens, peers=tuple(args.peer),
        memory_budget_gb=args.memory_budget_gb, stream_memory_gb=args.stream_memory_gb, max_streams=args.max_streams,
        stream_idle_timeout=args.stream_idle_timeout, expose_urls=args.expose_urls, debug=args.debug,
        ray_address=args.ray_address,
    )




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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="TransformerLens model name (gpt2) or local Hugging Face GPT-2 directory")
    p.add_argument("--dataset", required=True, help="Hugging Face hub dataset name, or a local .txt/.jsonl/.parquet file or directory")
    p.add_argument("--hooks", required=True, help="comma list of hook names and/or patterns, e.g. 'blocks.*.hook_resid_pre'")
    p.add_argument("--tokens", type=int, required=True, help="train-split tokens (rounded up to whole sequences)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out eval-split tokens (whole sequences, never in train)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per sequence, BOS included")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--out", required=True, help="cache URL: a directory, file://..., or s3://bucket/prefix")
    p.add_argument("--split", default="train", help="dataset split to read")
    p.add_argument("--text-column", default="text")
    p.add_argument("--token-column", default="", help="read pre-tokenized ids from this column instead of text")
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'")
    p.add_argument("--actors", type=int, default=1, help="model-host actors running in parallel (one GPU each when CUDA is present)")
    p.add_argument("--writers", type=int, default=0,
                   help="shards each model host writes at once beside its forward (one writer stores ~0.5 GB/s); "
                        "0: one on a CPU host, whose forward takes the cores, services/build.py's GPU_WRITERS on "
                        "a GPU, whose forward outruns one")
    p.add_argument("--batch-sequences", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MiB")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_processing_flags(p)
    p.set_defaults(func=cmd_cache_build)

    add_serve_parser(sub)

    p = sub.add_parser(
        "train", help="train SAEs on one hook's activations streamed from a server",
        description="Train one SAE (or several configs on the same batches: comma lists in --arch, --expansion, "
                    "--l1-coefficient, --k, --lr) on one hook, streaming shuffled activations from an actserve "
                    "server. Checkpoints every --checkpoint-every tokens; rerun the same command to resume. "
                    "Writes the SAE in SAELens's layout (cfg.json, sae_weights.safetensors, sparsity.safetensors) "
                    "and metrics.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", required=True, help="grpc:// location of `actserve serve`")
    p.add_argument("--cache", required=True, help="cache name or URL, as the server serves it")
    add_dataclass_flags(p, TrainOptions)
    p.add_argument("--token-env", default="ACTSERVE_TOKEN", help="environment variable holding the server's bearer token")
    p.add_argument("--reconnect-timeout", type=float, default=60.0,
                   help="seconds to keep retrying (with backoff) an unreachable server before giving up")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="CE-loss-recovered scoring of SAEs on the cache's eval split",
        description="Score SAEs on the cache's held-out eval split: CE clean / with reconstruction / zero-ablated, "
                    "CE recovered, KL, explained variance, L0, L1, alive and dense features, norm ratio. "
                    "Residual hooks run only the layers after the hook, from the cached activations. Writes "
                    "eval.json, eval.md (the seed's table) and a log10 feature-density PNG per SAE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_split_flags(p, "report directory")
    p.add_argument("--include-bos", action="store_true", help="splice and score the BOS position too")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "features", help="feature browser: what each SAE feature fires on in the eval split",
        description="Encode the cache's eval split with each SAE (no model forward: the activations are cached) "
                    "and keep, in one pass with bounded memory, every feature's firing density, max activation, "
                    "top-K activating tokens with their context, a histogram of its activations and, for "
                    "residual-stream hooks, the tokens its decoder direction promotes and suppresses (logit lens). "
                    "Writes top_activations.parquet, features.parquet and a static HTML browser (OUT/index.html) "
                    "that opens from the file system.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_split_flags(p, "output directory (replaced as a whole when the run ends)")
    p.add_argument("--top", type=int, default=20, help="top activating examples kept per feature")
    p.add_argument("--left", type=int, default=8, help="context tokens shown before each example")
    p.add_argument("--right", type=int, default=4, help="context tokens shown after each example")
    p.add_argument("--include-bos", action="store_true", help="count the BOS position too")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("sweep", help="train a grid of SAEs concurrently on Ray, then evaluate them",
                       description=sweep_spec.__doc__,  # the sweep file's format
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--quiet", action="store_true")
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
