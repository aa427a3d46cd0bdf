"""How many distinct routed experts a verify pass reads: S consecutive tokens of real text, per MoE layer.

    python benchmarks/verify_experts.py [CHECKPOINT] [--files 8] [--tokens 256]
    (no checkpoint: the embedded model)

Runs the PyTorch reference over held-out stdlib files, records each MoE layer's routed experts per token,
and for S = 1..5 averages the size of the union of the experts picked by S consecutive tokens (what one
verify pass of K = S - 1 drafts must read), next to what independent uniform routing would give,
E * (1 - (1 - k/E)^S). A verify pass reads the routed bytes of that many experts against k for one token.
"""

import argparse

import numpy as np
import torch

from nextn.embedded import embedded_checkpoint
from nextn.model.reference import MoE, route
from nextn.model.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from nextn.prompts import stdlib_sequences

    ckpt = args.checkpoint or embedded_checkpoint()
    model, cfg = load_model(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json")) if (ckpt / "tokenizer.json").is_file() else None
    seqs = stdlib_sequences(tok, "heldout", args.files, args.tokens)
    picked: dict[int, list[np.ndarray]] = {}  # layer -> [T, k] expert ids per sequence

    def hook(layer: int):
        def record(module: MoE, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            g = module.gate
            ids, _ = route(x, g.weight, g.e_score_correction_bias, cfg.num_experts_per_tok, cfg.n_group,
                           cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)  # fmt: skip
            picked.setdefault(layer, []).append(ids.numpy())

        return record

    moes = [(i, m) for i, m in enumerate(model.modules()) if isinstance(m, MoE)]
    for n, (_, m) in enumerate(moes):
        m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            model(ids, torch.arange(len(s))[None])
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    print(f"{len(seqs)} sequences, {len(picked)} MoE layers, {e} routed experts, top {k}")
    for width in range(1, 6):
        sizes = [len(set(ids[t : t + width].ravel())) for layer in picked.values() for ids in layer
                 for t in range(len(ids) - width + 1)]  # fmt: skip
        uniform = e * (1 - (1 - k / e) ** width)
        print(f"S={width}: {np.mean(sizes):.2f} distinct experts per layer ({np.mean(sizes) / k:.2f}x one token's; "
              f"independent uniform routing {uniform:.2f})")


if __name__ == "__main__":
    main()
