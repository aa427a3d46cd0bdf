import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py, tests/side_by_side.py

from hf_reference import HFSpec, make_hf_checkpoint  # noqa: E402
from side_by_side import Exports, export_side_by_side  # noqa: E402

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


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every HF_SPECS checkpoint, written once: hf_artifacts exports them side by side."""
    return {name: make_hf_checkpoint(tmp_path_factory.mktemp(name), spec) for name, spec in sorted(HF_SPECS.items())}


@pytest.fixture(scope="session", params=sorted(HF_SPECS))
def hf_checkpoint(request, hf_checkpoints) -> Path:
    """A tiny random checkpoint written by transformers, MTP layers in DeepSeek naming."""
    return hf_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint written by nextn.testing (2 MTP modules)."""
    from nextn.testing import tiny_config, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config())


@pytest.fixture(scope="session")
def tiny_exports(tiny_checkpoint, tmp_path_factory) -> tuple[Exports, Path]:
    """(manifests, root): the exports of tiny checkpoints that tests only read, made side by side
    (side_by_side.py), each in root / its name. Each validates against the reference."""
    from nextn.export.exporter import ExportOptions
    from nextn.testing import tiny_config, write_random_checkpoint

    root = tmp_path_factory.mktemp("tinyexports")
    # n_group 1, topk_group 2: no group limit (test_fused_moe.py)
    one_group = write_random_checkpoint(root / "one-group-checkpoint",
                                        tiny_config(n_group=1, topk_group=2, num_nextn_predict_layers=0))  # fmt: skip
    jobs = {  # in-process first, then the child's: about equal halves
        "fused": (tiny_checkpoint, ExportOptions(moe="fused", mtp_layers=1)),
        "one_group": (one_group, ExportOptions()),
        "opset18": (tiny_checkpoint, ExportOptions(opset=18, mtp_layers=0)),  # test_fused_rope.py
        "sparse": (tiny_checkpoint, ExportOptions(moe="sparse", mtp_layers=1)),
    }
    return export_side_by_side({name: (c, root / name, opts) for name, (c, opts) in jobs.items()}), root


@pytest.fixture(scope="session")
def tiny_moe_forms(tiny_exports) -> dict:
    """The tiny checkpoint exported with its MoE fused and sparse (opset 23, one MTP module): form ->
    (manifest, artifact folder). Several test modules read the graphs, and exporting them once saves minutes
    of the suite."""
    manifests, root = tiny_exports
    return {form: (manifests[form], root / form) for form in ("fused", "sparse")}


@pytest.fixture
def needs_kernel():
    """nextn's kernel library (runtime/native.py), built under the tests' private cache, so not at collection
    time; the test skips where there is no C compiler."""
    from nextn.runtime import native

    if native.kernel_library() is None:
        pytest.skip("no C compiler to build nextn's kernels")


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
def hf_artifacts(hf_checkpoints, tmp_path_factory) -> tuple[Exports, dict[str, Path]]:
    """(manifests, folders) by HF_SPECS name: the transformers-written checkpoints exported once per session,
    side by side."""
    from nextn.export.exporter import ExportOptions

    out = {name: tmp_path_factory.mktemp("art") / "a" for name in hf_checkpoints}
    return export_side_by_side({name: (c, out[name], ExportOptions()) for name, c in hf_checkpoints.items()}), out


@pytest.fixture(scope="session")
def hf_artifact(hf_checkpoint, hf_checkpoints, hf_artifacts):
    """(checkpoint, artifact): a transformers-written checkpoint and its export."""
    manifests, out = hf_artifacts
    name = next(n for n, c in hf_checkpoints.items() if c == hf_checkpoint)
    manifests[name]  # raises if this one's export failed
    return hf_checkpoint, out[name]


@pytest.fixture(scope="session")
def tiny_tokenized_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint (2 MTP modules) with a word-level tokenizer ("w0" .. "w255"): tiny_artifact's source."""
    import json

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
    return ckpt


@pytest.fixture(scope="session")
def tiny_artifact(tiny_tokenized_checkpoint, tmp_path_factory) -> Path:
    """tiny_tokenized_checkpoint exported with the default options (fp32, every MTP module, fused MoE)."""
    from nextn.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("tokart") / "a"
    export_checkpoint(tiny_tokenized_checkpoint, out, ExportOptions())
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
