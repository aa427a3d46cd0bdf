"""Calibration and quantization of exported graphs: `nextn calibrate` (calibrate.py is the entry)."""
