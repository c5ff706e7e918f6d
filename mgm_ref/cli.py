"""Chat with an MGM checkpoint like the original CLI, or answer one prompt and exit.

python -m mgm_ref.cli --model-path DIR --image-file IMG [--prompt TEXT] [--temperature 0]
                      [--max-new-tokens N] [--conv-mode M] [--dtype float32|bfloat16|float16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from mgm_ref.conversation import TEMPLATES
from mgm_ref.errors import MGMError, run_cli
from mgm_ref.loader import load_model
from mgm_ref.model import GenerationParams
from mgm_ref.preprocess import load_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="local MGM checkpoint folder")
    p.add_argument("--image-file", required=True, help="image path; several as a,b (non-HD models only)")
    p.add_argument("--prompt", default=None, help="answer this once and exit (default: interactive chat)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--conv-mode", choices=sorted(TEMPLATES), default=None, help="default: detected from the model")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="compute precision (default float32 on CPU, float16 on CUDA)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--clip-dir", default=None, help="HF CLIP folder, when the checkpoint lacks CLIP weights")
    p.add_argument("--convnext-dir", default=None, help="OpenCLIP ConvNeXt folder, when the checkpoint lacks them")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MGMError("--device cuda was asked for but no CUDA GPU is visible")
    dtype = DTYPES[args.dtype or ("float32" if args.device == "cpu" else "float16")]
    images = [load_image(path) for path in args.image_file.split(",")]
    model = load_model(args.model_path, dtype, args.device, args.conv_mode, args.clip_dir, args.convnext_dir)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.prompt is not None:
        print(model.chat(args.prompt, images, params))
        return 0

    roles = TEMPLATES[model.conv_mode].roles
    history: list[tuple[str, str]] = []
    streamer = lambda tok: TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)  # noqa: E731
    while True:
        try:
            question = input(f"{roles[0]}: ")
        except EOFError:
            print()
            return 0
        if not question.strip():
            continue
        print(f"{roles[1]}: ", end="", flush=True)
        answer = model.chat(question, images, params, history, streamer_factory=streamer)
        history.append((question, answer))


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.exit(run_cli("mgm_ref.cli", lambda: run(args), debug=args.debug))


if __name__ == "__main__":
    main()
