# GPU serving image for mgm-deploy: NGC Triton 26.07 with TensorRT-LLM 1.2.1, TensorRT 10.14.1.48,
# Python 3.12 (26.04-26.07 ship 1.2.1; 25.12-26.02 ship 1.1.0; no trtllm image exists for 26.08), the last
# release line with the TensorRT-engine + prompt-table path this stack targets. Its ModelOpt is the one
# TensorRT-LLM pins (0.37.x, dict-form quant configs); build_engines/quantize.py accepts both forms.
# Not buildable on our CPU-only machines (no Docker engine there); see README "GPU flow".
#
#   docker build -t mgm-deploy .
#   docker run --rm -it --gpus all --net host --shm-size=2g --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models mgm-deploy
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3
FROM ${TRITON_IMAGE}

WORKDIR /opt/mgm-deploy
COPY pyproject.toml README.md ./
COPY mgm_ref mgm_ref
COPY mgm_runtime mgm_runtime
COPY build_engines build_engines
COPY triton_models triton_models
COPY client client

# Keep the image's torch, TensorRT, TensorRT-LLM, ModelOpt and tritonclient: install the project
# without dependency resolution, then only what the image lacks: onnxscript for the ONNX export,
# onnxruntime for `mgm-build vision`'s parity check of the exported graph (TensorRT-LLM does not bring it).
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "onnxscript>=0.2" "onnxruntime>=1.20" "sentencepiece>=0.2"

# The GPU flow (README): build the vision engine and the LLM engine, fill the repository, serve.
#   mgm-build vision --model_dir /models/MGM-7B --output_dir /engines/mgm7b/vision --dtype float16
#   mgm-build llm    --model_dir /models/MGM-7B --output_dir /engines/mgm7b/llm --qformat fp8 --build
#   mgm-build repo   --model_dir /models/MGM-7B --engine_dir /engines/mgm7b --output_dir /repo --backend gpu
#   mgm-serve --model_repo /repo --host 0.0.0.0
EXPOSE 8000 8001 8002
CMD ["bash"]
