"""Upstream facts the GPU path relies on, each with the file it was read from.

Nothing here can be executed on our machines (no TensorRT-LLM, no GPU), so these were read from the
source. TensorRT-LLM's Triton backend lives in NVIDIA/TensorRT-LLM under triton_backend/ from 1.0 on;
the target is the v1.2.1 line shipped in nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3. The
stored copies we could read are single commits of each file (the tag itself could not be resolved
here); the commit is recorded per file. tests/test_gpu_conformance.py checks the generated GPU
repository and build_engine.sh against this data.
"""

from __future__ import annotations

from dataclasses import dataclass

TRTLLM = "NVIDIA/TensorRT-LLM"
TARGET = "v1.2.1 (image 26.07-trtllm-python-py3)"
BACKEND_SRC = "triton_backend/inflight_batcher_llm/src"
COMMIT_MODEL_INSTANCE = "0c8de69a1ca6213eebb20a51873890ff128666c2"  # model_instance_state.cc + config.pbtxt
COMMIT_MODEL_STATE = "5cdd69218f8815d6c8c101ca1facf2ec4ac4b622"
COMMIT_UTILS_H = "14c3afecc065a0dc44ec18332fd5ed1e632002d4"
COMMIT_UTILS_CC = "192908136e53ddfc2f282e81e6ecdb76af06eb50"
COMMIT_BUILD_PY = "008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc"


@dataclass(frozen=True)
class Source:
    repo: str
    path: str
    version: str

    def __str__(self) -> str:
        return f"{self.repo}:{self.path} @ {self.version}"


MODEL_INSTANCE_STATE = Source(TRTLLM, f"{BACKEND_SRC}/model_instance_state.cc", COMMIT_MODEL_INSTANCE)
MODEL_STATE = Source(TRTLLM, f"{BACKEND_SRC}/model_state.cc", COMMIT_MODEL_STATE)
UTILS_H = Source(TRTLLM, f"{BACKEND_SRC}/utils.h", COMMIT_UTILS_H)
UTILS_CC = Source(TRTLLM, f"{BACKEND_SRC}/utils.cc", COMMIT_UTILS_CC)
UPSTREAM_TEMPLATE = Source(
    TRTLLM, "triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt", COMMIT_MODEL_INSTANCE
)
PROMPT_TUNING_BUFFERS = Source(TRTLLM, "cpp/tensorrt_llm/batch_manager/promptTuningBuffers.cpp", "stored copy")
BUILD_PY = Source(TRTLLM, "tensorrt_llm/commands/build.py", COMMIT_BUILD_PY)
PLUGIN_PY = Source(TRTLLM, "tensorrt_llm/plugin/plugin.py", "stored copy (pydantic PluginConfig, 1.x)")
TRTLLM_REQUIREMENTS = Source(TRTLLM, "requirements.txt", "1.1-1.3 line (PLATFORM_NOTES §5)")
PYTHON_BACKEND_BF16 = Source("triton-inference-server/python_backend", "BF16 identity example model.py", "stored copy")
TENSORRT_HEADER = Source("NVIDIA/TensorRT", "include/NvInferImpl.h (VBuilderConfig)", "10.x")

# ---- parameters ------------------------------------------------------------------------------------
# GetParameter throws "Cannot find parameter with name: X" when X is absent (model_state.cc); these calls
# have no try/catch around them, so the model fails to load without them.
REQUIRED_PARAMETERS = {
    "gpt_model_type": MODEL_INSTANCE_STATE,  # getBatchingTypeFromParams
    "tokenizer_dir": MODEL_INSTANCE_STATE,  # getGuidedDecodingConfigFromParams
    "xgrammar_tokenizer_info_path": MODEL_INSTANCE_STATE,
    "guided_decoding_backend": MODEL_INSTANCE_STATE,
}
# In a try/catch, but "Both encoder and decoder model paths are empty" is a TLLM_CHECK right after.
EFFECTIVELY_REQUIRED = {"gpt_model_path": MODEL_INSTANCE_STATE}
GPT_MODEL_TYPES = ("V1", "v1", "inflight_batching", "inflight_fused_batching")
BATCH_SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")
# empty (or the literal unfilled placeholder) = guided decoding off
GUIDED_DECODING_OFF_VALUES = ("", "${guided_decoding_backend}")
# GetParameter<bool> accepts exactly these (anything else throws "Cannot convert X to a boolean")
BOOL_STRINGS = ("True", "true", "TRUE", "1", "False", "false", "FALSE", "0")
BOOL_PARAMETERS = (
    "enable_kv_cache_reuse",
    "enable_chunked_context",
    "exclude_input_in_output",
    "normalize_log_probs",
    "kv_cache_onboard_blocks",
    "enable_trt_overlap",
    "multi_block_mode",
    "enable_context_fmha_fp32_acc",
    "cuda_graph_mode",
    "speculative_decoding_fast_logits",
)
FLOAT_PARAMETERS = (
    "kv_cache_free_gpu_mem_fraction",
    "cross_kv_cache_fraction",
    "gpu_weights_percent",
    "lora_cache_gpu_memory_fraction",
)
INT_PARAMETERS = (
    "max_beam_width",
    "max_tokens_in_paged_kv_cache",
    "sink_token_length",
    "num_nodes",
    "cancellation_check_period_ms",
    "stats_check_period_ms",
    "iter_stats_max_iterations",
    "request_stats_max_iterations",
    "recv_poll_period_ms",
)

