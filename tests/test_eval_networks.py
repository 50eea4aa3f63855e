"""The feature networks: the published key layouts, tiny networks with the same keys, and the weights loader's
checks (a wrong file is one error line naming the file and what is wrong).

The layouts were checked once, outside this repository, against the reference code itself: VideoGPT's
videogpt/fvd/pytorch_i3d.py ``InceptionI3d(400)`` and pytorch-fid's FID InceptionV3 (torchvision 0.29
Inception3, 1008 classes, no aux head, with pytorch-fid's FIDInception blocks): identical key sets and
shapes, and bit-identical outputs on the same random weights (I3D on (2, 3, 16, 224, 224), InceptionV3's
2048-d pool features on (2, 3, 224, 400)). The tests pin the facts of that layout that any change would move.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from factories_eval import eval_set, tiny_weights  # noqa: F401  (fixture)
from pipeline.contract import cli
from train.eval import weights
from train.eval.cli import main as eval_main
from train.eval.i3d import I3D
from train.eval.inception import FIDInceptionV3


def _params(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_i3d_has_the_videogpt_layout():
    p = _params(I3D(1).state_dict())
    assert len(p) == 287 and sum(torch.Size(s).numel() for s in p.values()) == 12_711_824   # 50.8 MB of float32
    assert p["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert p["Conv3d_2c_3x3.conv3d.weight"] == (192, 64, 3, 3, 3)
    assert p["Mixed_4b.b1b.conv3d.weight"] == (208, 96, 3, 3, 3)
    assert p["Mixed_5c.b3b.bn.running_var"] == (128,)
    assert p["logits.conv3d.weight"] == (400, 1024, 1, 1, 1) and p["logits.conv3d.bias"] == (400,)
    assert not any("b3a" in k for k in p)                                 # the pool branch has no parameters


def test_inception_has_the_pytorch_fid_layout():
    p = _params(FIDInceptionV3(1).state_dict())
    assert len(p) == 472 and sum(torch.Size(s).numel() for s in p.values()) == 23_885_392   # 95.5 MB
    assert p["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert p["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert p["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert p["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert p["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in p)


@pytest.mark.parametrize("cls,divisor", [(I3D, 8), (FIDInceptionV3, 16)])
def test_tiny_networks_have_exactly_the_published_key_set(cls, divisor):
    """Reduced channel widths, identical key names (what the tests' weights files contain)."""
    full, tiny = cls(1).state_dict(), cls(divisor).state_dict()
    assert list(full) == list(tiny)
    assert tiny[next(iter(tiny))].shape[0] * divisor == full[next(iter(full))].shape[0]


def test_output_shapes():
    with torch.no_grad():
        assert I3D(8).eval()(torch.zeros(2, 3, 16, 224, 224)).shape == (2, 400)
        assert FIDInceptionV3(16).eval()(torch.zeros(3, 3, 64, 128)).shape == (3, 2048 // 16)


@pytest.mark.parametrize("metric,divisor", [("fvd", 8), ("fid", 16)])
def test_a_tiny_file_loads_from_disk_and_gives_the_saved_networks_features(tmp_path, metric, divisor):
    path = tiny_weights(tmp_path / "w.pt", metric, divisor)
    net = weights.load(str(path), weights.SPECS[metric])
    assert net.divisor == divisor and len(net.sha256) == 64
    ref = (I3D(divisor) if metric == "fvd" else FIDInceptionV3(divisor)).eval()
    ref.load_state_dict(torch.load(path, weights_only=True), strict=False)
    x = torch.rand(1, 3, 16, 224, 224) * 2 - 1 if metric == "fvd" else torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(net.model(x), ref(x))
        default = (I3D(divisor) if metric == "fvd" else FIDInceptionV3(divisor)).eval()
        assert not torch.allclose(net.model(x), default(x))                  # the file's weights, not an init


def test_a_file_with_the_batchnorm_counters_loads_too(tmp_path):
    path = tiny_weights(tmp_path / "w.pt", "fid", 16, drop_counters=False)
    assert weights.load(str(path), weights.SPECS["fid"]).divisor == 16


class NotWeights:
    pass


def _bad_files(tmp_path):
    good = torch.load(tiny_weights(tmp_path / "good.pt", "fvd", 8), weights_only=True)
    cases = {}

    def save(name, obj):
        torch.save(obj, tmp_path / name)
        cases[name] = tmp_path / name

    missing = dict(good)
    del missing["Mixed_4c.b2b.conv3d.weight"]
    save("missing.pt", missing)
    save("unexpected.pt", {**good, "fc.weight": torch.zeros(3)})
    shape = dict(good)
    shape["logits.conv3d.weight"] = torch.zeros(600, *good["logits.conv3d.weight"].shape[1:])
    shape["logits.conv3d.bias"] = torch.zeros(600)
    save("600classes.pt", shape)
    save("list.pt", list(good.values()))
    save("inception.pt", torch.load(tiny_weights(tmp_path / "inc.pt", "fid", 16), weights_only=True))
    with open(tmp_path / "object.pt", "wb") as f:
        pickle.dump({"net": NotWeights()}, f)
    cases["object.pt"] = tmp_path / "object.pt"
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases["text.pt"] = tmp_path / "text.pt"
    return cases


EXPECT = {
    "missing.pt": "1 missing keys (Mixed_4c.b2b.conv3d.weight)",
    "unexpected.pt": "1 unexpected keys (fc.weight)",
    "600classes.pt": "2 tensors of the wrong shape: logits.conv3d.bias (600,) (expected (400,))",
    "list.pt": "not a state dict",
    "inception.pt": "no Conv3d_1a_7x7.conv3d.weight",
    "object.pt": "weights_only=True",
    "text.pt": "weights_only=True",
}


def test_wrong_weights_files_are_named_with_what_is_wrong(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(cli.BadInput) as e:
            weights.load(str(path), weights.SPECS["fvd"])
        msg = str(e.value)
        assert str(path) in msg and EXPECT[name] in msg and "i3d_pretrained_400.pt" in msg, (name, msg)
    with pytest.raises(cli.InputNotFound, match="i3d_pretrained_400.pt"):
        weights.load(str(tmp_path / "absent.pt"), weights.SPECS["fvd"])


def test_the_command_prints_one_error_line_for_a_wrong_weights_file(tmp_path, capsys, eval_set):
    bad = _bad_files(tmp_path)["missing.pt"]
    rc = eval_main(["fvd", "--generated", str(eval_set.gen), "--dataroot", eval_set.dataroot, "--weights",
                    str(bad), "--cache-dir", "none", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
    assert os.path.basename(str(bad)) in err[0] and "missing keys" in err[0]
