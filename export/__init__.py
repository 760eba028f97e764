"""export: turns a model into deployable artifacts (ONNX, fp16/int8, TensorRT) and runs them.

Imports reid/ for the model definition only. Filled by the export and edge-inference work.
"""
