"""Exporters and engine builders for MGM (ONNX, TensorRT, TensorRT-LLM) and config templating."""
