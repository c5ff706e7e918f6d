"""ModelOpt quantization of MGM's language model and export to a TensorRT-LLM checkpoint.

What is supported is data (`check_combination`), checked before any weights are loaded:

| qformat   | llama (Vicuna/LLaMA-3/Yi) | gemma | mixtral                                                |
|-----------|---------------------------|-------|--------------------------------------------------------|
| full_prec | yes                       | yes   | yes                                                    |
| fp8       | yes                       | yes   | yes                                                    |
| int4_awq  | yes (*)                   | yes (*, vocab % 64 == 0) | yes (*)                             |
| int8_sq   | yes (float16 only)        | yes (float16 only)       | no: ModelOpt 0.47 cannot export SQ experts, TensorRT-LLM has no MoE SmoothQuant |

(*) every quantized linear needs in-features divisible by the AWQ block size (128), per tensor-parallel shard
for the row-parallel ones (o_proj, down_proj / w2). KV cache: `--kv_cache_dtype fp8|int8` adds K/V
quantizers to any of the above (with full_prec only the KV cache is quantized).

Both ModelOpt config forms are built (`quant_cfg_form`): 0.37.x, which TensorRT-LLM 1.2.1 pins and the 26.07
image ships, takes `quant_cfg` as a dict {pattern: attributes}; 0.47 takes an ordered list of
{"quantizer_name": pattern, "cfg": attributes} entries.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mgm_ref.errors import MGMError

QFORMATS = ("full_prec", "fp8", "int4_awq", "int8_sq")
KV_CACHE_DTYPES = ("fp8", "int8")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = ("llama", "gemma", "mixtral")
AWQ_BLOCK_SIZE = 128
AWQ_VOCAB_MULTIPLE = 64  # ModelOpt pads the vocabulary to this for AWQ (and fails on tied Gemma)
AWQ_MAX_CALIB = 32  # as TensorRT-LLM's quantize.py: AWQ's search is slow, 32 samples suffice
QUANT_ALGO = {"full_prec": None, "fp8": "FP8", "int4_awq": "W4A16_AWQ", "int8_sq": "W8A8_SQ_PER_CHANNEL"}


class UnsupportedCombination(MGMError):
    """The requested qformat / kv cache / parallelism cannot be built for this model; says why."""


@dataclass(frozen=True)
class LLMShape:
    """The sizes that decide what can be quantized and split; read from the HF config, no weights needed."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int = 0
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, family: str, cfg) -> LLMShape:
        if family not in FAMILIES:
            raise UnsupportedCombination(f"LLM family {family!r} is not one of {FAMILIES}")
        heads = cfg.num_attention_heads
        return cls(
            family=family,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab_size=cfg.vocab_size,
            num_experts=getattr(cfg, "num_local_experts", 0) or 0,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    def param_count(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
        mlp = 3 * h * i * max(self.num_experts, 1) + (h * self.num_experts)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp + 2 * h) + embed + h

    def linear_in_features(self, tp_size: int = 1) -> dict[str, int]:
        """In-features each quantized linear sees on one tensor-parallel rank."""
        return {
            "q/k/v_proj": self.hidden_size,
            "o_proj": self.num_heads * self.head_dim // tp_size,
            "gate/up_proj" if not self.num_experts else "experts.w1/w3": self.hidden_size,
            "down_proj" if not self.num_experts else "experts.w2": self.intermediate_size // tp_size,
        }


def check_combination(
    shape: LLMShape,
    qformat: str,
    kv_cache_dtype: str | None = None,
    dtype: str = "float16",
    tp_size: int = 1,
    pp_size: int = 1,
    awq_block_size: int = AWQ_BLOCK_SIZE,
) -> list[str]:
    """Raise UnsupportedCombination listing every problem; return warnings (strings) otherwise."""
    problems, warnings = [], []
    if qformat not in QFORMATS:
        problems.append(f"--qformat {qformat!r} is not one of {QFORMATS}")
    if kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        problems.append(f"--kv_cache_dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {tuple(DTYPES)}")
    if tp_size < 1 or pp_size < 1:
        problems.append(f"tp_size and pp_size must be >= 1 (got {tp_size}, {pp_size})")
    fam = shape.family
    if qformat == "int8_sq" and fam == "mixtral":
        problems.append(
            "int8_sq is not supported for Mixtral (MoE): ModelOpt 0.47 cannot export SmoothQuant expert weights "
            "(per-channel scales on the stacked experts) and TensorRT-LLM has no MoE SmoothQuant kernels; "
            "use fp8 or int4_awq for Mixtral"
        )
    if qformat == "int8_sq" and dtype != "float16":
        problems.append("int8_sq needs --dtype float16 (TensorRT-LLM's SmoothQuant GEMMs run in FP16 only)")
    if qformat == "int4_awq":
        bad = {name: n for name, n in shape.linear_in_features(tp_size).items() if n % awq_block_size}
        if bad:
            where = f" per tensor-parallel rank (tp_size={tp_size})" if tp_size > 1 else ""
            problems.append(
                f"int4_awq needs every quantized linear's in-features divisible by the block size {awq_block_size}"
                f"{where}; these are not: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            )
        if shape.vocab_size % AWQ_VOCAB_MULTIPLE:
            if fam == "gemma":
                problems.append(
                    f"int4_awq for Gemma needs vocab_size divisible by {AWQ_VOCAB_MULTIPLE} (got {shape.vocab_size}): "
                    "ModelOpt pads the vocabulary for AWQ and its export fails on Gemma's tied embedding"
                )
            else:
                padded = -(-shape.vocab_size // AWQ_VOCAB_MULTIPLE) * AWQ_VOCAB_MULTIPLE
                warnings.append(
                    f"int4_awq pads the vocabulary {shape.vocab_size} -> {padded}: image (prompt-table) ids must "
                    f"start at {padded}, which build_info.json records as prompt_table_vocab_offset"
                )
    if tp_size > 1:
        if shape.num_heads % tp_size:
            problems.append(f"num_attention_heads={shape.num_heads} is not divisible by tp_size={tp_size}")
        kv = shape.num_kv_heads
        if kv % tp_size and tp_size % kv:
            problems.append(f"num_key_value_heads={kv} and tp_size={tp_size}: one must divide the other")
        if shape.intermediate_size % tp_size:
            problems.append(f"intermediate_size={shape.intermediate_size} is not divisible by tp_size={tp_size}")
    if pp_size > 1 and shape.num_layers % pp_size:
        problems.append(
            f"num_hidden_layers={shape.num_layers} is not divisible by pp_size={pp_size} "
            "(ModelOpt splits layers evenly across pipeline stages)"
        )
    if kv_cache_dtype == "int8" and qformat == "fp8":
        warnings.append("fp8 weights with an int8 KV cache is unusual; --kv_cache_dtype fp8 is the usual pairing")
    if kv_cache_dtype:
        warnings.append(
            "a quantized KV cache is reported to cost VLM accuracy more than quantized weights do "
            "(see DEPLOY_ANCHORS §4); compare against full_prec before serving it"
        )
    if problems:
        raise UnsupportedCombination(
            f"cannot build {fam} with qformat={qformat}, kv_cache_dtype={kv_cache_dtype}, dtype={dtype}, "
            f"tp_size={tp_size}, pp_size={pp_size}:\n  - " + "\n  - ".join(problems)
        )
    return warnings


def decoder_type(family: str) -> str:
    """ModelOpt/TensorRT-LLM decoder type: Mixtral is exported through the llama decoder (MixtralForCausalLM)."""
    return "gemma" if family == "gemma" else "llama"


def needs_calibration(qformat: str, kv_cache_dtype: str | None) -> bool:
    return qformat != "full_prec" or kv_cache_dtype is not None


def quant_cfg_form(mtq=None) -> str:
    """ "list" (ModelOpt >= 0.4x: ordered [{"quantizer_name": pattern, ...}]) or "dict" (ModelOpt 0.37, the
    one TensorRT-LLM 1.2.1 pins: {pattern: attributes}, "default" applied first). Read off the installed
    ModelOpt's own FP8 preset, so no version table can go stale."""
    if mtq is None:
        import modelopt.torch.quantization as mtq
    return "list" if isinstance(mtq.FP8_DEFAULT_CFG["quant_cfg"], list) else "dict"


def quant_config(
    qformat: str, kv_cache_dtype: str | None = None, family: str = "llama", awq_block_size: int = AWQ_BLOCK_SIZE
) -> dict:
    """The ModelOpt `mtq.quantize` config (a fresh copy) for one qformat (+ KV cache quantizers), in the
    form the installed ModelOpt takes."""
    import modelopt.torch.quantization as mtq

    form = quant_cfg_form(mtq)
    if qformat == "full_prec":
        off = [{"quantizer_name": "*", "enable": False}] if form == "list" else {"default": {"enable": False}}
        cfg = {"quant_cfg": off, "algorithm": "max"}
    else:
        base = {"fp8": mtq.FP8_DEFAULT_CFG, "int4_awq": mtq.INT4_AWQ_CFG, "int8_sq": mtq.INT8_SMOOTHQUANT_CFG}
        cfg = copy.deepcopy(base[qformat])
    if qformat == "int4_awq":
        weight = _entry(cfg, "*weight_quantizer", form)
        weight["block_sizes"][-1] = awq_block_size
    if qformat == "int8_sq" and family == "gemma":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": 0.5}  # TensorRT-LLM's choice: alpha 1 hurts Gemma
    if kv_cache_dtype:
        kv = {"num_bits": (4, 3) if kv_cache_dtype == "fp8" else 8, "axis": None}
        if form == "list":
            cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": kv})
        else:  # "default" disabled every quantizer first, so this one is enabled explicitly
            cfg["quant_cfg"]["*[kv]_bmm_quantizer"] = {**kv, "enable": True}
    return cfg


def _entry(cfg: dict, pattern: str, form: str) -> dict:
    """The attribute dict of `pattern` in either form (raises KeyError when the preset lacks it)."""
    if form == "dict":
        return cfg["quant_cfg"][pattern]
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == pattern and "cfg" in entry:
            return entry["cfg"]
    raise KeyError(pattern)


def quantize(
    model: torch.nn.Module,
    qformat: str,
    kv_cache_dtype: str | None,
    forward_loop: Callable,
    family: str,
    awq_block_size: int = AWQ_BLOCK_SIZE,
) -> torch.nn.Module:
    """Insert ModelOpt quantizers and calibrate them with `forward_loop(model)`; returns the same model."""
    import modelopt.torch.quantization as mtq

    if not needs_calibration(qformat, kv_cache_dtype):
        return model
    cfg = quant_config(qformat, kv_cache_dtype, family, awq_block_size)
    return mtq.quantize(model, cfg, forward_loop=forward_loop)


def export_checkpoint(
    model: torch.nn.Module,
    family: str,
    dtype: str,
    export_dir: str | Path,
    tp_size: int = 1,
    pp_size: int = 1,
    qformat: str = "full_prec",
    kv_cache_dtype: str | None = None,
) -> dict:
    """ModelOpt -> TensorRT-LLM checkpoint (config.json + rank{i}.safetensors); returns the final config."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    export_dir = Path(export_dir)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(
            model,
            decoder_type(family),
            DTYPES[dtype],
            export_dir=export_dir,
            inference_tensor_parallel=tp_size,
            inference_pipeline_parallel=pp_size,
        )
    path = export_dir / "config.json"
    config = json.loads(path.read_text())
    # Same post-fixes as TensorRT-LLM's quantize.py: explicit architecture, no quant algo for full precision,
    # no KV algo unless asked, HF rope_scaling as rotary_scaling.
    config["architecture"] = type(model).__name__
    quant = config.setdefault("quantization", {})
    quant["quant_algo"] = QUANT_ALGO[qformat]
    if kv_cache_dtype is None:
        quant["kv_cache_quant_algo"] = None
    rope_scaling = getattr(model.config, "rope_scaling", None)
    if rope_scaling and "rotary_scaling" not in config:
        config["rotary_scaling"] = rope_scaling
    path.write_text(json.dumps(config, indent=4))
    stray = export_dir / "quant_cfg.json"  # ModelOpt writes an empty per-layer map for some exports
    if stray.is_file() and not json.loads(stray.read_text()).get("quantized_layers"):
        stray.unlink()
    return config


def modelopt_version() -> str:
    try:
        import modelopt

        return modelopt.__version__
    except ImportError:
        return "not installed"


def shape_summary(shape: LLMShape) -> dict:
    d = asdict(shape)
    d["params"] = shape.param_count()
    d["params_billion"] = round(shape.param_count() / 1e9, 3)
    d["weights_gib_16bit"] = round(shape.param_count() * 2 / 2**30, 3)
    return d
