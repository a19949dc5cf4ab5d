"""truncate: cut a model short -- drop the last blocks of a backbone stage (PyTorch) or end the graph at named tensors (ONNX)."""