# ---- tensors ---------------------------------------------------------------------------------------
# InputFieldsNames (utils.h) plus the two read by name in model_instance_state.cc / utils.cc
BACKEND_INPUT_NAMES = frozenset(
    {
        "input_ids",
        "encoder_input_features",
        "encoder_output_lengths",
        "input_lengths",
        "decoder_input_ids",
        "request_output_len",
        "no_repeat_ngram_size",
        "num_return_sequences",
        "end_id",
        "pad_id",
        "bad_words_list",
        "stop_words_list",
        "embedding_bias",
        "context_phase_params",
        "cross_attention_mask",
        "skip_cross_attn_blocks",
        "multimodal_embedding",
        "return_log_probs",
        "return_generation_logits",
        "return_context_logits",
        "exclude_input_in_output",
        "return_perf_metrics",
        "return_kv_cache_reuse_stats",
        "beam_width",
        "runtime_top_k",
        "runtime_top_p",
        "runtime_top_k_min",
        "runtime_top_p_decay",
        "runtime_top_p_reset_ids",
        "temperature",
        "len_penalty",
        "early_stopping",
        "repetition_penalty",
        "min_tokens",
        "beam_search_diversity_rate",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "prompt_embedding_table",
        "prompt_table_extra_ids",
        "mrope_rotary_cos_sin",
        "mrope_position_deltas",
        "lora_task_id",
        "lora_weights",
        "lora_config",
        "draft_input_ids",
        "draft_logits",
        "draft_acceptance_threshold",
        "retention_token_range_starts",
        "retention_token_range_ends",
        "retention_token_range_priorities",
        "retention_token_range_durations_ms",
        "retention_decode_priority",
        "retention_decode_duration_ms",
        "guided_decoding_guide_type",
        "guided_decoding_guide",
        "lookahead_window_size",
        "lookahead_ngram_size",
        "lookahead_verification_set_size",
        "streaming",
        "stop",
    }
)
# Renamed in 2025: an input called "random_seed" is read by nobody and the default seed is used.
RENAMED_INPUTS = {"random_seed": "seed"}
# Declared by upstream's own template but not read by the C++ backend (it takes the row count from the
# table's shape); harmless to send.
TEMPLATE_ONLY_INPUTS = frozenset({"prompt_vocab_size"})

