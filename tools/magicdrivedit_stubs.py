"""Stub modules for running the authors' MagicDriveDiT model code on a CPU in a scratch venv (what only their
checkpoint I/O, ColossalAI, the mmengine registry, the NPU and torchvision need; see docs/model.md,
"Rebuilding the parity fixtures"). Used by tools/make_magicdrivedit_fixture.py only; nothing of theirs is here."""
from __future__ import annotations

import ast
import importlib.machinery
import os
import sys
import types
from pathlib import Path


def _module(name: str, package_path: Path | None = None, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package_path is not None)
    if package_path is not None:  # a package shell: submodules load from their files, its __init__ never runs
        mod.__path__ = [str(package_path)]
        mod.__spec__.submodule_search_locations = [str(package_path)]
    sys.modules[name] = mod
    return mod


class _Unavailable:
    """Stands for a class of a stubbed package: importing it works, using it is a bug of this script."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} comes from a stub module; the fixture must not need it")


class _Registry:  # mmengine.registry.Registry, as far as their registry.py and decorators use it
    def __init__(self, *args, **kwargs):
        self.modules = {}

    def register_module(self, name=None, force=False, module=None):
        def add(obj):
            self.modules[name or obj.__name__] = obj
            return obj
        return add if module is None else add(module)


def _ast_constant(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{name} not found in {path}")


def install_stubs(mdd: Path) -> None:
    os.environ.update(USE_XFORMERS="False", DEVICE_TYPE="gpu", USE_WRONG="False")  # read at import time
    import transformers  # noqa: F401  (before the torchvision stub: it probes for torchvision itself)
    from transformers import PreTrainedModel  # noqa: F401

    # blocks.py imports torch_npu when CUDA is absent (flash_attn otherwise); only their fused kernels use them
    _module("torch_npu")
    _module("flash_attn", flash_attn_func=_Unavailable)
    # timm imports torchvision (transforms, datasets, FrozenBatchNorm2d) for parts their model never touches;
    # the PyPI torchvision wheel does not load beside this torch. No InterpolationMode: timm falls back to PIL.
    _module("torchvision", package_path=Path("/nonexistent/torchvision"))
    for sub in ("ops", "ops.misc", "transforms", "transforms.functional", "datasets", "models",
                "models.feature_extraction", "utils", "io"):
        _module(f"torchvision.{sub}")
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Unavailable,), {})
    for name in ("CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder", "Places365",
                 "INaturalist", "QMNIST", "ImageNet"):
        setattr(sys.modules["torchvision.datasets"], name, type(name, (_Unavailable,), {}))
    sys.modules["torchvision.transforms.functional"].__getattr__ = _no_attr
    sys.modules["torchvision.transforms"].__getattr__ = _placeholder
    sys.modules["torchvision.models.feature_extraction"].create_feature_extractor = _Unavailable
    # ColossalAI (their utils/misc.py logger helpers), the mmengine registry, their checkpoint I/O
    _module("colossalai", package_path=Path("/nonexistent/colossalai"))
    _module("colossalai.cluster", package_path=Path("/nonexistent/colossalai/cluster"))
    _module("colossalai.cluster.dist_coordinator", DistCoordinator=type("DistCoordinator", (_Unavailable,), {}))
    _module("mmengine", package_path=Path("/nonexistent/mmengine"))
    _module("mmengine.registry", Registry=_Registry)
    sys.path.insert(0, str(mdd))
    _module("magicdrivedit.utils.ckpt_utils", load_checkpoint=_Unavailable)
    # package shells: their __init__ files import the T5 encoder, diffusers' VAE and the mmcv datasets
    src = mdd / "magicdrivedit"
    _module("magicdrivedit.models", package_path=src / "models")
    _module("magicdrivedit.models.vae", package_path=src / "models" / "vae")
    _module("magicdrivedit.datasets", IMG_FPS=_ast_constant(src / "datasets" / "utils.py", "IMG_FPS"))


def _no_attr(name):
    raise AttributeError(name)


def _placeholder(name):  # any class name of a stub module; never dunders (inspect walks sys.modules)
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Unavailable,), {})
