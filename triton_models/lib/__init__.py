"""Triton-free building blocks used inside the Triton python models: request preprocessing, the CPU
in-flight batching LLM engine and its sampling, incremental detokenization, the vision runner.
(`triton_io` is the one module that talks to the python backend.)"""
