"""ray_cluster.yaml checked the way ``ray up`` checks it, and the Serve configs against it.

``ray up`` runs ``prepare_config`` (merges the provider's defaults, node type min/max
workers) and then ``validate_config`` (Ray's JSON schema ray/autoscaler/ray-schema.json plus
its own cross-field checks) before it talks to the cloud; the same two functions run here.
Then: the node types carry the resources splitserve's placement targets, the shell commands
parse, the Ray pin matches this Ray, and every deployment of
examples/cluster_serve_config.yaml (after Serve's own config validation and per-deployment
overrides) fits on exactly the node type meant for it. No Ray is started.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
CLUSTER_SERVE_CONFIG = REPO / "examples" / "cluster_serve_config.yaml"
SERVE_CONFIGS = [REPO / "examples" / "serve_config.yaml", CLUSTER_SERVE_CONFIG]

# which node type each splitserve deployment must land on
EXPECTED_NODE_TYPE = {"prefill": "prefill", "decode": "decode", "Ingress": "head"}


def _raw_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepare_and_validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _prepare_and_validate(_raw_cluster())


def test_ray_accepts_the_cluster_config(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] == "head"
    assert set(cluster["available_node_types"]) == {"head", "prefill", "decode"}


@pytest.mark.parametrize("breakage", ["fractional_gpu", "unknown_field", "min_over_max"])
def test_ray_validation_is_live(breakage):
    """The same validation refuses broken variants of this file (so the test above means something)."""
    import jsonschema

    raw = _raw_cluster()
    if breakage == "fractional_gpu":
        raw["available_node_types"]["prefill"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown_field":
        raw["available_node_types"]["decode"]["gpus"] = 8
    else:
        raw["max_workers"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _prepare_and_validate(raw)


def test_node_types_carry_the_placement_resources(cluster):
    types = cluster["available_node_types"]
    head, prefill, decode = types["head"]["resources"], types["prefill"]["resources"], types["decode"]["resources"]
    assert head.get("GPU", 0) == 0 and head["CPU"] >= 8 and head["head_node"] >= 1
    for name, res, role_res in (("prefill", prefill, "prefill_node"), ("decode", decode, "decode_node")):
        node = types[name]
        assert node["node_config"]["InstanceType"] in ("p5e.48xlarge", "p5en.48xlarge"), "8x H200 instance types"
        assert res["GPU"] == 8 and res["CPU"] >= 96
        assert res[role_res] == res["GPU"], f"{name}: one {role_res} unit per GPU"
        other = "decode_node" if role_res == "prefill_node" else "prefill_node"
        assert other not in res and "head_node" not in res
        assert 0 <= node["min_workers"] <= node["max_workers"]
    assert types["head"]["max_workers"] == 0
    assert types["prefill"]["min_workers"] + types["decode"]["min_workers"] <= cluster["max_workers"]


def test_commands_parse_and_install_splitserve(cluster):
    import ray

    commands = {k: cluster[k] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    for key, cmds in commands.items():
        for cmd in cmds:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {cmd!r} is not valid shell: {r.stderr}"
    setup = "\n".join(cluster["setup_commands"])
    pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", setup)
    assert pins == [ray.__version__], f"nodes must run this Ray ({ray.__version__}), setup pins {pins}"
    assert "download.pytorch.org/whl/cu" in setup, "torch: the CUDA build"
    (remote, local), = cluster["file_mounts"].items()
    assert (CLUSTER_YAML.parent / local / "pyproject.toml").is_file(), "file_mounts copies this checkout"
    assert f'pip install "{remote}[gpu]"' in setup, "splitserve[gpu] from the copied checkout"
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    from splitserve.serve_cli import SERVE_ENV

    prefix = " ".join(f"{key}={value}" for key, value in SERVE_ENV.items())  # Serve's processes read them at start
    assert f"{prefix} ray start --head" in head_start and f"{prefix} ray start --address" in worker_start


def _serve_config(path: Path) -> tuple[dict, object]:
    """(the file, as Ray Serve's `serve deploy` validates it)."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    return data, validate(data)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_parse(path):
    from splitserve.config import ServeConfig

    data, schema = _serve_config(path)
    (app,) = schema.applications
    assert app.import_path == "splitserve.app:app_builder"
    ServeConfig.model_validate(data["applications"][0]["args"])


def _built_deployments(app_cfg: dict) -> dict[str, dict]:
    """Deployment name -> ray_actor_options, as Serve will run them: built by the app's
    builder, then with the config's per-deployment overrides (Serve replaces
    ``ray_actor_options`` wholesale, and refuses names the app does not have)."""
    from ray.serve._private.build_app import build_app

    from splitserve.app import app_builder

    built = build_app(app_builder(app_cfg["args"]), name=app_cfg["name"])
    options = {d.name: {**dict(d.ray_actor_options or {}), "num_replicas": _max_replicas(d)} for d in built.deployments}
    for override in app_cfg.get("deployments", []):
        assert override["name"] in options, f"the config overrides {override['name']!r}, which the app does not have"
        if "ray_actor_options" in override:
            options[override["name"]] = {**dict(override["ray_actor_options"]), "num_replicas": options[override["name"]]["num_replicas"]}
    return options


def _max_replicas(deployment) -> int:
    autoscaling = deployment._deployment_config.autoscaling_config
    return autoscaling.max_replicas if autoscaling is not None else deployment.num_replicas


def _demand(opts: dict) -> dict[str, float]:
    """What one replica asks for."""
    demand = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    return {k: v for k, v in demand.items() if v}


def test_cluster_serve_config_places_each_role_on_its_node_type(cluster):
    data, _ = _serve_config(CLUSTER_SERVE_CONFIG)
    types = cluster["available_node_types"]
    deployments = _built_deployments(data["applications"][0])
    total: dict[str, dict[str, float]] = {}
    assert set(deployments) == {"Ingress", "prefill", "decode"}  # one deployment per role, N replicas each
    for name, opts in deployments.items():
        role = name.split("-")[0]
        demand = _demand(opts)
        fits = {t for t, spec in types.items() if all(spec["resources"].get(k, 0) >= v for k, v in demand.items())}
        assert fits == {EXPECTED_NODE_TYPE[role]}, f"{name} asks for {demand}: fits on {fits or 'no node type'}"
        for k, v in demand.items():
            total.setdefault(EXPECTED_NODE_TYPE[role], {}).setdefault(k, 0)
            total[EXPECTED_NODE_TYPE[role]][k] += v * opts["num_replicas"]
    assert deployments["prefill"]["num_replicas"] == data["applications"][0]["args"]["num_prefill"]
    # every worker fits on the nodes the autoscaler may launch
    for node_type, demand in total.items():
        spec = types[node_type]
        nodes = max(1, spec["max_workers"]) if node_type != "head" else 1
        for k, v in demand.items():
            assert v <= spec["resources"][k] * nodes, f"{node_type}: {v} {k} wanted, {spec['resources'][k]} x {nodes} nodes"
