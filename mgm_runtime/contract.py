"""The build->serve contract: what an engine was built for, as data both sides read.

`mgm-build llm` writes the LLM contract into `build_info.json` ("contract"); `mgm-build vision` writes
`vision/config.json`. `mgm-build repo` reads both through this module and never recomputes a limit, so
the repository cannot ask the engine for more than it was built for. The CPU path derives its contract
with the same `derive_limits` and goes through the same reader.

TensorRT-LLM facts behind the fields (see tests/upstream_facts.py for where each was read):
- each request's prompt table may hold at most max_multimodal_len // max_batch_size rows;
- each request's table starts again at row 0, so its fake ids start at vocab_offset;
- the table must have the engine's activation dtype (float16 or bfloat16).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mgm_ref.constants import MIN_TEXT_TOKENS
from mgm_ref.errors import MGMError

CONTRACT_VERSION = 1
DEFAULT_MAX_OUTPUT_LEN = 512  # generated tokens allowed on top of max_input_len by default
DEFAULT_MAX_NUM_TOKENS = 8192  # trtllm-build's own default
# engine activation dtype -> the Triton type its prompt table must be sent in
PROMPT_TABLE_TRITON_TYPE = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}


class ContractError(MGMError):
    """A build_info.json / vision config.json is missing, malformed, or asked for more than it allows."""


@dataclass(frozen=True)
class LLMContract:
    """What the LLM (a TensorRT-LLM engine, or the CPU PyTorch runner) was built to accept."""

    runtime: str  # "tensorrt_llm" | "pytorch"
    dtype: str  # activation dtype = the prompt table's dtype
    max_batch_size: int
    max_input_len: int  # prompt tokens, image rows included
    max_seq_len: int  # prompt + generated tokens
    max_num_tokens: int
    max_multimodal_len: int  # prompt-table rows of a full batch
    tokens_per_image: int
    max_images_per_request: int
    hidden_size: int
    vocab_offset: int  # first fake id (the engine's, possibly padded, vocab size)

    def __post_init__(self):
        if self.dtype not in PROMPT_TABLE_TRITON_TYPE:
            raise ContractError(f"contract dtype {self.dtype!r} is not one of {sorted(PROMPT_TABLE_TRITON_TYPE)}")
        if self.max_images_per_request * self.tokens_per_image > self.rows_per_request:
            raise ContractError(
                f"{self.max_images_per_request} images x {self.tokens_per_image} rows exceed the "
                f"{self.rows_per_request} prompt-table rows a request may carry "
                f"(max_multimodal_len {self.max_multimodal_len} // max_batch_size {self.max_batch_size})"
            )

    @property
    def rows_per_request(self) -> int:
        """TensorRT-LLM's per-request table limit: max_prompt_embedding_table_size // max_batch_size."""
        return self.max_multimodal_len // self.max_batch_size

    @property
    def prompt_table_type(self) -> str:
        return PROMPT_TABLE_TRITON_TYPE[self.dtype]

    def to_dict(self) -> dict:
        return {"version": CONTRACT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "contract") -> LLMContract:
        if data.get("version") != CONTRACT_VERSION:
            raise ContractError(
                f"{where}: contract version {data.get('version')!r}, this code reads "
                f"{CONTRACT_VERSION}; rebuild with `mgm-build llm`"
            )
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ContractError(f"{where}: the contract lacks {missing}; rebuild with `mgm-build llm`")
        values: dict[str, Any] = {n: data[n] if n in ("runtime", "dtype") else int(data[n]) for n in names}
        return cls(**values)

    def with_overrides(self, where: str, **requested: int | None) -> LLMContract:
        """Lower limits for serving; a value above what was built is refused, naming both numbers."""
        changes = {}
        for name, value in requested.items():
            if value is None:
                continue
            built = getattr(self, name)
            if value < 1:
                raise ContractError(f"--{name} must be >= 1, got {value}")
            if value > built:
                raise ContractError(
                    f"--{name} {value} exceeds the {built} the engine was built for ({where}); "
                    f"rebuild it with a larger --{name} or ask for at most {built}"
                )
            changes[name] = value
        if not changes:
            return self
        # max_batch_size only bounds how many requests Triton batches; the per-request table limit stays
        # the engine's, so it is not recomputed from a lower serving batch size.
        data = {**asdict(self), **changes}
        if "max_batch_size" in changes:
            data["max_multimodal_len"] = self.rows_per_request * changes["max_batch_size"]
        return LLMContract(**data)


