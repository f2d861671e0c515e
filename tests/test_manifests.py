"""The cluster manifests under cluster/: valid against the KubeRay CRDs, pointing at real code.

No cluster is needed. Each KubeRay manifest is validated against the ``openAPIV3Schema`` of its
CRD (KubeRay v1.7, ray.io/v1) from ``shared/reference/kuberay-crds/`` beside the checkout. Like
the API server, the check rejects fields the schema does not know (CRD schemas leave
``additionalProperties`` open; Kubernetes prunes or, with strict field validation, rejects unknown
fields); the CEL rules (``x-kubernetes-validations``) are not evaluated. The entrypoints must name
a script that imports and a config that loads.
"""

from __future__ import annotations

import copy
import importlib.util
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from megapairs_ray.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kuberay-crds"
KUBERAY_DIR = REPO / "cluster" / "kuberay"
ANYSCALE_JOB = REPO / "cluster" / "anyscale" / "job.yaml"
RAYJOB = KUBERAY_DIR / "rayjob-pipeline.yaml"
RAYCLUSTER = KUBERAY_DIR / "raycluster.yaml"

KUBERAY_MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
RAY_VERSION = "2.60.0"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are megabytes of YAML


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _strict(schema: Any) -> Any:
    """A copy of ``schema`` in which objects with listed properties accept no other keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    """The strict v1 schema validator of the CRD whose ``spec.names.kind`` is ``kind``."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = _load(path)
        if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
            continue
        assert crd["spec"]["group"] == "ray.io"
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for kind {kind!r} in {CRD_DIR}")


@pytest.fixture(scope="module")
def crds() -> None:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the checkout's sibling shared/ folder)")


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = _validator(doc["kind"]).iter_errors(doc)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
        for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    ]


def _entrypoint(cmd: str) -> tuple[Path, Path]:
    """``python SCRIPT ... --config CONFIG ...`` → (script, config), both under the repo root."""
    argv = shlex.split(cmd)
    assert argv[0] == "python", cmd
    assert "--config" in argv, f"{cmd!r} names no --config"
    return REPO / argv[1], REPO / argv[argv.index("--config") + 1]


def _cluster_spec(path: Path) -> dict[str, Any]:
    doc = _load(path)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _group(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _cpus(quantity: str | int) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.fixture(scope="module")
def paper() -> RunConfig:
    _, config = _entrypoint(_load(RAYJOB)["spec"]["entrypoint"])
    return load_config(config)


# --- schema -------------------------------------------------------------------------------------


def test_every_kuberay_manifest_is_checked() -> None:
    assert {p.name for p in KUBERAY_MANIFESTS} >= {RAYJOB.name, RAYCLUSTER.name}


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(crds: None, path: Path) -> None:
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in {"RayCluster", "RayJob", "RayService"}
    errors = _schema_errors(doc)
    assert not errors, f"{path.name} does not match the {doc['kind']} CRD:\n" + "\n".join(errors)


def _no_head_template(doc: dict[str, Any]) -> None:
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]


def _wrong_type(doc: dict[str, Any]) -> None:
    _group(doc["spec"]["rayClusterSpec"], "gpu")["maxReplicas"] = "sixty-four"


def _misspelt_field(doc: dict[str, Any]) -> None:
    spec = doc["spec"]["rayClusterSpec"]
    spec["enableInTreeAutoscalling"] = spec.pop("enableInTreeAutoscaling")


def _bad_quantity(doc: dict[str, Any]) -> None:
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["memory"] = "32GB"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_no_head_template, "'template' is a required property"),
        (_wrong_type, "'sixty-four' is not of type 'integer'"),
        (_misspelt_field, "'enableInTreeAutoscalling' was unexpected"),
        (_bad_quantity, "'32GB' does not match"),
    ],
    ids=["head-without-template", "wrong-type", "misspelt-field", "bad-quantity"],
)
def test_schema_check_rejects_broken_rayjob(crds: None, breakage: Any, expected: str) -> None:
    doc = copy.deepcopy(_load(RAYJOB))
    breakage(doc)
    errors = _schema_errors(doc)
    assert any(expected in e for e in errors), errors


# --- entrypoint and config ----------------------------------------------------------------------


def test_rayjob_entrypoint_script_exists_and_imports() -> None:
    script, _ = _entrypoint(_load(RAYJOB)["spec"]["entrypoint"])
    assert script == REPO / "jobs" / "run_pipeline.py"
    assert script.is_file(), f"entrypoint script {script} is missing"
    spec = importlib.util.spec_from_file_location("megapairs_run_pipeline", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_rayjob_entrypoint_config_loads(paper: RunConfig) -> None:
    assert paper.profile == "paper"
    assert paper.embed.device == "cuda"


def test_rayjob_runtime_env_is_valid_yaml() -> None:
    env = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    pip = " ".join(env["pip"])
    for package in ("open_clip_torch", "timm", "transformers", "faiss-cpu", "s3fs", "pydantic"):
        assert package in pip


def test_rayjob_lifecycle() -> None:
    spec = _load(RAYJOB)["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] > 0


# --- cluster shape ------------------------------------------------------------------------------


def test_rayjob_and_raycluster_define_the_same_cluster() -> None:
    assert _cluster_spec(RAYJOB) == _cluster_spec(RAYCLUSTER), (
        "rayjob-pipeline.yaml's rayClusterSpec and raycluster.yaml's spec differ: edit both"
    )


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_cluster_shape(path: Path) -> None:
    spec = _cluster_spec(path)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # KubeRay rejects resources given both in rayStartParams and in the group's `resources`.
    assert "resources" not in spec["headGroupSpec"]

    # Autoscaler v2 the KubeRay >= 1.4 way; KubeRay refuses a cluster that also sets the env var.
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in head.get("env", [])}

    assert head["image"] == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    assert _group(spec, "cpu")["template"]["spec"]["containers"][0]["image"] == head["image"]
    gpu = _group(spec, "gpu")
    gpu_pod = gpu["template"]["spec"]
    assert gpu_pod["containers"][0]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod.get("tolerations", []))
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group["maxReplicas"]


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_every_container_has_requests_and_limits(path: Path) -> None:
    spec = _cluster_spec(path)
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["containers"] + pod.get("initContainers", [])]
    containers.append({"name": "autoscaler", **spec["autoscalerOptions"]})
    for c in containers:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (
                f"{path.name}: container {c['name']} has no cpu/memory {kind}"
            )


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_s3_credentials_come_from_the_secret(path: Path) -> None:
    spec = _cluster_spec(path)
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        ray_container = pod["containers"][0]
        secrets = {e["secretRef"]["name"] for e in ray_container.get("envFrom", [])}
        assert "megapairs-s3" in secrets, ray_container["name"]


