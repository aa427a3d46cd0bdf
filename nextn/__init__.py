"""nextn: deploy DeepSeek-V3-style models with their MTP modules as draft models."""
__version__ = "0.1.0"