def derive_limits(
    *,
    max_batch_size: int,
    tokens_per_image: int,
    max_images_per_request: int = 1,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    default_input_len: int = 2048,
    max_num_tokens: int | None = None,
) -> dict[str, int]:
    """The one formula for the engine limits (image rows included in max_input_len); checks them."""
    if max_batch_size < 1:
        raise ContractError(f"--max_batch_size must be >= 1, got {max_batch_size}")
    if max_images_per_request < 1:
        raise ContractError(f"--max_images_per_request must be >= 1, got {max_images_per_request}")
    image_tokens = tokens_per_image * max_images_per_request
    max_input_len = default_input_len if max_input_len is None else max_input_len
    # a request with every image must still fit its template and question, or that count is never served
    if max_input_len < image_tokens + MIN_TEXT_TOKENS:
        raise ContractError(
            f"--max_input_len {max_input_len} leaves no room for text: it counts the image tokens "
            f"({max_images_per_request} x {tokens_per_image} = {image_tokens}) plus the text prompt; "
            f"use at least {image_tokens + MIN_TEXT_TOKENS} or fewer --max_images_per_request"
        )
    max_seq_len = max_input_len + DEFAULT_MAX_OUTPUT_LEN if max_seq_len is None else max_seq_len
    if max_seq_len <= max_input_len:
        raise ContractError(
            f"--max_seq_len {max_seq_len} must exceed --max_input_len {max_input_len} (it is prompt + generated tokens)"
        )
    max_num_tokens = max_num_tokens or max(DEFAULT_MAX_NUM_TOKENS, max_input_len)
    if max_num_tokens < max_input_len:
        raise ContractError(
            f"max_num_tokens {max_num_tokens} < max_input_len {max_input_len}: one full prompt "
            "(image rows included) must fit one context step"
        )
    return {
        "max_batch_size": max_batch_size,
        "max_input_len": max_input_len,
        "max_seq_len": max_seq_len,
        "max_multimodal_len": max_batch_size * image_tokens,
        "max_num_tokens": max_num_tokens,
        "tokens_per_image": tokens_per_image,
        "max_images_per_request": max_images_per_request,
    }


def read_json(path: Path, what: str, how: str) -> dict:
    if not path.is_file():
        raise ContractError(f"no {path}: {what}; build it with `{how}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{path} is not valid JSON ({e}); rebuild it with `{how}`") from None


def read_llm_contract(build_info: str | Path) -> LLMContract:
    """The "contract" block of a build_info.json (written by `mgm-build llm`, or for the CPU path)."""
    path = Path(build_info)
    info = read_json(path, "the LLM build record", "mgm-build llm")
    if "contract" not in info:
        raise ContractError(f'{path} has no "contract" block (written by an older mgm-build llm); rebuild it')
    return LLMContract.from_dict(info["contract"], str(path))


def write_llm_contract(build_info: str | Path, contract: LLMContract, **extra) -> Path:
    path = Path(build_info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"contract": contract.to_dict(), **extra}, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class VisionContract:
    """What `mgm-build vision` built: backend, shapes per image, rows per image, output dtype."""

    backend: str
    dtype: str
    max_batch_size: int
    tokens_per_image: int
    hidden_size: int
    input_shapes: dict  # input name -> per-image shape (no batch dimension)

    @property
    def images_shape(self) -> tuple[int, ...]:
        return tuple(self.input_shapes["images"])

    @property
    def images_aux_shape(self) -> tuple[int, ...]:
        return tuple(self.input_shapes["images_aux"])


def read_vision_contract(config_json: str | Path) -> VisionContract:
    path = Path(config_json)
    art = read_json(path, "the vision artifact's config", "mgm-build vision")
    try:
        shapes = {t["name"]: [int(d) for d in t["per_image_shape"]] for t in art["inputs"]}
        contract = VisionContract(
            str(art["backend"]),
            str(art["dtype"]),
            int(art["max_batch_size"]),
            int(art["tokens_per_image"]),
            int(art["hidden_size"]),
            shapes,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ContractError(f"{path}: malformed vision config ({e!r}); rebuild it with `mgm-build vision`") from None
    if set(shapes) != {"images", "images_aux"}:
        raise ContractError(f"{path}: inputs {sorted(shapes)}, expected images and images_aux")
    return contract
