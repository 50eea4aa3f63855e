"""ray_cluster.yaml: valid for Ray's own cluster-launcher schema, and big enough for what the build asks.

Validation runs Ray's code offline: prepare_config() merges the provider defaults exactly as
`ray up` does, validate_config() checks the result against ray/autoscaler/ray-schema.json."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_cluster.yaml"

# What pipeline/build.py asks Ray for, per stage, as ray .options() kwargs. The build exposes it as
# pipeline.build.RESOURCES; until that constant exists these values (DESIGN.md §5: the VAE actor
# requests num_gpus=1, CPU stages one core per task) stand in for it, in this one place.
FALLBACK_RESOURCES = {
    "vae_actor": {"num_cpus": 1, "num_gpus": 1},
    "scene_task": {"num_cpus": 1},
    "caption_task": {"num_cpus": 1},
    "write_task": {"num_cpus": 1},
}


def requested_resources() -> dict[str, dict]:
    try:
        from pipeline.build import RESOURCES  # type: ignore[attr-defined]
    except ImportError:
        return FALLBACK_RESOURCES
    return {k: dict(v) for k, v in RESOURCES.items()}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_validates_with_rays_schema(raw):
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"], name  # autoscaling range
        assert types[name]["max_workers"] >= 1, name


def test_validation_is_strict(raw):
    """The check above can fail: Ray's schema rejects a misspelt field and a fractional GPU count."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = bad["available_node_types"]["gpu_worker"].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_setup_installs_the_project(raw):
    mounts = raw["file_mounts"]
    assert "." in mounts.values(), "the project folder must be mounted so setup can pip install it"
    project_dir = next(k for k, v in mounts.items() if v == ".")
    gpu_setup = raw["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    for commands, torch_index in ((raw["setup_commands"], "whl/cpu"), (gpu_setup, "whl/cu")):
        text = "\n".join(commands)
        assert f"pip install --quiet -e {project_dir}" in text
        torch_line = next(c for c in commands if "torch" in c)
        assert torch_index in torch_line, torch_line
        assert commands.index(torch_line) < next(i for i, c in enumerate(commands) if "-e " in c), \
            "torch must be installed before the project, or pip pulls the default build"


def _fits(request: dict, node: dict) -> bool:
    need = {"CPU": request.get("num_cpus", 1), "GPU": request.get("num_gpus", 0), **request.get("resources", {})}
    return all(node.get(k, 0) >= v for k, v in need.items() if v)


def test_node_resources_fit_build_requests(raw):
    types = raw["available_node_types"]
    head, cpu, gpu = (types[n]["resources"] for n in ("head", "cpu_worker", "gpu_worker"))
    assert head.get("CPU") == 0 and not head.get("GPU"), "pipeline work must not land on the head"
    assert gpu["GPU"] == 1 and not cpu.get("GPU"), "one VAE actor per GPU node; CPU nodes have no GPU"
    requests = requested_resources()
    gpu_stages = [k for k, r in requests.items() if r.get("num_gpus", 0) > 0]
    assert gpu_stages, f"the build requests no GPU at all: {requests}"
    for stage, request in requests.items():
        if request.get("num_gpus", 0) > 0:
            assert request["num_gpus"] == 1, f"{stage}: the GPU type has exactly one GPU per node"
            assert _fits(request, gpu), f"{stage} {request} does not fit gpu_worker {gpu}"
        else:
            assert _fits(request, cpu), f"{stage} {request} does not fit cpu_worker {cpu}"
        assert not _fits(request, head), f"{stage} would be scheduled on the head"


def test_fit_check_catches_oversized_requests(raw):
    gpu = raw["available_node_types"]["gpu_worker"]["resources"]
    assert not _fits({"num_cpus": 1, "num_gpus": 2}, gpu)
    assert not _fits({"num_cpus": gpu["CPU"] + 1, "num_gpus": 1}, gpu)
    assert _fits({"num_cpus": 1, "num_gpus": 1}, gpu)
