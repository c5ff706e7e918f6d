"""`mgm-bench`: every benchmark of the MGM stack, one subcommand each.

    mgm-bench serve --start_server                       # tiny model served on CPU, concurrency 1,2,4
    mgm-bench serve --url 127.0.0.1:8001 --model mgm_bls --concurrency 1,2,4,8 --model_dir CKPT
    mgm-bench vision [--help for its arguments]          # vision artifact: ONNX Runtime / TensorRT vs PyTorch
    mgm-bench llm_engine [--size tiny|7b]                # in-flight batching engine vs HF generate
    mgm-bench llm_build --out DIR                        # wall time and peak memory of mgm-build llm
    mgm-bench openai --triton_url H:P --openai_url URL   # OpenAI front door overhead vs direct gRPC
    mgm-bench multiturn [--vision_size tiny|7b]          # image-feature cache + prefix KV reuse, on vs off

Input errors exit with status 2 and one line on stderr (--debug adds the traceback); `serve` exits 0
when every run produced numbers, whether or not the targets were met.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mgm_ref.errors import run_cli

# Benchmarks with their own argument parsers: name -> (module with main(argv), help).
OWN_PARSERS = {
    "vision": ("client.bench.vision", "vision path: ONNX Runtime / TensorRT artifact vs PyTorch, by batch size"),
    "llm_engine": ("client.bench.llm_engine", "LLM serving engine (in-flight batching) vs HF generate"),
    "llm_build": ("client.bench.llm_build", "wall time and peak memory of `mgm-build llm` per qformat"),
    "openai": ("client.openai_api.bench", "OpenAI endpoint vs direct Triton gRPC: TTFT, ITL, throughput"),
    "multiturn": ("client.bench.multiturn", "multi-turn chats about one image: TTFT per turn, caches on vs off"),
}


def benchmark_main(name: str) -> Callable[[Sequence[str]], int]:
    module, _ = OWN_PARSERS[name]
    return importlib.import_module(module).main


def main(argv: Sequence[str] | None = None) -> int:
    from client.bench.serve import add_serve_arguments, run_serve

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_PARSERS:
        return benchmark_main(argv[0])(argv[1:]) or 0
    parser = argparse.ArgumentParser(
        prog="mgm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = add_serve_arguments(
        sub.add_parser("serve", help="served throughput / latency / TTFT vs in-process mgm_ref")
    )
    serve.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    for name, (_, help_text) in OWN_PARSERS.items():
        sub.add_parser(name, help=f"{help_text} (its own arguments: mgm-bench {name} --help)")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max_tokens must be >= 1")
    return run_cli("mgm-bench", lambda: run_serve(args, argv), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
