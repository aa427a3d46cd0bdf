"""Calibration and quantization of exported graphs (not built yet, issue 7)."""
