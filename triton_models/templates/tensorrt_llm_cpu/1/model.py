"""CPU stand-in for TensorRT-LLM's inflight batcher: Triton glue around triton_models.lib.llm_engine.

execute() only validates and submits; the engine thread steps every active request together and a
small drain thread per request forwards its tokens (streaming) or the whole answer (not streaming).
"""

import json
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mgm_ref.loader import load_llm
from triton_models.lib.llm_engine import GenerationRequest, LLMEngine
from triton_models.lib.preprocess import single_token_stops
from triton_models.lib.triton_io import error_response, optional_input, params_of, scalar_input

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = params_of(json.loads(args["model_config"]))
        torch.set_num_threads(int(params.get("threads") or 1))
        llm, _, _ = load_llm(params["model_dir"], dtype=torch.float32)
        self.engine = LLMEngine(llm, max_batch_size=int(params["max_active_requests"]))
        self.vocab_size = llm.config.vocab_size

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen, streaming = self.parse(request)
                handle = self.engine.submit(gen)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                sender.send(error_response(e), flags=FINAL)
                continue
            threading.Thread(target=self.drain, args=(request, sender, handle, streaming), daemon=True).start()
        return None

    def parse(self, request):
        ids = optional_input(request, "input_ids").reshape(-1).astype(np.int64).tolist()
        table = optional_input(request, "prompt_embedding_table")
        table = None if table is None or table.size == 0 else torch.from_numpy(table.reshape(-1, table.shape[-1]))
        end_id = scalar_input(request, "end_id")
        stops = single_token_stops(optional_input(request, "stop_words_list"))
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
        )
        return gen, bool(scalar_input(request, "streaming", False))

    @staticmethod
    def response(tokens):
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("output_ids", np.array([[tokens]], np.int32).reshape(1, 1, -1)),
            pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], np.int32)),
        ])

    def drain(self, request, sender, handle, streaming):
        tokens = []
        try:
            for token in handle:
                if request.is_cancelled():
                    handle.cancel()
                    break
                tokens.append(token)
                if streaming:
                    sender.send(self.response([token]))
            sender.send(None if streaming else self.response(tokens), flags=FINAL)
        except Exception as e:  # noqa: BLE001
            sender.send(error_response(e), flags=FINAL)

    def finalize(self):
        self.engine.shutdown()
