"""Runtime layer: runners for ONNX Runtime and TensorRT, artifact loading, numerics, prompt-table lookup, the build->serve contract."""
