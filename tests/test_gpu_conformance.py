"""The GPU repository and build_engine.sh checked against the upstream facts in tests/upstream_facts.py.

No TensorRT-LLM runs here: what is checked is everything a GPU host would read from our files (configs,
parameters, tensor names and dtypes, table dtype and rows, trtllm-build flags) and what our python
models put on the wire (preprocessing ids, the vision_encoder table, the BLS's request to tensorrt_llm).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import trtllm as T
from mgm_ref.errors import PromptError
from mgm_runtime.contract import read_llm_contract
from tests import triton_stub
from tests import upstream_facts as F
from tests.helpers.repo_fixtures import fake_llm_engine, fake_vision
from triton_models.repo_builder import ServingOptions, build_repo

ROOT = Path(__file__).resolve().parent.parent


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def dtype(value: int) -> str:
    return mc.DataType.Name(value)


def params(config: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.fixture(scope="module")
def gpu_repo(tiny_checkpoints, tmp_path_factory):
    """gpu_repo(dtype, images, family="llama", hd=False) -> (repo, contract), fake engine folders."""
    cache = {}

    def get(engine_dtype="float16", images=1, family="llama", hd=False):
        key = (engine_dtype, images, family, hd)
        if key not in cache:
            tmp = tmp_path_factory.mktemp(f"gpu-{engine_dtype}-{images}")
            ckpt = tiny_checkpoints(family, hd=hd)
            cfg = fake_vision(tmp / "eng", ckpt, "tensorrt")
            contract = fake_llm_engine(
                tmp / "eng",
                cfg,
                dtype=engine_dtype,
                max_images_per_request=images,
                max_input_len=cfg.tokens_per_image * images + 512,
            )
            cache[key] = (build_repo(ckpt, tmp / "eng", tmp / "repo", "gpu"), contract)
        return cache[key]

    return get


# ---- tensorrt_llm: parameters -------------------------------------------------------------------------
def test_every_parameter_the_backend_requires_is_set(gpu_repo):
    p = params(parse(gpu_repo()[0] / "tensorrt_llm" / "config.pbtxt"))
    missing = sorted((set(F.REQUIRED_PARAMETERS) | set(F.EFFECTIVELY_REQUIRED)) - set(p))
    assert not missing, f"the backend throws 'Cannot find parameter with name: {missing[0]}' ({F.MODEL_INSTANCE_STATE})"
    assert p["gpt_model_type"] in F.GPT_MODEL_TYPES
    assert p["batch_scheduler_policy"] in F.BATCH_SCHEDULER_POLICIES
    assert p["guided_decoding_backend"] in F.GUIDED_DECODING_OFF_VALUES  # no guided decoding
    assert Path(p["tokenizer_dir"]).is_dir() and Path(p["gpt_model_path"]).name == "engine"


def test_typed_parameters_parse_the_way_the_backend_parses_them(gpu_repo):
    p = params(parse(gpu_repo()[0] / "tensorrt_llm" / "config.pbtxt"))
    for name in F.BOOL_PARAMETERS:
        if name in p:
            assert p[name] in F.BOOL_STRINGS, f"{name}={p[name]!r}: GetParameter<bool> throws ({F.MODEL_STATE})"
    for name in F.FLOAT_PARAMETERS:
        if name in p:
            float(p[name])
    for name in F.INT_PARAMETERS:
        if name in p:
            int(p[name])
    assert not any("${" in v for v in p.values())


# ---- tensorrt_llm: tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("engine_dtype", ["float16", "bfloat16"])
def test_inputs_are_the_backends_names_and_dtypes(gpu_repo, engine_dtype):
    config = parse(gpu_repo(engine_dtype)[0] / "tensorrt_llm" / "config.pbtxt")
    inputs = {i.name: i for i in config.input}
    unknown = sorted(set(inputs) - F.BACKEND_INPUT_NAMES - F.TEMPLATE_ONLY_INPUTS)
    assert not unknown, f"inputs {unknown} are read by nobody ({F.UTILS_H} InputFieldsNames)"
    assert not set(inputs) & set(F.RENAMED_INPUTS), "random_seed is ignored by the backend: the input is seed"
    assert "seed" in inputs
    for name, spec in inputs.items():
        want_type, want_dims = F.INPUT_SPECS[name]
        want_type = want_type or F.PROMPT_TABLE_TYPE_FOR_ENGINE_DTYPE[engine_dtype]
        assert (dtype(spec.data_type), list(spec.dims)) == (want_type, want_dims), (name, str(F.UPSTREAM_TEMPLATE))
        assert spec.optional == (name not in F.REQUIRED_INPUTS) or name == "input_ids", name
    outputs = {o.name: (dtype(o.data_type), list(o.dims)) for o in config.output}
    assert outputs == F.OUTPUT_SPECS
    assert config.model_transaction_policy.decoupled, F.STREAMING_NEEDS_DECOUPLED


def test_ensemble_feeds_tensorrt_llm_only_inputs_it_declares(gpu_repo):
    repo = gpu_repo()[0]
    llm = {i.name: dtype(i.data_type) for i in parse(repo / "tensorrt_llm" / "config.pbtxt").input}
    ens = parse(repo / "ensemble" / "config.pbtxt")
    step = next(s for s in ens.ensemble_scheduling.step if s.model_name == "tensorrt_llm")
    assert set(step.input_map) <= set(llm)
    assert step.input_map["seed"] == "seed"
    assert set(F.OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR) <= set(step.output_map)
    vision = parse(repo / "vision_encoder" / "config.pbtxt")
    table_out = next(o for o in vision.output if o.name == "OUT_PROMPT_EMBEDDING_TABLE")
    assert dtype(table_out.data_type) == llm["prompt_embedding_table"]


# ---- prompt table: dtype and rows per request ---------------------------------------------------------
@pytest.mark.parametrize("engine_dtype,images", [("float16", 1), ("bfloat16", 1), ("float16", 3), ("bfloat16", 2)])
def test_table_dtype_and_rows_follow_the_engine(gpu_repo, engine_dtype, images):
    repo, built = gpu_repo(engine_dtype, images)
    served = read_llm_contract(repo / "tensorrt_llm" / "contract.json")
    assert served == built
    rows = F.max_rows_per_request(built.max_multimodal_len, built.max_batch_size)
    pre = params(parse(repo / "preprocessing" / "config.pbtxt"))
    assert int(pre["max_images_per_request"]) == images
    assert int(pre["max_images_per_request"]) * built.tokens_per_image <= rows
    assert (int(pre["max_input_len"]), int(pre["max_seq_len"])) == (built.max_input_len, built.max_seq_len)
    vision = parse(repo / "vision_encoder" / "config.pbtxt")
    table = next(o for o in vision.output if o.name == "OUT_PROMPT_EMBEDDING_TABLE")
    assert dtype(table.data_type) == F.PROMPT_TABLE_TYPE_FOR_ENGINE_DTYPE[engine_dtype]


def png(seed: int) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("images", [0, 1, 3])
def test_preprocessing_ids_address_rows_of_this_request_only(gpu_repo, images):
    from triton_models.lib.preprocess import Preprocessor

    repo, built = gpu_repo("bfloat16", 3)
    p = params(parse(repo / "preprocessing" / "config.pbtxt"))
    pre = Preprocessor(
        p["model_dir"], int(p["max_input_len"]), int(p["max_images_per_request"]), vocab_offset=int(p["vocab_offset"])
    )
    out = pre("describe" + " <image>" * 0, [png(i) for i in range(images)])
    fake = out.input_ids[out.input_ids >= built.vocab_offset]
    # every request's fake ids restart at the offset (one table per request in the executor)
    assert fake.tolist() == list(range(built.vocab_offset, built.vocab_offset + images * built.tokens_per_image))
    assert len(fake) <= built.rows_per_request and out.image_sizes.shape[0] == images
    with pytest.raises(PromptError, match="at most 3"):
        pre("describe", [png(i) for i in range(4)])


# ---- what our python models send ----------------------------------------------------------------------
class FakeTensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.utils.dlpack.from_dlpack(capsule))

    def as_numpy(self):
        if isinstance(self.value, torch.Tensor) and self.value.dtype == torch.bfloat16:
            raise RuntimeError("tensor dtype is bf16 and cannot be converted to numpy")  # as the real stub
        return np.asarray(self.value)

    def to_dlpack(self):
        value = self.value if isinstance(self.value, torch.Tensor) else torch.from_numpy(self.value)
        return torch.utils.dlpack.to_dlpack(value)


@pytest.fixture
def fake_pb(monkeypatch):
    """A stand-in for the python backend's stub module, enough for our models' table handling."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.triton_string_to_numpy = {"TYPE_FP16": np.float16, "TYPE_FP32": np.float32}.__getitem__
    pb.get_output_config_by_name = lambda cfg, name: next(o for o in cfg["output"] if o["name"] == name)
    pb.get_output_tensor_by_name = lambda resp, name: resp.get(name)
    pb.MetricFamily = triton_stub.MetricFamily  # vision_encoder's cache metrics
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def load_model_py(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("engine_dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_vision_encoder_emits_the_table_in_the_engine_dtype(gpu_repo, fake_pb, engine_dtype, torch_dtype):
    repo, _ = gpu_repo(engine_dtype)
    module = load_model_py(repo / "vision_encoder" / "1" / "model.py", f"vision_model_{engine_dtype}")
    model = module.TritonPythonModel.__new__(module.TritonPythonModel)
    out = next(
        o for o in parse(repo / "vision_encoder" / "config.pbtxt").output if o.name == "OUT_PROMPT_EMBEDDING_TABLE"
    )
    model.table_type = dtype(out.data_type)
    model.table_dtype = None if model.table_type == "TYPE_BF16" else fake_pb.triton_string_to_numpy(model.table_type)
    rows = np.random.default_rng(0).standard_normal((1, 576, 128)).astype(np.float32)
    tensor = model.table_tensor(rows)
    value = tensor.value if isinstance(tensor.value, torch.Tensor) else torch.from_numpy(tensor.value)
    assert value.dtype == torch_dtype and tuple(value.shape) == rows.shape
    assert torch.allclose(value.float(), torch.from_numpy(rows), rtol=1e-2, atol=1e-2)


def test_vision_encoder_reads_its_table_type_from_the_config(gpu_repo, fake_pb):
    """initialize() must not ask numpy for TYPE_BF16 (it has none)."""
    repo, _ = gpu_repo("bfloat16")
    module = load_model_py(repo / "vision_encoder" / "1" / "model.py", "vision_model_init")
    # the model_config JSON Triton hands to initialize()
    config = json_format.MessageToDict(
        parse(repo / "vision_encoder" / "config.pbtxt"), preserving_proto_field_name=True
    )
    hidden = int(next(o for o in config["output"] if o["name"] == "OUT_PROMPT_EMBEDDING_TABLE")["dims"][-1])
    module.VisionRunner = types.SimpleNamespace(from_dir=lambda *a, **k: types.SimpleNamespace(hidden_size=hidden))
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    assert model.table_type == "TYPE_BF16" and model.table_dtype is None


@pytest.mark.parametrize("rows", [0, 576])
def test_bls_sends_a_table_only_with_image_rows(gpu_repo, fake_pb, rows):
    repo, _ = gpu_repo("bfloat16")
    module = load_model_py(repo / "mgm_bls" / "1" / "model.py", f"bls_model_{rows}")
    table = torch.zeros((1, rows, 128), dtype=torch.bfloat16)
    vis = {
        "OUT_PROMPT_EMBEDDING_TABLE": FakeTensor("OUT_PROMPT_EMBEDDING_TABLE", table),
        "OUT_PROMPT_VOCAB_SIZE": FakeTensor("OUT_PROMPT_VOCAB_SIZE", np.array([[rows]], np.int32)),
    }
    sent = {t.name: t for t in module.prompt_table_inputs(vis)}
    if rows == 0:
        assert sent == {}
    else:
        assert sent["prompt_embedding_table"].value.dtype == torch.bfloat16
        assert int(sent["prompt_vocab_size"].value.reshape(-1)[0]) == rows
    llm = {i.name for i in parse(repo / "tensorrt_llm" / "config.pbtxt").input}
    assert set(module.LLM_INPUTS.values()) <= llm and module.LLM_INPUTS["seed"] == "seed"


def test_bls_asks_tensorrt_llm_for_every_output_it_must(gpu_repo, fake_pb):
    module = load_model_py(gpu_repo()[0] / "mgm_bls" / "1" / "model.py", "bls_model_outputs")
    for name in F.OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR:
        assert name in module.LLM_OUTPUTS, (
            f"{name} not requested: the backend fails the response ({F.MODEL_INSTANCE_STATE})"
        )


def test_bls_stops_a_generation_through_the_backend_stop_input(gpu_repo):
    """The BLS ends an early-stopped answer with a `stop` request under the generation's id, then reads
    the generation's stream to its final response; the backend ends that stream on a stop."""
    import inspect

    from triton_models.lib.bls import StreamedTokens

    inputs = {i.name: dtype(i.data_type) for i in parse(gpu_repo()[0] / "tensorrt_llm" / "config.pbtxt").input}
    assert inputs.get(F.STOP_INPUT) == "TYPE_BOOL", f"no `stop` input for {F.STOP_HANDLING}"
    assert f'Tensor("{F.STOP_INPUT}"' in inspect.getsource(StreamedTokens.close)


# ---- build_engine.sh ----------------------------------------------------------------------------------
def script_flags(script: Path) -> dict[str, str | None]:
    body = script.read_text().split("\n", 5)[-1].replace("\\\n", " ")
    words = shlex.split(body)
    words = words[words.index("trtllm-build") + 1 :]
    flags, i = {}, 0
    while i < len(words):
        flag = words[i]
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        flags[flag] = value
        i += 2 if value is not None else 1
    return flags


@pytest.mark.parametrize(
    "qformat,dtype_,kv",
    [
        ("full_prec", "float16", None),
        ("full_prec", "bfloat16", None),
        ("fp8", "float16", "fp8"),
        ("int4_awq", "bfloat16", None),
        ("int8_sq", "float16", "int8"),
    ],
)
def test_build_engine_sh_uses_only_real_trtllm_build_flags(tmp_path, qformat, dtype_, kv):
    limits = T.engine_limits(max_batch_size=4, tokens_per_image=576, max_images_per_request=2, max_input_len=2048)
    argv = T.trtllm_build_argv(
        "checkpoint", "engine", limits, dtype=dtype_, qformat=qformat, kv_cache_dtype=kv, workers=2
    )
    flags = script_flags(T.write_build_script(tmp_path / "build_engine.sh", argv))
    assert set(flags) <= F.TRTLLM_BUILD_FLAGS, sorted(set(flags) - F.TRTLLM_BUILD_FLAGS)
    for flag, allowed in F.FLAG_VALUE_KIND.items():
        if flag in flags:
            assert flags[flag] in allowed, (flag, flags[flag], str(F.PLUGIN_PY))
    for flag in F.INT_FLAGS:
        if flag in flags:
            int(flags[flag])
    assert len([f for f in flags if f in F.MULTIMODAL_LEN_ALIASES]) == 1
    assert int(flags["--max_multimodal_len"]) == limits.max_multimodal_len == 4 * 576 * 2
    assert F.max_rows_per_request(int(flags["--max_multimodal_len"]), int(flags["--max_batch_size"])) == 2 * 576


# ---- a real tiny `mgm-build llm` feeds `mgm-build repo` -----------------------------------------------
@pytest.mark.parametrize("dtype_", ["float16", "bfloat16"])
def test_repo_limits_are_the_ones_the_engine_build_wrote(tiny_checkpoints, tmp_path, dtype_):
    pytest.importorskip("modelopt.torch.export", reason="nvidia-modelopt is not installed")
    from build_engines import llm as L

    ckpt = tiny_checkpoints("llama")
    eng = tmp_path / "eng"
    args = L.add_llm_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--model_dir",
            str(ckpt),
            "--output_dir",
            str(eng / "llm"),
            "--dtype",
            dtype_,
            "--max_batch_size",
            "4",
            "--max_images_per_request",
            "2",
            "--max_input_len",
            "1600",
        ]
    )
    res = L.run_llm_build(args, log=lambda m: None)
    info = json.loads(res.build_info.read_text())
    flags = script_flags(res.script)
    (eng / "llm" / "engine").mkdir()
    (eng / "llm" / "engine" / "config.json").write_text("{}")  # what trtllm-build would have written
    fake_vision(eng, ckpt, "tensorrt")
    repo = build_repo(ckpt, eng, tmp_path / "repo", "gpu")
    served = read_llm_contract(repo / "tensorrt_llm" / "contract.json")
    assert served.to_dict() == info["contract"]
    assert (served.max_input_len, served.max_seq_len, served.max_batch_size, served.max_multimodal_len) == (
        int(flags["--max_input_len"]),
        int(flags["--max_seq_len"]),
        int(flags["--max_batch_size"]),
        int(flags["--max_multimodal_len"]),
    )
    assert served.dtype == dtype_ and served.prompt_table_type == F.PROMPT_TABLE_TYPE_FOR_ENGINE_DTYPE[dtype_]
    pre = params(parse(repo / "preprocessing" / "config.pbtxt"))
    assert (int(pre["max_seq_len"]), int(pre["max_images_per_request"])) == (1600 + 512, 2)
    assert "own [rows, hidden] prompt table" in info["multimodal"]["fake_ids"]