def test_gpu_group_fits_the_embed_actor_pool(paper: RunConfig) -> None:
    e = paper.embed
    gpu = _group(_cluster_spec(RAYJOB), "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = limits["nvidia.com/gpu"]
    assert _cpus(limits["cpu"]) >= e.num_cpus, "an embed actor's CPUs must fit on one GPU pod"
    assert gpus_per_pod >= e.num_gpus, "an embed actor's GPUs must fit on one GPU pod"
    actors_per_pod = min(gpus_per_pod // e.num_gpus, _cpus(limits["cpu"]) // e.num_cpus)
    assert gpu["maxReplicas"] * actors_per_pod >= e.max_actors, (
        f"the GPU group holds at most {gpu['maxReplicas'] * actors_per_pod} embed actors, "
        f"but embed.max_actors is {e.max_actors}"
    )


# --- Anyscale -----------------------------------------------------------------------------------


def test_anyscale_job_matches_the_rayjob(paper: RunConfig) -> None:
    job = _load(ANYSCALE_JOB)
    assert job["entrypoint"] == _load(RAYJOB)["spec"]["entrypoint"]
    script, config = _entrypoint(job["entrypoint"])
    assert script.is_file()
    assert config.is_file()
    assert job["name"]
    assert job["working_dir"] == "."
    assert ("image_uri" in job) != ("containerfile" in job), "give one of image_uri, containerfile"
    assert job["max_retries"] > 0
    assert isinstance(job["env_vars"], dict)

    compute = job["compute_config"]
    assert compute["head_node"]["resources"]["CPU"] == 0
    groups = {g["name"]: g for g in compute["worker_nodes"]}
    assert set(groups) == {"cpu", "gpu", "llm"}
    for group in groups.values():
        assert 0 <= group["min_nodes"] <= group["max_nodes"]
    assert groups["gpu"]["required_resources"]["GPU"] >= paper.embed.num_gpus
    assert groups["gpu"]["max_nodes"] >= paper.embed.max_actors
    llm = _group(_cluster_spec(RAYJOB), "llm")
    pod = llm["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert groups["llm"]["required_resources"]["GPU"] == pod["nvidia.com/gpu"]
    assert groups["llm"]["max_nodes"] == llm["maxReplicas"]


@pytest.mark.parametrize("step", ["describe", "instruct"])
def test_llm_group_holds_every_engine(paper: RunConfig, step: str) -> None:
    """Each vLLM engine's tensor-parallel ranks fit on one node, and the group holds all of a
    step's replicas at once."""
    cfg = getattr(paper, step)
    llm = _group(_cluster_spec(RAYJOB), "llm")
    limits = llm["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = limits["nvidia.com/gpu"], _cpus(limits["cpu"])
    ranks = cfg.tensor_parallel_size
    assert ranks * cfg.engine_num_gpus <= gpus and ranks * cfg.engine_num_cpus <= cpus
    engines_per_node = min(gpus // (ranks * cfg.engine_num_gpus),
                           cpus // (ranks * cfg.engine_num_cpus))
    assert llm["maxReplicas"] * engines_per_node >= cfg.replicas
    assert llm["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray-llm:")


# --- the training RayJob ------------------------------------------------------------------------

RAYJOB_TRAIN = KUBERAY_DIR / "rayjob-train.yaml"


def test_train_rayjob_runs_the_training_config_on_its_gpus() -> None:
    from megapairs_ray.train.config import TrainConfig

    doc = _load(RAYJOB_TRAIN)
    script, config = _entrypoint(doc["spec"]["entrypoint"])
    assert script == REPO / "jobs" / "train_mmret.py" and script.is_file()
    cfg = load_config(config, schema=TrainConfig)
    assert cfg.scaling.use_gpu
    spec = doc["spec"]["rayClusterSpec"]
    gpu = _group(spec, "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_node = limits["nvidia.com/gpu"]
    # Every trainer fits: the GPU nodes hold all workers, with their CPUs.
    assert gpu["minReplicas"] * gpus_per_node >= cfg.scaling.num_workers
    workers_per_node = gpus_per_node / (cfg.scaling.gpus_per_worker or 1)
    assert float(limits["cpu"]) >= workers_per_node * cfg.scaling.cpus_per_worker
    cpu = _group(spec, "cpu")
    cpu_limit = float(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpu["maxReplicas"] * cpu_limit >= cfg.data.loader_actors * cfg.data.loader_num_cpus
