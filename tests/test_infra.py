"""Cluster configs, offline: the AWS cluster-launcher config passes Ray's own validation, the
KubeRay manifests validate against the CRDs' schemas (unknown keys rejected), the image pins what
pyproject pins, and nothing at the top of the job's working dir shadows the standard library."""

import copy
import json
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # the CRDs' v1 schemas (README there)


# ------------------------------------------------------------------------------ AWS cluster launcher
def _validate_cluster(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))  # in this order: no AWS call is made


def _cluster() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_the_aws_cluster_config_passes_rays_validation():
    cfg = _cluster()
    _validate_cluster(cfg)
    types = cfg["available_node_types"]
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["gpu_ondemand"]["node_config"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 through the profile
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert not re.search(r"AWS_(SECRET_)?ACCESS_KEY|aws_secret", text)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(max_worker=4),  # a typo key
    lambda c: c["available_node_types"]["gpu_spot"].update(min_workers=16),  # the minimums pass max_workers
    lambda c: c["available_node_types"]["gpu_ondemand"].pop("node_config"),
    lambda c: c.update(head_node_type="cpu_head"),
])
def test_a_broken_cluster_config_fails_rays_validation(break_it):
    cfg = _cluster()
    break_it(cfg)
    with pytest.raises(Exception):
        _validate_cluster(cfg)


def test_clusters_get_the_platforms_node_health_settings():
    from selfsup.platform.elastic import NODE_HEALTH

    head = " ".join(_cluster()["head_start_ray_commands"])
    arg = next(a for a in shlex.split(head) if a.startswith("--system-config="))
    assert json.loads(arg.split("=", 1)[1]) == NODE_HEALTH
    rc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert json.loads(rc["spec"]["headGroupSpec"]["rayStartParams"]["system-config"]) == NODE_HEALTH


# ------------------------------------------------------------------------------ KubeRay
def _strict(schema):
    """The CRD's openAPIV3Schema as a JSON schema that rejects unknown keys (as `kubectl apply
    --validate=strict` does), keeping Kubernetes' escape hatches."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def _schema(kind: str) -> dict:
    schema = _strict(json.loads((CRDS / f"{kind.lower()}s.v1.json").read_text()))
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _errors(manifest: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft7Validator(_schema(manifest["kind"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(manifest)]


MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kuberay_manifests_validate_against_the_crds(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert _errors(manifest) == []
    text = path.read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY:\s*\S", text)  # credentials only from the Secret


def test_a_broken_kuberay_manifest_fails():
    rc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    typo = copy.deepcopy(rc)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    wrong_type = copy.deepcopy(rc)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    no_template = copy.deepcopy(rc)
    del no_template["spec"]["headGroupSpec"]["template"]
    for broken, where in ((typo, "maxReplica"), (wrong_type, "replicas"), (no_template, "template")):
        errors = _errors(broken)
        assert errors and any(where in e for e in errors), errors
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob-train.yaml").read_text())
    job["spec"]["entrypoints"] = job["spec"].pop("entrypoint")
    assert _errors(job)


def test_the_gpu_workers_autoscale_tolerate_gpu_taints_and_take_credentials_from_a_secret():
    rc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["envFrom"] == [{"secretRef": {"name": "selfsup-s3"}}]
    for job in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        spec = yaml.safe_load((INFRA / "kuberay" / job).read_text())["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": "selfsup"}
        assert spec["entrypoint"].split()[:4] in (["python", "-m", "selfsup", "train"], ["python", "-m", "selfsup", "tune"])


def test_the_job_entrypoints_parse_and_their_configs_load():
    from selfsup.platform.cli import build_parser
    from selfsup.platform.config import load_config

    for job in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        argv = shlex.split(yaml.safe_load((INFRA / "kuberay" / job).read_text())["spec"]["entrypoint"])[3:]
        args, extra = build_parser().parse_known_args(argv)
        load_config(args.config, args.overrides + extra)


# ------------------------------------------------------------------------------ image, working dir
def test_the_image_pins_what_pyproject_pins_runs_as_a_user_and_holds_no_credentials():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d and d.split("==")[0] in ("torch", "torchvision"))
    docker = (INFRA / "docker" / "Dockerfile").read_text()
    found = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', docker))
    assert found == pins
    assert "13.0" in docker and pins["torch"].startswith("2.14")  # the cu130 build of torch 2.14.1
    assert re.search(r"^USER selfsup$", docker, re.M) and "useradd" in docker
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)|SECRET|PASSWORD|TOKEN", docker)
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", docker, re.M)
    assert {name for _, name in stages if name} == {"base-cuda", "base-cpu"} and stages[-1][0] == "base-${VARIANT}"
    assert (REPO / ".dockerignore").read_text().split().count(".venv") == 1


def test_nothing_at_the_top_of_the_working_dir_shadows_the_standard_library():
    """`ray job submit --working-dir .` puts the repository first on every worker's path: a
    top-level `platform/` (or any stdlib name) there breaks torch and Ray on every worker."""
    shadows = [p.name for p in REPO.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists() or p.suffix == ".py")
               and p.stem in sys.stdlib_module_names]
    assert shadows == []