# name -> (data_type, dims) as upstream's tensorrt_llm/config.pbtxt declares them (None: engine dtype)
INPUT_SPECS = {
    "input_ids": ("TYPE_INT32", [-1]),
    "input_lengths": ("TYPE_INT32", [1]),
    "request_output_len": ("TYPE_INT32", [1]),
    "end_id": ("TYPE_INT32", [1]),
    "pad_id": ("TYPE_INT32", [1]),
    "stop_words_list": ("TYPE_INT32", [2, -1]),
    "bad_words_list": ("TYPE_INT32", [2, -1]),
    "runtime_top_k": ("TYPE_INT32", [1]),
    "runtime_top_p": ("TYPE_FP32", [1]),
    "temperature": ("TYPE_FP32", [1]),
    "seed": ("TYPE_UINT64", [1]),
    "streaming": ("TYPE_BOOL", [1]),
    # triton-inference-server/tensorrtllm_backend:all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt
    # @ 00abb4936166b1c8af9b63bc1141231b790caad8
    "stop": ("TYPE_BOOL", [1]),
    "prompt_embedding_table": (None, [-1, -1]),
    "prompt_vocab_size": ("TYPE_INT32", [1]),
    "prompt_table_extra_ids": ("TYPE_UINT64", [-1]),
}
REQUIRED_INPUTS = ("input_lengths", "request_output_len")  # not optional in upstream's template
OUTPUT_SPECS = {"output_ids": ("TYPE_INT32", [-1, -1]), "sequence_length": ("TYPE_INT32", [-1])}
# fillTritonResponse throws "<name> tensor must be present in list of output tensors" unless the
# request asked for both (model_instance_state.cc; getRequestOutputNames in utils.cc)
OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR = ("output_ids", "sequence_length")
# "Streaming is only supported if model is deployed using decoupled mode." (utils.cc)
STREAMING_NEEDS_DECOUPLED = UTILS_CC

# ---- prompt table ----------------------------------------------------------------------------------
# PromptTuningBuffers: embeddingTable is allocated in modelConfig.getDataType(); validate() throws
# "Request embedding table data type doesn't match model weight data type." otherwise.
PROMPT_TABLE_TYPE_FOR_ENGINE_DTYPE = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


# mMaxPromptVocabSize = maxPromptEmbeddingTableSize / maxBatchSize; a request over it throws
# "Prompt vocab size N is larger than max prompt vocab size of M".
def max_rows_per_request(max_prompt_embedding_table_size: int, max_batch_size: int) -> int:
    return max_prompt_embedding_table_size // max_batch_size


# Each request's table is copied to slice batchIdx * mMaxPromptVocabSize and tasks = iota(batch): the
# fake ids of every request start at vocab_size, whatever the other requests carry.
FAKE_IDS_RESTART_PER_REQUEST = PROMPT_TUNING_BUFFERS
# numpy has no bf16: Tensor.as_numpy() raises "tensor dtype is bf16 and cannot be converted to numpy";
# BF16 tensors go through to_dlpack / Tensor.from_dlpack.
BF16_NEEDS_DLPACK = PYTHON_BACKEND_BF16

# ---- trtllm-build ----------------------------------------------------------------------------------
# argparse flags of trtllm-build (build.py) and the plugin flags it adds (plugin.py cli_plugin_args)
TRTLLM_BUILD_FLAGS = frozenset(
    {
        "--checkpoint_dir",
        "--model_config",
        "--build_config",
        "--output_dir",
        "--max_batch_size",
        "--max_input_len",
        "--max_seq_len",
        "--max_decoder_seq_len",
        "--max_beam_width",
        "--max_num_tokens",
        "--opt_num_tokens",
        "--max_encoder_input_len",
        "--max_prompt_embedding_table_size",
        "--max_multimodal_len",
        "--kv_cache_type",
        "--paged_kv_cache",
        "--input_timing_cache",
        "--output_timing_cache",
        "--profiling_verbosity",
        "--strip_plan",
        "--weight_sparsity",
        "--weight_streaming",
        "--fast_build",
        "--workers",
        "--log_level",
        "--enable_debug_output",
        "--visualize_network",
        "--dry_run",
        "--monitor_memory",
        "--logits_dtype",
        "--gather_context_logits",
        "--gather_generation_logits",
        "--gather_all_token_logits",
        "--lora_dir",
        "--lora_ckpt_source",
        "--lora_target_modules",
        "--max_lora_rank",
        "--speculative_decoding_mode",
        "--max_draft_len",
        "--auto_parallel",
        "--gpus_per_node",
        "--cluster_key",
        # plugin.py cli_plugin_args
        "--bert_attention_plugin",
        "--gpt_attention_plugin",
        "--gemm_plugin",
        "--gemm_swiglu_plugin",
        "--fp8_rowwise_gemm_plugin",
        "--lora_plugin",
        "--dora_plugin",
        "--moe_plugin",
        "--mamba_conv1d_plugin",
        "--nccl_plugin",
        "--low_latency_gemm_plugin",
        "--low_latency_gemm_swiglu_plugin",
        "--gemm_allreduce_plugin",
        "--context_fmha",
        "--bert_context_fmha_fp32_acc",
        "--remove_input_padding",
        "--tokens_per_block",
        "--use_paged_context_fmha",
        "--use_fp8_context_fmha",
        "--fuse_fp4_quant",
        "--multiple_profiles",
        "--paged_state",
        "--streamingllm",
        "--norm_quant_fusion",
        "--reduce_fusion",
        "--user_buffer",
        "--use_fused_mlp",
        "--pp_reduce_scatter",
    }
)
# --max_multimodal_len is an alias of --max_prompt_embedding_table_size (">0 enables ... multimodal input")
MULTIMODAL_LEN_ALIASES = ("--max_prompt_embedding_table_size", "--max_multimodal_len")
KV_CACHE_TYPES = ("continuous", "paged", "disabled")  # enum_type(KVCacheType), lower-cased
ENABLE_DISABLE = ("enable", "disable")  # bool plugin flags take these strings
# PluginConfig: DefaultPluginDtype = Literal["auto", "float16", "float32", "bfloat16", "int32", None];
# "disable" maps to None; gemm_plugin adds "fp8" and "nvfp4"
PLUGIN_DTYPES = ("auto", "float16", "float32", "bfloat16", "int32", "disable")
GEMM_PLUGIN_DTYPES = (*PLUGIN_DTYPES, "fp8", "nvfp4")
FLAG_VALUE_KIND = {
    "--kv_cache_type": KV_CACHE_TYPES,
    "--remove_input_padding": ENABLE_DISABLE,
    "--context_fmha": ENABLE_DISABLE,
    "--use_paged_context_fmha": ENABLE_DISABLE,
    "--use_fp8_context_fmha": ENABLE_DISABLE,
    "--gemm_plugin": GEMM_PLUGIN_DTYPES,
    "--gpt_attention_plugin": PLUGIN_DTYPES,
}
INT_FLAGS = (
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--max_multimodal_len",
    "--workers",
)

