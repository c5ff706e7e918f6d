"""`mgm-build repo`: fill the model-repository templates for one checkpoint and its built engines.

    mgm-build repo --model_dir CKPT --engine_dir ENGINES --output_dir REPO --backend cpu|gpu

ENGINES follows TensorRT-LLM's layout: `vision/` (from `mgm-build vision`: an ONNX Runtime artifact
for cpu, a TensorRT engine for gpu) and, for gpu, `llm/` (`mgm-build llm --output_dir ENGINES/llm
--build`: the engine in `llm/engine/`, the fake-id offset in `llm/build_info.json`). On cpu the LLM
runs from the checkpoint itself (PyTorch, in-flight batching).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from build_engines.fill_template import fill_template
from mgm_ref.config import MGMConfig
from mgm_ref.errors import CheckpointError

TEMPLATES = Path(__file__).parent / "templates"
# deployed model name -> template folder, per backend
MODELS = {
    "cpu": {"preprocessing": "preprocessing", "vision_encoder": "vision_encoder", "tensorrt_llm": "tensorrt_llm_cpu",
            "postprocessing": "postprocessing", "ensemble": "ensemble", "mgm_bls": "mgm_bls"},
    "gpu": {"preprocessing": "preprocessing", "vision_encoder": "vision_encoder", "tensorrt_llm": "tensorrt_llm",
            "postprocessing": "postprocessing", "ensemble": "ensemble", "mgm_bls": "mgm_bls"},
}


def read_vision_artifact(engine_dir: Path, backend: str, config: MGMConfig) -> dict:
    path = engine_dir / "vision" / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{engine_dir}: no vision/config.json; build it with `mgm-build vision`")
    art = json.loads(path.read_text())
    wanted = ("onnxruntime",) if backend == "cpu" else ("tensorrt", "tensorrt_rtx")
    if art.get("backend") not in wanted:
        raise CheckpointError(f"{path}: backend {art.get('backend')!r}, but --backend {backend} needs one of {wanted}")
    if (int(art["tokens_per_image"]), int(art["hidden_size"])) != (config.tokens_per_image, config.hidden_size):
        raise CheckpointError(
            f"{path}: built for {art['tokens_per_image']} tokens x {art['hidden_size']} hidden, but the checkpoint "
            f"needs {config.tokens_per_image} x {config.hidden_size}: rebuild the vision engine"
        )
    return art


def template_values(model_dir: Path, engine_dir: Path, backend: str, max_batch_size: int, instances: int,
                    max_input_len: int | None, max_seq_len: int | None) -> dict[str, object]:
    config = MGMConfig.from_model_dir(model_dir)
    read_vision_artifact(engine_dir, backend, config)
    max_input_len = max_input_len or config.max_length
    max_seq_len = max_seq_len or min(config.llm_config.max_position_embeddings, max_input_len + 1024)
    lr = "-1, 5, 3, 336, 336" if config.hd else "-1, 3, 336, 336"
    values = {
        "triton_max_batch_size": max_batch_size,
        "max_queue_delay_microseconds": 1000,
        "model_dir": model_dir.resolve(),
        "lr_dims": lr,
        "image_size_aux": config.image_size_aux,
        "hidden_size": config.hidden_size,
        "max_input_len": max_input_len,
        "max_seq_len": max_seq_len,
        "max_images_per_request": 1 if config.hd else 4,
        "preprocessing_instances": instances,
        "postprocessing_instances": instances,
        "vision_dir": (engine_dir / "vision").resolve(),
        "vision_threads": os.cpu_count() or 1,
        "vision_instances": 1,
        "prompt_table_type": "TYPE_FP32" if backend == "cpu" else "TYPE_FP16",
        "max_active_requests": max_batch_size,
        "llm_threads": os.cpu_count() or 1,
        "vocab_offset": config.vocab_size,
    }
    if backend == "gpu":
        llm = engine_dir / "llm"
        if not (llm / "engine" / "config.json").is_file():
            raise CheckpointError(f"{engine_dir}: no llm/engine/config.json; build it with "
                                  f"`mgm-build llm --output_dir {llm} --build`")
        values["llm_engine_dir"] = (llm / "engine").resolve()
        info = llm / "build_info.json"
        if info.is_file():  # a padded vocabulary (e.g. INT4 AWQ) moves the first fake id
            values["vocab_offset"] = json.loads(info.read_text()).get("prompt_table_vocab_offset", config.vocab_size)
    return values


def build_repo(model_dir, engine_dir, output_dir, backend: str = "cpu", max_batch_size: int = 8,
               instances: int = 1, max_input_len: int | None = None, max_seq_len: int | None = None,
               name: str | None = None) -> Path:
    if name:  # a named variant joins the repository (its models prefixed) instead of replacing it
        from triton_models.variants import add_named_variant
        return add_named_variant(lambda tmp: build_repo(model_dir, engine_dir, tmp, backend, max_batch_size, instances,
                                                        max_input_len, max_seq_len), Path(output_dir), name)
    if backend not in MODELS:
        raise ValueError(f"--backend must be one of {sorted(MODELS)}, got {backend!r}")
    model_dir, engine_dir, out = Path(model_dir), Path(engine_dir), Path(output_dir)
    values = template_values(model_dir, engine_dir, backend, max_batch_size, instances, max_input_len, max_seq_len)
    if out.exists():
        shutil.rmtree(out)
    for name, template in MODELS[backend].items():
        src, dst = TEMPLATES / template, out / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
        text = (src / "config.pbtxt").read_text()
        mine = {k: v for k, v in values.items() if "${" + k + "}" in text}
        (dst / "config.pbtxt").write_text(fill_template(text, mine))
    return out


def add_repo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_dir", required=True, help="MGM checkpoint folder (tokenizer, config; CPU LLM)")
    parser.add_argument("--engine_dir", required=True, help="folder with vision/ (and llm/ for gpu)")
    parser.add_argument("--output_dir", required=True, help="model repository to write (replaced)")
    parser.add_argument("--backend", choices=sorted(MODELS), default="cpu")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--instances", type=int, default=1, help="instances of preprocessing/postprocessing")
    parser.add_argument("--max_input_len", type=int, default=None, help="prompt tokens incl. image tokens")
    parser.add_argument("--max_seq_len", type=int, default=None, help="prompt + generated tokens")
    parser.add_argument("--name", default=None, help="add this checkpoint to the repository as a variant of that "
                        "name (models prefixed NAME_), keeping the other variants")
    return parser


def run_repo_build(args: argparse.Namespace) -> Path:
    out = build_repo(args.model_dir, args.engine_dir, args.output_dir, args.backend, args.max_batch_size,
                     args.instances, args.max_input_len, args.max_seq_len, getattr(args, "name", None))
    print(f"wrote {args.backend} model repository to {out}")
    return out
