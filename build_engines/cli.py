"""`mgm-build`: one CLI for every build step.

    mgm-build vision --model_dir CKPT --output_dir ENGINES/vision [--backend tensorrt|tensorrt_rtx|onnxruntime]
    mgm-build llm    --model_dir CKPT --output_dir ENGINES/llm [--qformat fp8] [--tp_size 2] [--build]
    mgm-build repo   --model_dir CKPT --engine_dir ENGINES --output_dir REPO --backend cpu|gpu
"""

from __future__ import annotations

import argparse
import sys

from mgm_ref.errors import MGMError


def main(argv: list[str] | None = None) -> int:
    from build_engines.llm import add_llm_arguments, run_llm_build
    from build_engines.vision import add_vision_arguments, run_vision_build
    from triton_models.repo_builder import add_repo_arguments, run_repo_build

    parser = argparse.ArgumentParser(prog="mgm-build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run, help_text in [
        ("vision", add_vision_arguments, run_vision_build, "vision towers + mining + projector -> ONNX / TensorRT"),
        ("llm", add_llm_arguments, run_llm_build, "LLM -> ModelOpt quantization -> TensorRT-LLM checkpoint/engine"),
        ("repo", add_repo_arguments, run_repo_build, "fill the Triton model repository"),
    ]:
        add(sub.add_parser(name, help=help_text, description=help_text)).set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (MGMError, ValueError, OSError, RuntimeError) as e:
        print(f"mgm-build {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
