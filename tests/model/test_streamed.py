"""model/streamed.py: the reference trunk a layer at a time gives the reference's own logits."""

import torch

from nextn.model.checkpoint import Checkpoint
from nextn.model.streamed import trunk_logits
from nextn.model.weights import load_model


def test_layer_at_a_time_logits_equal_the_reference(tiny_checkpoint, tmp_path):
    from nextn.testing import tiny_config, write_random_checkpoint

    fp8 = write_random_checkpoint(tmp_path / "fp8", tiny_config(), seed=5, weights="fp8")
    sequences = [[5, 6, 7], list(range(2, 41))]
    for path in (tiny_checkpoint, fp8):
        model, _ = load_model(path)
        got = list(trunk_logits(Checkpoint(path), sequences))
        for ids, logits in zip(sequences, got, strict=True):
            with torch.no_grad():
                want = model(torch.tensor([ids]), torch.arange(len(ids))[None]).logits[0]
            assert torch.equal(torch.from_numpy(logits), want)
