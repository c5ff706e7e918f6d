"""`mgm-build repo`: fill the model-repository templates for one checkpoint and its built engines.

    mgm-build repo --model_dir CKPT --engine_dir ENGINES --output_dir REPO --backend cpu|gpu

ENGINES follows TensorRT-LLM's layout: `vision/` (from `mgm-build vision`: an ONNX Runtime artifact
for cpu, a TensorRT engine for gpu) and, for gpu, `llm/` (`mgm-build llm --output_dir ENGINES/llm
--build`: the engine in `llm/engine/`, its contract in `llm/build_info.json`). On cpu the LLM runs
from the checkpoint itself (PyTorch, in-flight batching) under a contract derived by the same formula.
Every limit, dtype and shape comes from those contracts (mgm_runtime.contract); the repository keeps
the one it was filled from in `tensorrt_llm/contract.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
from pathlib import Path

from mgm_ref.config import MGMConfig
from mgm_ref.constants import max_images_for
from mgm_ref.errors import CheckpointError
from mgm_runtime.contract import (
    LLMContract,
    VisionContract,
    derive_limits,
    read_llm_contract,
    read_vision_contract,
    write_llm_contract,
)
from triton_models.fill_template import fill_template, placeholders, unused_values

TEMPLATES = Path(__file__).parent / "templates"
# deployed model name -> template folder, per backend
MODELS = {
    "cpu": {
        "preprocessing": "preprocessing",
        "vision_encoder": "vision_encoder",
        "tensorrt_llm": "tensorrt_llm_cpu",
        "postprocessing": "postprocessing",
        "ensemble": "ensemble",
        "mgm_bls": "mgm_bls",
    },
    "gpu": {
        "preprocessing": "preprocessing",
        "vision_encoder": "vision_encoder",
        "tensorrt_llm": "tensorrt_llm",
        "postprocessing": "postprocessing",
        "ensemble": "ensemble",
        "mgm_bls": "mgm_bls",
    },
}


CONTRACT_FILE = "contract.json"  # the LLM contract a repository was filled from, kept in tensorrt_llm/
CPU_DEFAULT_MAX_BATCH_SIZE = 8
# Default queue bound per model: this many waiting requests per batch slot, then "busy" at once.
QUEUE_PER_SLOT = 4
# Per vision_encoder instance. Features are float32 (T x H x 4 bytes): 2.4 MB for MGM-2B, 9.4 MB for
# 7B/8B, 16.5 MB for 34B, 47 MB for 7B-HD, 0.1-0.6 MB for the tiny test models; 512 MB holds ~54
# images of a 7B chat (a few dozen at every non-HD size, ~10 HD) at a fraction of the LLM's memory.
DEFAULT_IMAGE_CACHE_MB = 512
EXTRA_IDS_INPUT = "prompt_table_extra_ids"
DEFAULT_KV_CACHE_MB = 1024  # CPU prefix KV cache: fp32 KV is ~36 KiB/token for MGM-2B, ~1 MiB/token for 7B
# Triton's dynamic batcher holds a lone request this long for batch-mates. 0: a request runs as soon as
# its model is free, and requests that queued meanwhile still run together. Every model here batches
# in flight or is cheap per request, so a wait costs latency at every hop (4 hops per streamed answer).
DEFAULT_MAX_QUEUE_DELAY_US = 0


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """The repository's serving knobs, beside the engine limits of the contract."""

    instances: int = 1  # preprocessing / postprocessing instances
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB
    kv_cache_reuse: bool = True
    kv_cache_mb: int = DEFAULT_KV_CACHE_MB
    max_queue_size: int | None = None  # cpu: None = QUEUE_PER_SLOT x max_batch_size
    max_queue_delay_microseconds: int = DEFAULT_MAX_QUEUE_DELAY_US

    def __post_init__(self):
        for name, low in (
            ("instances", 1),
            ("image_cache_mb", 0),
            ("kv_cache_mb", 0),
            ("max_queue_delay_microseconds", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ValueError(f"--max_queue_size must be >= 1, got {self.max_queue_size}")


def vision_contract(engine_dir: Path, backend: str, config: MGMConfig) -> VisionContract:
    path = engine_dir / "vision" / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{engine_dir}: no vision/config.json; build it with `mgm-build vision`")
    art = read_vision_contract(path)
    wanted = ("onnxruntime",) if backend == "cpu" else ("tensorrt", "tensorrt_rtx")
    if art.backend not in wanted:
        raise CheckpointError(f"{path}: backend {art.backend!r}, but --backend {backend} needs one of {wanted}")
    if (art.tokens_per_image, art.hidden_size) != (config.tokens_per_image, config.hidden_size):
        raise CheckpointError(
            f"{path}: built for {art.tokens_per_image} tokens x {art.hidden_size} hidden, but the checkpoint "
            f"needs {config.tokens_per_image} x {config.hidden_size}: rebuild the vision engine"
        )
    # vision_encoder makes the pixels from the checkpoint's config: the artifact must take those shapes
    side, aux = config.lr_size, config.image_size_aux
    lr = (config.views_per_image, 3, side, side) if config.hd else (3, side, side)
    if (art.images_shape, art.images_aux_shape) != (lr, (3, aux, aux)):
        raise CheckpointError(
            f"{path}: takes images {list(art.images_shape)} and images_aux {list(art.images_aux_shape)}, but the "
            f"checkpoint's pixels are {list(lr)} and {[3, aux, aux]}: rebuild the vision engine"
        )
    return art


def cpu_contract(
    config: MGMConfig,
    max_batch_size: int | None,
    max_input_len: int | None,
    max_seq_len: int | None,
    max_images_per_request: int | None,
) -> LLMContract:
    """The CPU runner's contract, from the same formula as an engine build (it has no build step)."""
    input_len = max_input_len or config.max_length
    if max_images_per_request is None:  # as many as leave room for text (derive_limits refuses 0)
        max_images_per_request = max(1, max_images_for(input_len, config.tokens_per_image, config.hd))
    limits = derive_limits(
        max_batch_size=max_batch_size or CPU_DEFAULT_MAX_BATCH_SIZE,
        tokens_per_image=config.tokens_per_image,
        max_images_per_request=max_images_per_request,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        default_input_len=config.max_length,
    )
    return LLMContract(
        runtime="pytorch", dtype="float32", hidden_size=config.hidden_size, vocab_offset=config.vocab_size, **limits
    )


def gpu_contract(engine_dir: Path, config: MGMConfig, **overrides: int | None) -> LLMContract:
    """The engine's contract from llm/build_info.json, lowered (never raised) by the repo's options."""
    llm = engine_dir / "llm"
    if not (llm / "engine" / "config.json").is_file():
        raise CheckpointError(
            f"{engine_dir}: no llm/engine/config.json; build it with `mgm-build llm --output_dir {llm} --build`"
        )
    built = read_llm_contract(llm / "build_info.json")
    if built.runtime != "tensorrt_llm":
        raise CheckpointError(f"{llm / 'build_info.json'}: runtime {built.runtime!r}, --backend gpu needs tensorrt_llm")
    if (built.tokens_per_image, built.hidden_size) != (config.tokens_per_image, config.hidden_size):
        raise CheckpointError(
            f"{llm / 'build_info.json'}: built for {built.tokens_per_image} tokens x "
            f"{built.hidden_size} hidden, the checkpoint has {config.tokens_per_image} x "
            f"{config.hidden_size}: rebuild the LLM engine"
        )
    return built.with_overrides(str(llm / "build_info.json"), **overrides)


def llm_declares(llm_config_text: str, name: str) -> bool:
    return re.search(rf'name:\s*"{re.escape(name)}"', llm_config_text) is not None


def extra_ids_values(llm_takes_extra_ids: bool) -> dict[str, object]:
    """The ensemble's and mgm_bls's wiring of the image keys to tensorrt_llm, only where it declares the
    input (an ensemble mapping to an undeclared input does not load)."""
    if not llm_takes_extra_ids:
        absent = f"# (tensorrt_llm declares no {EXTRA_IDS_INPUT})"
        return {"extra_ids_output_map": absent, "extra_ids_input_map": absent, "llm_takes_extra_ids": False}
    return {
        "extra_ids_output_map": 'output_map { key: "PROMPT_TABLE_EXTRA_IDS" value: "_PROMPT_TABLE_EXTRA_IDS" }',
        "extra_ids_input_map": f'input_map {{ key: "{EXTRA_IDS_INPUT}" value: "_PROMPT_TABLE_EXTRA_IDS" }}',
        "llm_takes_extra_ids": True,
    }


def template_values(
    model_dir: Path,
    engine_dir: Path,
    contract: LLMContract,
    options: ServingOptions,
    llm_takes_extra_ids: bool = False,
) -> dict[str, object]:
    """Every template value, read from the LLM contract (never recomputed here) and the serving options;
    the vision artifact's shapes are checked against the checkpoint by `vision_contract`."""
    cache_mb = options.image_cache_mb
    values = {
        "triton_max_batch_size": contract.max_batch_size,
        "max_queue_delay_microseconds": options.max_queue_delay_microseconds,
        "model_dir": model_dir.resolve(),
        "hidden_size": contract.hidden_size,
        "max_input_len": contract.max_input_len,
        "max_seq_len": contract.max_seq_len,
        "max_images_per_request": contract.max_images_per_request,
        "preprocessing_instances": options.instances,
        "postprocessing_instances": options.instances,
        "vision_dir": (engine_dir / "vision").resolve(),
        "vision_threads": os.cpu_count() or 1,
        "vision_instances": 1,
        "prompt_table_type": contract.prompt_table_type,
        "vocab_offset": contract.vocab_offset,
        "image_cache_mb": int(cache_mb) if float(cache_mb).is_integer() else cache_mb,
        **extra_ids_values(llm_takes_extra_ids),
        "kv_cache_reuse": "true" if options.kv_cache_reuse else "false",
    }
    if contract.runtime == "pytorch":
        values.update(max_active_requests=contract.max_batch_size, llm_threads=os.cpu_count() or 1)
        values.update(
            kv_cache_mb=options.kv_cache_mb,
            max_queue_size=options.max_queue_size or QUEUE_PER_SLOT * contract.max_batch_size,
        )
    else:
        values.update(llm_engine_dir=(engine_dir / "llm" / "engine").resolve(), tokenizer_dir=model_dir.resolve())
    return values


def build_repo(
    model_dir,
    engine_dir,
    output_dir,
    backend: str = "cpu",
    max_batch_size: int | None = None,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    max_images_per_request: int | None = None,
    name: str | None = None,
    options: ServingOptions = ServingOptions(),
) -> Path:
    limits = dict(
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_images_per_request=max_images_per_request,
    )
    if name:  # a named variant joins the repository (its models prefixed) instead of replacing it
        from triton_models.variants import add_named_variant

        return add_named_variant(
            lambda tmp: build_repo(model_dir, engine_dir, tmp, backend, **limits, options=options),
            Path(output_dir),
            name,
        )
    if backend not in MODELS:
        raise ValueError(f"--backend must be one of {sorted(MODELS)}, got {backend!r}")
    model_dir, engine_dir, out = Path(model_dir), Path(engine_dir), Path(output_dir)
    config = MGMConfig.from_model_dir(model_dir)
    vision_contract(engine_dir, backend, config)
    contract = cpu_contract(config, **limits) if backend == "cpu" else gpu_contract(engine_dir, config, **limits)
    texts = {name: (TEMPLATES / template / "config.pbtxt").read_text() for name, template in MODELS[backend].items()}
    if out.exists():
        shutil.rmtree(out)
    # Both backends fill from the contract file as written into the repository: one code path.
    write_llm_contract(out / "tensorrt_llm" / CONTRACT_FILE, contract)
    contract = read_llm_contract(out / "tensorrt_llm" / CONTRACT_FILE)
    takes_extra_ids = llm_declares(texts["tensorrt_llm"], EXTRA_IDS_INPUT)
    values = template_values(model_dir, engine_dir, contract, options, takes_extra_ids)
    unused = unused_values(values, texts.values())
    if unused:
        raise ValueError(f"template values {unused} are used by no {backend} template")
    for name, template in MODELS[backend].items():
        src, dst = TEMPLATES / template, out / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"), dirs_exist_ok=True)
        mine = {k: v for k, v in values.items() if k in placeholders(texts[name])}
        (dst / "config.pbtxt").write_text(fill_template(texts[name], mine))
    return out


def add_repo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_dir", required=True, help="MGM checkpoint folder (tokenizer, config; CPU LLM)")
    parser.add_argument("--engine_dir", required=True, help="folder with vision/ (and llm/ for gpu)")
    parser.add_argument("--output_dir", required=True, help="model repository to write (replaced)")
    parser.add_argument("--backend", choices=sorted(MODELS), default="cpu")
    parser.add_argument("--instances", type=int, default=1, help="instances of preprocessing/postprocessing")
    # gpu: default and upper bound are what llm/build_info.json records; cpu: these define the contract
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=None,
        help=f"requests batched together (gpu: the engine's; cpu: {CPU_DEFAULT_MAX_BATCH_SIZE})",
    )
    parser.add_argument("--max_input_len", type=int, default=None, help="prompt tokens incl. image tokens")
    parser.add_argument("--max_seq_len", type=int, default=None, help="prompt + generated tokens")
    parser.add_argument(
        "--max_images_per_request",
        type=int,
        default=None,
        help="gpu: at most what the engine was built for; cpu: default as many as leave room for text (<= 4)",
    )
    parser.add_argument(
        "--image_cache_mb",
        type=float,
        default=DEFAULT_IMAGE_CACHE_MB,
        help=f"image-feature cache per vision_encoder instance, MB (0 = off; default {DEFAULT_IMAGE_CACHE_MB})",
    )
    parser.add_argument(
        "--kv_cache_reuse",
        choices=("on", "off"),
        default="on",
        help="reuse the KV of cached prompt prefixes (cpu: the engine's prefix cache; gpu: TensorRT-LLM's "
        "enable_kv_cache_reuse); off: every prompt is prefilled whole (for benchmarks)",
    )
    parser.add_argument(
        "--kv_cache_mb",
        type=int,
        default=DEFAULT_KV_CACHE_MB,
        help="cpu: MiB of prefix KV kept for reuse (LRU; 0 = no reuse)",
    )
    parser.add_argument(
        "--max_queue_size",
        type=int,
        default=None,
        help=f"cpu: requests the LLM keeps waiting before refusing new ones as busy "
        f"(default {QUEUE_PER_SLOT} x max_batch_size)",
    )
    parser.add_argument(
        "--max_queue_delay_microseconds",
        type=int,
        default=DEFAULT_MAX_QUEUE_DELAY_US,
        help="how long Triton's dynamic batcher holds a lone request for batch-mates "
        f"(every model but mgm_bls; default {DEFAULT_MAX_QUEUE_DELAY_US})",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="add this checkpoint to the repository as a variant of that "
        "name (models prefixed NAME_), keeping the other variants",
    )
    return parser


def register_command(subparsers) -> None:
    """`mgm-build repo` (the mgm_build.commands entry point)."""
    help_text = "fill the Triton model repository"
    add_repo_arguments(subparsers.add_parser("repo", help=help_text, description=help_text)).set_defaults(
        run=run_repo_build
    )


def run_repo_build(args: argparse.Namespace) -> Path:
    options = ServingOptions(
        instances=args.instances,
        image_cache_mb=args.image_cache_mb,
        kv_cache_reuse=args.kv_cache_reuse == "on",
        kv_cache_mb=args.kv_cache_mb,
        max_queue_size=args.max_queue_size,
        max_queue_delay_microseconds=args.max_queue_delay_microseconds,
    )
    out = build_repo(
        args.model_dir,
        args.engine_dir,
        args.output_dir,
        args.backend,
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        max_images_per_request=args.max_images_per_request,
        name=args.name,
        options=options,
    )
    print(f"wrote {args.backend} model repository to {out}")
    return out
