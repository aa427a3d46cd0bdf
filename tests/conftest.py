import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py

from hf_reference import HFSpec, make_hf_checkpoint  # noqa: E402

# The transformers-written checkpoints every exactness test runs over.
HF_SPECS = {
    # q_lora, YaRN, dense first layer + MoE, 2 MTP modules, one file, transformers-style config
    "qlora-yarn-mtp2": HFSpec(),
    # no q_lora, plain rope, all-MoE trunk, 1 MTP module, sharded, DeepSeek's official config style
    "noqlora-rope-mtp1-sharded": HFSpec(q_lora=False, yarn=False, mtp=1, first_dense=0, sharded=True, style="official"),
    # dense trunk, YaRN with mscale != mscale_all_dim, non-interleaved rope, no groups, no top-k renorm
    "dense-yarnmscale-halfrope": HFSpec(mscale=(1.0, 0.5), interleave=False, mtp=1, first_dense=3, n_group=1,
                                        norm_topk_prob=False),
}  # fmt: skip


@pytest.fixture(scope="session", params=sorted(HF_SPECS))
def hf_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny random checkpoint written by transformers, MTP layers in DeepSeek naming."""
    path = tmp_path_factory.mktemp(request.param)
    return make_hf_checkpoint(path, HF_SPECS[request.param])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint written by nextn.testing (2 MTP modules)."""
    from nextn.testing import tiny_config, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config())


@pytest.fixture(scope="session")
def tiny_moe_forms(tiny_checkpoint, tmp_path_factory) -> dict:
    """The tiny checkpoint exported with its MoE fused and sparse (opset 23, one MTP module): form ->
    (manifest, artifact folder). Each export validates against the reference; several test modules read
    the graphs, and exporting them once saves minutes of the suite."""
    from nextn.export.exporter import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("moeforms")
    return {form: (export_checkpoint(tiny_checkpoint, root / form, ExportOptions(moe=form, mtp_layers=1)), root / form)
            for form in ("fused", "sparse")}  # fmt: skip


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """draft="auto" saves step costs under the cache folder: keep the tests' out of the user's."""
    import os

    old = os.environ.get("NEXTN_CACHE")
    os.environ["NEXTN_CACHE"] = str(tmp_path_factory.mktemp("nextn-cache"))
    yield
    if old is None:
        os.environ.pop("NEXTN_CACHE", None)
    else:
        os.environ["NEXTN_CACHE"] = old


@pytest.fixture(scope="session")
def hf_artifact(hf_checkpoint, tmp_path_factory):
    """(checkpoint, artifact): each transformers-written checkpoint exported once per session."""
    from nextn.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("art") / "a"
    export_checkpoint(hf_checkpoint, out, ExportOptions())
    return hf_checkpoint, out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A tiny checkpoint (2 MTP modules) with a word-level tokenizer ("w0" .. "w255"), exported."""
    import json

    from nextn.export.exporter import ExportOptions, export_checkpoint
    from nextn.testing import tiny_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("tok") / "c", tiny_config(), seed=11)
    vocab = {f"w{i}": i for i in range(256)}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    }  # fmt: skip
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path_factory.mktemp("tokart") / "a"
    export_checkpoint(ckpt, out, ExportOptions())
    return out


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """NEXTN_CACHE pointed at a session folder, and the embedded model exported into it once."""
    import os

    from nextn.embedded import embedded_artifact

    old = os.environ.get("NEXTN_CACHE")
    os.environ["NEXTN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield embedded_artifact()
    finally:
        if old is None:
            os.environ.pop("NEXTN_CACHE", None)
        else:
            os.environ["NEXTN_CACHE"] = old
