"""CPU stand-in for TensorRT-LLM's inflight batcher: Triton glue around the CPU LLM engine.

`async def execute` runs on the python backend's one event loop: each request parses its inputs,
submits to the engine with a callback that only hands tokens over to the loop, and sends its responses
from the loop. So every python-backend call of this model happens on one thread; the engine thread
never touches pb_utils (concurrent senders crashed the stub).

With `enable_kv_cache_reuse` the engine keeps a prefix KV cache of `kv_cache_mb` MiB, keyed by
(token id, prompt_table_extra_ids value) pairs; its counters are Triton custom metrics (`StatsMetrics`),
updated from the event loop when a request ends.
"""

import asyncio
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mgm_ref.loader import load_llm
from triton_models.lib import attention
from triton_models.lib.engine import GenerationRequest, LLMEngine, PrefixCache
from triton_models.lib.metrics import RequestMetrics, StatsMetrics
from triton_models.lib.preprocess import single_token_stops
from triton_models.lib.triton_io import (
    ModelConfigError,
    check_config,
    error_response,
    optional_input,
    params_of,
    scalar_input,
    use_utf8_locale,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.2  # how often a request that is waiting for tokens checks whether its client left
TRUE, FALSE = ("true", "1"), ("false", "0")  # what enable_kv_cache_reuse accepts (any case)

# metric name -> (kind, description, engine snapshot key)
KV_CACHE_METRICS = {
    "mgm_kv_cache_hit_blocks_total": ("COUNTER", "prompt KV blocks taken from the prefix cache", "prefix_hit_blocks"),
    "mgm_kv_cache_miss_blocks_total": ("COUNTER", "keyable prompt KV blocks not in the cache", "prefix_miss_blocks"),
    "mgm_kv_cache_evicted_blocks_total": (
        "COUNTER",
        "KV blocks evicted to stay within the budget",
        "prefix_evicted_blocks",
    ),
    "mgm_kv_cache_reused_tokens_total": ("COUNTER", "prompt tokens not prefilled thanks to the cache", "reused_tokens"),
    "mgm_kv_cache_prefilled_tokens_total": ("COUNTER", "prompt tokens prefilled", "prefill_tokens"),
    "mgm_kv_cache_blocks": ("GAUGE", "KV blocks held by the prefix cache", "prefix_blocks"),
    "mgm_kv_cache_bytes": ("GAUGE", "bytes held by the prefix cache", "prefix_bytes"),
    "mgm_kv_cache_budget_bytes": ("GAUGE", "byte budget of the prefix cache", "prefix_budget_bytes"),
}


def busy_response(waiting: int):
    """Refusal of a request the engine has no room to queue: UNAVAILABLE (HTTP 503), retry later."""
    message = f"server busy: {waiting} requests are already waiting for the LLM; retry later"
    code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        check_config(
            config,
            decoupled=True,
            inputs={
                "input_ids": "TYPE_INT32",
                "request_output_len": "TYPE_INT32",
                "end_id": "TYPE_INT32",
                "stop_words_list": "TYPE_INT32",
                "streaming": "TYPE_BOOL",
            },
            outputs={"output_ids": "TYPE_INT32", "sequence_length": "TYPE_INT32"},
        )
        params = params_of(config)
        torch.set_num_threads(int(params.get("threads") or 1))
        llm, _, _ = load_llm(params["model_dir"], dtype=torch.float32)
        attention.use_native_gqa(llm, "cpu")  # same results as "sdpa", without copying K/V per step
        prefix_cache = self.prefix_cache_from(params)
        self.engine = LLMEngine(llm, max_batch_size=int(params["max_active_requests"]), prefix_cache=prefix_cache)
        self.kv_metrics = None
        if prefix_cache is not None:
            self.kv_metrics = StatsMetrics(
                KV_CACHE_METRICS, {"model": args["model_name"], "version": str(args.get("model_version", "1"))}
            )
            self.kv_metrics.update(self.engine.snapshot())
        self.max_queue_size = int(params.get("max_queue_size") or 0)  # 0: unbounded
        self.metrics = RequestMetrics(args["model_name"])  # Triton does not count a decoupled model's errors
        self.running = {}  # request id -> handle, for `stop` requests (touched on the event loop only)

    @staticmethod
    def prefix_cache_from(params: dict[str, str]) -> PrefixCache | None:
        """The prefix KV cache the parameters ask for (None: reuse off or a zero budget)."""
        flag = params.get("enable_kv_cache_reuse", "false").lower()
        if flag not in TRUE + FALSE:
            raise ModelConfigError(f"enable_kv_cache_reuse must be true or false, got {flag!r}")
        try:
            mb, block = float(params.get("kv_cache_mb", "0")), int(params.get("kv_block_tokens", "16"))
        except ValueError:
            raise ModelConfigError("kv_cache_mb must be a number and kv_block_tokens an integer") from None
        if mb < 0 or block < 1:
            raise ModelConfigError(f"kv_cache_mb must be >= 0 and kv_block_tokens >= 1, got {mb}, {block}")
        if flag in FALSE or mb == 0:
            return None
        return PrefixCache(block_tokens=block, budget_bytes=int(mb * (1 << 20)))

    async def execute(self, requests):
        await asyncio.gather(*(self.serve(r) for r in requests))
        return None

    async def serve(self, request):
        sender = request.get_response_sender()
        if scalar_input(request, "stop", False):
            self.stop(request.request_id())
            sender.send(None, flags=FINAL)
            return
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        if self.max_queue_size and self.engine.num_pending >= self.max_queue_size:
            sender.send(busy_response(self.engine.num_pending), flags=FINAL)
            return
        try:
            gen, streaming = self.parse(request)
            # runs in the engine thread: only wake this coroutine, never call the python backend there
            handle = self.engine.submit(gen, callback=lambda *_: loop.call_soon_threadsafe(woken.set))
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            self.metrics.failed(e)
            sender.send(error_response(e), flags=FINAL)
            return
        key = request.request_id()
        if key:
            self.running[key] = handle
        try:
            await self.stream(request, sender, handle, streaming, woken)
        finally:
            if self.running.get(key) is handle:
                del self.running[key]
            if self.kv_metrics is not None:
                self.kv_metrics.update(self.engine.snapshot())

    def stop(self, request_id: str) -> None:
        """Cancel the running request with this id (TensorRT-LLM's `stop` input); unknown ids are
        finished already."""
        handle = self.running.get(request_id) if request_id else None
        if handle is not None:
            handle.cancel()

    async def stream(self, request, sender, handle, streaming, woken):
        tokens, finished, cancelled = [], False, False
        while not finished:
            try:
                await asyncio.wait_for(woken.wait(), CANCEL_POLL_S)
            except asyncio.TimeoutError:
                pass
            woken.clear()
            if request.is_cancelled() and not cancelled:
                cancelled = True
                self.metrics.cancelled()
                handle.cancel()
            try:
                new, finished = handle.poll()
            except Exception as e:  # noqa: BLE001 - the engine failed this request
                if not cancelled:
                    self.metrics.failed(e)
                sender.send(error_response(e), flags=FINAL)
                return
            tokens.extend(new)
            if streaming:
                for token in new:
                    sender.send(self.response([token]))
        sender.send(None if streaming else self.response(tokens), flags=FINAL)

    def parse(self, request):
        ids = optional_input(request, "input_ids").reshape(-1).astype(np.int64).tolist()
        table = optional_input(request, "prompt_embedding_table")
        table = None if table is None or table.size == 0 else torch.from_numpy(table.reshape(-1, table.shape[-1]))
        end_id = scalar_input(request, "end_id")
        stops = single_token_stops(optional_input(request, "stop_words_list"))
        extra = optional_input(request, "prompt_table_extra_ids")
        gen = GenerationRequest(
            input_ids=ids,
            prompt_table=table,
            max_new_tokens=int(scalar_input(request, "request_output_len")),
            temperature=float(scalar_input(request, "temperature", 0.0)),
            top_p=float(scalar_input(request, "runtime_top_p", 1.0)),
            top_k=int(scalar_input(request, "runtime_top_k", 0)),
            seed=scalar_input(request, "seed"),
            stop_ids=([int(end_id)] if end_id is not None else []) + stops,
            request_id=request.request_id(),
            extra_ids=None if extra is None or extra.size == 0 else extra.reshape(-1),
        )
        return gen, bool(scalar_input(request, "streaming", False))

    @staticmethod
    def response(tokens):
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("output_ids", np.array([[tokens]], np.int32).reshape(1, 1, -1)),
                pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], np.int32)),
            ]
        )

    def finalize(self):
        self.engine.shutdown()
        self.metrics.close()
        if self.kv_metrics is not None:
            self.kv_metrics.close()
