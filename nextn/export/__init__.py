"""Export: trunk and MTP modules as separate ONNX graphs with KV-cache inputs/outputs (not built yet, issue 3)."""
