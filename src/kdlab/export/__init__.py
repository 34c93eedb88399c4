"""Export: ONNX export and onnxruntime parity (`pipeline`), with one small exporter per task
(`segmentation`, `classification`); a task names its own (`kdlab.tasks.<task>.exporter()`)."""