# ---- image pin -----------------------------------------------------------------------------------------
def test_the_image_pinned_everywhere_ships_trtllm_1_2_1():
    assert T.DEFAULT_IMAGE == F.IMAGE and T.container_image(ROOT) == F.IMAGE and T.TRTLLM_VERSION == F.IMAGE_TRTLLM
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE={F.IMAGE}" in dockerfile and "25.12" not in dockerfile.split("ARG")[1]
    readme = (ROOT / "README.md").read_text()
    gpu = readme[readme.index("## GPU flow") :]
    assert F.IMAGE in gpu and "25.12-trtllm" not in gpu
    for fact in (F.IMAGE_TRTLLM, F.IMAGE_TENSORRT, "0.37"):
        assert fact in gpu, fact


# ---- timing cache ---------------------------------------------------------------------------------------
class FakeBuilderConfig:
    """set_timing_cache returns False for a cache from another TensorRT/GPU, as IBuilderConfig does."""

    def __init__(self, accept_blob: bool):
        self.accept_blob, self.attached = accept_blob, None

    def create_timing_cache(self, blob: bytes):
        return ("cache", blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = self.accept_blob or not cache[1]
        self.attached = cache if ok else self.attached
        return ok


@pytest.mark.parametrize("accept", [True, False])
def test_a_stale_timing_cache_is_reported_and_replaced(tmp_path, accept):
    from build_engines.trt_engine import attach_timing_cache

    path = tmp_path / "cache.bin"
    path.write_bytes(b"stale bytes")
    config, log = FakeBuilderConfig(accept), []
    cache = attach_timing_cache(config, path, log.append)
    assert config.attached == cache
    if accept:
        assert cache[1] == b"stale bytes" and "loaded 11 bytes" in log[0]
    else:
        assert cache[1] == b"" and "rejected" in log[0] and "stale" in log[0]


# ---- KV cache reuse --------------------------------------------------------------------------------------
def test_extra_ids_input_is_the_backends(gpu_repo):
    inputs = {i.name: i for i in parse(gpu_repo()[0] / "tensorrt_llm" / "config.pbtxt").input}
    spec = inputs[F.EXTRA_IDS_INPUT]
    assert (dtype(spec.data_type), list(spec.dims)) == F.EXTRA_IDS_SPEC, str(F.EXTRA_IDS_READER)
    assert spec.optional and spec.allow_ragged_batch  # one value per input id: as ragged as input_ids
    assert F.EXTRA_IDS_INPUT in F.BACKEND_INPUT_NAMES and F.INPUT_SPECS[F.EXTRA_IDS_INPUT] == F.EXTRA_IDS_SPEC


@pytest.mark.parametrize("reuse", [True, False])
def test_kv_cache_reuse_is_always_written_explicitly(tiny_checkpoints, tmp_path, reuse):
    """Absent, the backend turns reuse on: "off" must be written, and it follows `--kv_cache_reuse`."""
    ckpt = tiny_checkpoints("llama")
    cfg = fake_vision(tmp_path / "eng", ckpt, "tensorrt")
    fake_llm_engine(tmp_path / "eng", cfg, dtype="float16", max_images_per_request=1)
    repo = build_repo(ckpt, tmp_path / "eng", tmp_path / "repo", "gpu", options=ServingOptions(kv_cache_reuse=reuse))
    p = params(parse(repo / "tensorrt_llm" / "config.pbtxt"))
    assert F.KV_REUSE_DEFAULT_WHEN_ABSENT and F.KV_REUSE_PARAMETER in p, str(F.MODEL_INSTANCE_STATE)
    assert p[F.KV_REUSE_PARAMETER] == ("true" if reuse else "false") and p[F.KV_REUSE_PARAMETER] in F.BOOL_STRINGS


@pytest.mark.parametrize("qformat,dtype_,kv", [("full_prec", "float16", None), ("fp8", "bfloat16", "fp8")])
def test_the_engine_build_enables_what_kv_reuse_needs(tmp_path, qformat, dtype_, kv):
    limits = T.engine_limits(max_batch_size=4, tokens_per_image=576, max_images_per_request=1, max_input_len=2048)
    argv = T.trtllm_build_argv("checkpoint", "engine", limits, dtype=dtype_, qformat=qformat, kv_cache_dtype=kv)
    flags = script_flags(T.write_build_script(tmp_path / "build_engine.sh", argv))
    for flag, value in F.REUSE_REQUIRED_BUILD_FLAGS.items():
        assert flags.get(flag) == value, (flag, str(F.REUSE_ENGINE_CHECKS))
    assert not set(flags) & set(F.REUSE_FORBIDDEN_BUILD_FLAGS), str(F.BUILD_PY)


def test_with_reuse_on_every_image_request_carries_extra_ids(gpu_repo):
    """With reuse on, the executor rejects an image request without extra ids (F.REUSE_VALIDATION)."""
    repo = gpu_repo()[0]
    assert params(parse(repo / "tensorrt_llm" / "config.pbtxt"))[F.KV_REUSE_PARAMETER] == "true"
    step = next(
        s for s in parse(repo / "ensemble" / "config.pbtxt").ensemble_scheduling.step if s.model_name == "tensorrt_llm"
    )
    assert F.EXTRA_IDS_INPUT in step.input_map and "prompt_embedding_table" in step.input_map
    assert params(parse(repo / "mgm_bls" / "config.pbtxt"))["llm_takes_extra_ids"] == "true"


def test_the_cpu_engine_keys_blocks_as_the_executor_does():
    """(id, extra id) for every token, text included; no extra ids = extra id 0 (F.EXTRA_IDS_PER_INPUT_TOKEN)."""
    from triton_models.lib.engine.prefix_cache import block_keys

    vocab = 1000
    text = np.arange(10, 42)
    assert block_keys(text, np.full(32, F.DEFAULT_EXTRA_ID, np.uint64), 16, vocab) == block_keys(text, None, 16, vocab)
    marked = np.zeros(32, np.uint64)
    marked[20] = 7  # an extra id on a text token is part of its key, as in the executor's UniqueToken
    keys, other = block_keys(text, None, 16, vocab), block_keys(text, marked, 16, vocab)
    assert keys[0] == other[0] and keys[1] != other[1]
    image = np.r_[np.arange(3), vocab + np.arange(29)]
    assert block_keys(image, None, 16, vocab) == []  # fake ids without extra ids: never keyed