# ---- versions --------------------------------------------------------------------------------------
# Triton's compatibility matrix: 26.04-26.07 = TensorRT-LLM 1.2.1 / TensorRT 10.14.1.48 / Python 3.12.3 /
# torch 2.10.0a0 / CUDA 13.1.0.036; 26.03 = 1.2.0; 25.12-26.02 = 1.1.0; no trtllm row for 26.08.
COMPATIBILITY = Source(
    "triton-inference-server/server", "docs/introduction/compatibility.md", "0f963c9a8c6913aa4cd9b57ee04f9c2b76ee8d2a"
)
IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
IMAGE_TRTLLM = "1.2.1"
IMAGE_TENSORRT = "10.14.1.48"
# TensorRT-LLM requirements.txt: read at commit 000867d9b1ad62f3de1e54e111c094da492a5626 (a 1.1-line copy:
# tensorrt~=10.13.3); that 1.2.1 keeps the pin is PLATFORM_NOTES §5's reading, not re-read at the tag here
MODELOPT_PIN = "nvidia-modelopt[torch]~=0.37.0"
# IBuilderConfig::setTimingCache(cache, ignoreMismatch) returns bool: false = cache not attached
SET_TIMING_CACHE_RETURNS_BOOL = TENSORRT_HEADER

# ---- KV cache reuse with a prompt table --------------------------------------------------------------
# Read with the search tool's read_file (NVIDIA/TensorRT-LLM, the stored copy of each file at this commit).
COMMIT_LLM_REQUEST_H = "00e9b8a773a690c1182ba23717e6c660a2246b70"
COMMIT_LLM_REQUEST_CC = "119c6e60e65e5ecec4e97afdb6ea584f674aed24"
COMMIT_KV_CACHE_MANAGER = "002ba6a7cc5eb28f180d45d4a91142d9d927a606"
COMMIT_TRT_GPT_MODEL_IFB = "00825c4ee813bdc5eb2e5cf218b644b8c18ce2ec"
LLM_REQUEST_H = Source(TRTLLM, "cpp/include/tensorrt_llm/batch_manager/llmRequest.h", COMMIT_LLM_REQUEST_H)
LLM_REQUEST_CC = Source(TRTLLM, "cpp/tensorrt_llm/batch_manager/llmRequest.cpp", COMMIT_LLM_REQUEST_CC)
KV_CACHE_MANAGER = Source(TRTLLM, "cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp", COMMIT_KV_CACHE_MANAGER)
TRT_GPT_MODEL_IFB = Source(
    TRTLLM, "cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp", COMMIT_TRT_GPT_MODEL_IFB
)

