"""The graph writer: named dimensions, no weights pinned after export, shared weights packed once."""

import gc
import weakref

import onnx
import pytest
import torch

from nextn.export.graphs import MtpGraph, TrunkGraph, dynamic_shapes, example_inputs, mtp_io, trunk_io
from nextn.export.writer import PAGE, SMALL, export_graph, pack_weights
from nextn.model.weights import load_model
from nextn.testing import tiny_config, write_random_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    cfg = tiny_config(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=1)
    return write_random_checkpoint(tmp_path_factory.mktemp("one"), cfg)


def test_export_releases_the_weights_and_packs_shared_tensors_once(one_layer, tmp_path):
    model, cfg = load_model(one_layer, absorbed=True)
    probe = weakref.ref(model.model.layers[0].mlp.experts[3].up_proj.weight)
    unique = sum(p.numel() * 4 for p in {p.data_ptr(): p for p in model.parameters()}.values())
    paths = []
    for name, module, which, (inputs, outputs) in [
        ("trunk", TrunkGraph(model), "trunk", trunk_io(cfg, "float32")),
        ("mtp_0", MtpGraph(model, 0), "mtp", mtp_io(cfg, "float32")),
    ]:
        path = tmp_path / f"{name}.onnx"
        export_graph(module, example_inputs(cfg, torch.float32, which, 2, 3, 4), dynamic_shapes(which, 1),
                     inputs, outputs, path, 23)  # fmt: skip
        paths.append(path)
        graph = onnx.load(str(path), load_external_data=False)
        assert not any(n.metadata_props for n in graph.graph.node)  # exporter debug info stripped
    del model, module
    gc.collect()
    assert probe() is None  # the exporter's IR no longer pins the parameters

    info = pack_weights(paths, tmp_path / "weights.bin")
    assert not list(tmp_path.glob("*.data"))
    # The embedding and head live in both graphs and are stored once.
    assert info["references"] > info["tensors"] and len(info["shared"]) >= 2
    for path in paths:
        for t in onnx.load(str(path), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                meta = {e.key: e.value for e in t.external_data}
                assert meta["location"] == "weights.bin"
                align = PAGE if int(meta["length"]) >= SMALL else 64
                assert int(meta["offset"]) % align == 0  # big tensors page-aligned: mmap-able
    assert info["bytes"] <= 1.05 * unique  # every weight once, whatever graph uses it
