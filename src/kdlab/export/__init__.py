"""Export: a run's student as an ONNX file, checked against PyTorch, optionally quantized to INT8.

Layers, top to bottom (the import-linter contract "export" in pyproject.toml; docs/architecture.md):
`segmentation` | `classification` (one exporter per task; a task names its own, `kdlab.tasks.<task>.exporter()`)
-> `pipeline` (one run's export) -> `int8` (ship-or-keep-aside policy) -> `quantize` (onnxruntime static INT8)
-> `measure` (parity, latency, accuracy) -> `runtime` (onnxruntime) | `graph` (torch.onnx export)
-> `interface` (`OnnxExporter`)."""
