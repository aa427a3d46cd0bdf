"""`nextn bench`: per-token latency of an artifact at each draft depth, against baselines in the same run,
and a model-size sweep that projects the speedup of drafting onto larger models.

latency.py    nextn runs (backend x batch x K): TTFT, TPOT, per-token latency percentiles, acceptance
baselines.py  transformers' eager greedy `generate`, with `use_mtp` off and on, same checkpoint and prompts
sweep.py      random checkpoints of growing size: verify cost of K+1 tokens, MTP cost, bandwidth floor
report.py     the terminal table, the JSON document and the PNG plot
machine.py    what the figures were measured on
"""
