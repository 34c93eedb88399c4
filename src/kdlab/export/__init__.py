"""Export: ONNX export and onnxruntime parity."""
