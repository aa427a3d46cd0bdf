"""Train the embedded model: a small DeepSeek-V3-style trunk with MTP modules, on Python's own source.

    python -m nextn.train OUT [--preset embedded|tiny] [--steps N]

`corpus.py` builds the text and the BPE tokenizer; `trainer.py` trains trunk and MTP modules jointly
(DeepSeek-V3's objective) and writes a Hugging Face-format checkpoint.
"""