# utils.h InputFieldsNames::InputTokenExtraIds = "prompt_table_extra_ids"
EXTRA_IDS_INPUT = "prompt_table_extra_ids"
# utils.cc getPromptTuningConfigFromTensors: extractVector<uint64_t> copies the tensor's raw buffer as uint64
# (no dtype check: anything but 8-byte unsigned ids is misread), one flat vector per request
EXTRA_IDS_SPEC = ("TYPE_UINT64", [-1])
EXTRA_IDS_READER = UTILS_CC
# ... and only inside `if (inputsTensors.count(promptEmbeddingTable))`: without a table the input is ignored;
# with one it is kept only when `InputTokenExtraIds.size() == inputlen` (input_ids' length), else dropped
# silently (PromptTuningConfig without extra ids)
EXTRA_IDS_ONLY_WITH_A_TABLE = UTILS_CC
EXTRA_IDS_LENGTH_MUST_EQUAL_INPUT_IDS = UTILS_CC
# llmRequest.h initialize(): every input token, text included, becomes UniqueToken{tokenId, tokenExtraId};
# no extra ids: "Default extra id is 0" for every token. The ids are not restricted to fake ids (>= vocab):
# any value may mark any token; 0 for text is the convention that equals the default.
EXTRA_IDS_PER_INPUT_TOKEN = LLM_REQUEST_H
DEFAULT_EXTRA_ID = 0
# kvCacheManager.cpp: BlockKey == compares usesExtraIds, loraTaskId, uniqueTokens (id, extra id pairs),
# extraKeys and cacheSaltID; BlockKeyHasher mixes each token's extra id in only when usesExtraIds and seeds
# with the parent block's hash (a chained key). usesExtraIds = the request has extra ids: a request with
# extra ids and one without never share a block, even of text.
BLOCK_KEY_FIELDS = ("usesExtraIds", "loraTaskId", "uniqueTokens", "extraKeys", "cacheSaltID")
BLOCK_KEYS = KV_CACHE_MANAGER
# llmRequest.cpp validate(): with enableKVCacheReuse, a request carrying a prompt table (and its vocab size)
# fails unless it has extra ids of exactly the prompt's length
REUSE_WITH_TABLE_NEEDS_EXTRA_IDS = (
    "Input token extra ids must be provided when enabling kv cache reuse with prompt table"
)
REUSE_VALIDATION = LLM_REQUEST_CC
# model_instance_state.cc getKvCacheConfigFromParams (@ COMMIT_MODEL_INSTANCE): GetParameter<bool>
# ("enable_kv_cache_reuse"); absent: "enable_kv_cache_reuse is not specified, will be set to true"
KV_REUSE_PARAMETER = "enable_kv_cache_reuse"
KV_REUSE_DEFAULT_WHEN_ABSENT = True
# trtGptModelInflightBatching.cpp fixExecutorConfig: block reuse is switched off (a warning, no error) when
# the engine lacks paged context FMHA or computes context logits; inflight batching itself requires the
# GPT attention plugin with packed input and a paged KV cache
REUSE_ENGINE_CHECKS = TRT_GPT_MODEL_IFB
REUSE_REQUIRED_BUILD_FLAGS = {
    "--use_paged_context_fmha": "enable",
    "--kv_cache_type": "paged",
    "--remove_input_padding": "enable",
}
# build.py: --gather_all_token_logits sets gather_context_logits (context logits: reuse off)
REUSE_FORBIDDEN_BUILD_FLAGS = ("--gather_context_logits", "--gather_all_token_logits")

# ---- stopping a generation -------------------------------------------------------------------------
# model_instance_state.cc (a stored copy of the 1.x backend): handleStopRequest reads the `stop` input,
# and for the Triton request id it names calls mExecutor->cancelRequest on each of its executor
# requests, answering the stop request itself with one empty final response. The generation's own
# stream ends in WaitForResponse, which sends TRITONSERVER_RESPONSE_COMPLETE_FINAL when the executor's
# response for it is final (for a cancelled request, the executor's cancellation response; that part
# is executor behaviour, not read here). mgm_bls relies on both: it sends `stop` under the
# generation's request id and then reads that stream to its final response (lib/bls.py).
STOP_HANDLING = MODEL_INSTANCE_STATE
STOP_INPUT = "stop"
