"""nextn: deploy DeepSeek-V3-style models with their MTP modules as draft models."""

__version__ = "0.2.0"


def load(artifact, backend: str = "ort", device: str = "cpu", threads: int = 0, prepack: bool | None = None):
    """Open an exported artifact for generation (see nextn.runtime.api.Model.generate)."""
    from nextn.runtime.api import load as _load

    return _load(artifact, backend=backend, device=device, threads=threads, prepack=prepack)
