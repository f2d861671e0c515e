"""The cluster manifests under cluster/: valid against the KubeRay CRDs and the Anyscale CLI's own
config models, pointing at real code.

No cluster is needed. Every YAML file under cluster/ is found by looking, not listed by name, and
must be one of: a KubeRay resource (RayCluster, RayJob, RayService), an Anyscale job (it has an
``entrypoint``), an Anyscale service (it has ``applications``) or an Anyscale compute config
(``compute-<name>.yaml``, registered as ``megapairs-<name>``). Each KubeRay manifest is validated
against the ``openAPIV3Schema`` of its CRD (KubeRay v1.7, ray.io/v1) from
``shared/reference/kuberay-crds/`` beside the checkout. Like the API server, the check rejects
fields the schema does not know (CRD schemas leave ``additionalProperties`` open; Kubernetes prunes
or, with strict field validation, rejects unknown fields); the CEL rules
(``x-kubernetes-validations``) are not evaluated, and the operator's own rule on a RayJob's
cleanup (TTL or deletion rules, never both) is checked here. Each Anyscale file loads with
``anyscale``'s ``JobConfig`` / ``ServiceConfig`` / ``ComputeConfig`` (unknown keys are errors).
Every entrypoint a manifest names imports, accepts its arguments and loads its config; every
Serve ``import_path`` imports. The RayService and the Anyscale service must carry
configs/serve-paper.yaml unchanged, and their worker groups must hold its deployments.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from megapairs_ray.config import ConfigError, RunConfig, load_config
from megapairs_ray.serve.config import IMPORT_PATH, ServeAppConfig, validate_serve_doc
from megapairs_ray.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "kuberay-crds"
CLUSTER_DIR = REPO / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
ANYSCALE_DIR = CLUSTER_DIR / "anyscale"
ANYSCALE_JOB = ANYSCALE_DIR / "job-pipeline.yaml"
ANYSCALE_SERVICE = ANYSCALE_DIR / "service.yaml"
RAYJOB = KUBERAY_DIR / "rayjob-pipeline.yaml"
RAYCLUSTER = KUBERAY_DIR / "raycluster.yaml"
RAYJOB_TRAIN = KUBERAY_DIR / "rayjob-train.yaml"
RAYSERVICE = KUBERAY_DIR / "rayservice.yaml"
NETWORK_POLICY = KUBERAY_DIR / "networkpolicy.yaml"
SERVE_CONFIG = REPO / "configs" / "serve-paper.yaml"
# The config schema each entrypoint script takes (a new script needs its line here).
ENTRYPOINT_SCHEMAS: dict[str, type] = {"jobs/run_pipeline.py": RunConfig,
                                       "jobs/train_mmret.py": TrainConfig}

MANIFESTS = sorted(CLUSTER_DIR.rglob("*.yaml")) + sorted(CLUSTER_DIR.rglob("*.yml"))
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are megabytes of YAML
# The Ray every manifest pins: the project's own pin in pyproject.toml.
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"',
                        (REPO / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _kind(path: Path) -> str:
    """What a manifest is: its KubeRay kind, or anyscale-job / -service / -compute."""
    doc = _load(path)
    if doc.get("apiVersion") in ("ray.io/v1", "networking.k8s.io/v1"):
        return str(doc.get("kind"))
    if path.parent == ANYSCALE_DIR:
        if path.name.startswith("compute-"):
            return "anyscale-compute"
        if "entrypoint" in doc:
            return "anyscale-job"
        if "applications" in doc:
            return "anyscale-service"
    return "unknown"


def _of_kind(*kinds: str) -> list[Path]:
    return [p for p in MANIFESTS if _kind(p) in kinds]


KUBERAY_MANIFESTS = _of_kind("RayCluster", "RayJob", "RayService")
RAYJOBS = _of_kind("RayJob")
ANYSCALE_JOBS = _of_kind("anyscale-job")
ANYSCALE_SERVICES = _of_kind("anyscale-service")
ANYSCALE_COMPUTE = _of_kind("anyscale-compute")


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
    """The RayCluster spec of a RayCluster, RayJob (rayClusterSpec) or RayService
    (rayClusterConfig)."""
    doc = _load(path)
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    return doc["spec"] if key[doc["kind"]] is None else doc["spec"][key[doc["kind"]]]


def _ray_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of the head and of every worker group."""
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    return pods + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


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


def test_every_manifest_is_checked() -> None:
    """Every YAML under cluster/ is a kind the tests below check; none is skipped for its name."""
    unknown = [str(p.relative_to(REPO)) for p in MANIFESTS if _kind(p) == "unknown"]
    assert not unknown, f"manifests no test checks: {unknown}"
    assert {RAYJOB, RAYCLUSTER, RAYJOB_TRAIN, RAYSERVICE} <= set(KUBERAY_MANIFESTS)
    assert _of_kind("NetworkPolicy") == [NETWORK_POLICY]
    assert {ANYSCALE_JOB, ANYSCALE_DIR / "job-train.yaml"} <= set(ANYSCALE_JOBS)
    assert ANYSCALE_SERVICES == [ANYSCALE_SERVICE]
    assert len(ANYSCALE_COMPUTE) >= 3


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


def _entrypoints() -> list[tuple[str, str]]:
    """(manifest, entrypoint command) of every RayJob and every Anyscale job."""
    return ([(p.name, _load(p)["spec"]["entrypoint"]) for p in RAYJOBS]
            + [(f"anyscale/{p.name}", _load(p)["entrypoint"]) for p in ANYSCALE_JOBS])


ENTRYPOINTS = _entrypoints()


def _import_script(script: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"megapairs_entry_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _takes_arguments(module: Any, args: list[str]) -> int:
    """The exit code of the script's ``main`` given ``args`` and ``--help``: click parses every
    option first, so an unknown one fails (2) and known ones print the help (0)."""
    with pytest.raises(SystemExit) as exit_:
        module.main([*args, "--help"])
    return int(exit_.value.code or 0)


@pytest.mark.parametrize(("manifest", "cmd"), ENTRYPOINTS, ids=[m for m, _ in ENTRYPOINTS])
def test_entrypoint_imports_and_loads_its_config(manifest: str, cmd: str, capsys: Any) -> None:
    script, config = _entrypoint(cmd)
    rel = script.relative_to(REPO).as_posix()
    assert script.is_file(), f"{manifest}: entrypoint script {rel} is missing"
    module = _import_script(script)
    assert callable(getattr(module, "main", None)), f"{manifest}: {rel} has no main()"
    assert _takes_arguments(module, shlex.split(cmd)[2:]) == 0, capsys.readouterr().err
    assert rel in ENTRYPOINT_SCHEMAS, f"{rel}: add the config schema it takes to this test"
    load_config(config, schema=ENTRYPOINT_SCHEMAS[rel])


def test_entrypoint_check_rejects_an_unknown_option() -> None:
    module = _import_script(REPO / "jobs" / "run_pipeline.py")
    assert _takes_arguments(module, ["--config", "configs/paper.yaml", "--confg", "x"]) == 2


def test_rayjob_entrypoint_config_loads(paper: RunConfig) -> None:
    assert paper.profile == "paper"
    assert paper.embed.device == "cuda"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_runtime_env_is_valid_yaml(path: Path) -> None:
    env = yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    pip = " ".join(env["pip"])
    for package in ("open_clip_torch", "transformers", "s3fs", "pydantic", "typer"):
        assert package in pip


def _cleanup_problems(spec: dict[str, Any]) -> list[str]:
    """KubeRay v1.7's rules for removing a RayJob's cluster: ``shutdownAfterJobFinishes`` with
    ``ttlSecondsAfterFinished``, or ``deletionStrategy.deletionRules``, never both (the operator
    refuses the mix; the CRD's schema does not say so), and one of them, so that no finished
    job's cluster keeps its GPUs."""
    ttl_fields = sorted({"shutdownAfterJobFinishes", "ttlSecondsAfterFinished"} & set(spec))
    strategy = spec.get("deletionStrategy", {})
    rules = strategy.get("deletionRules", [])
    problems = []
    if rules and ttl_fields:
        problems.append(f"deletionStrategy.deletionRules combined with {ttl_fields}")
    if {"onSuccess", "onFailure"} & set(strategy):
        problems.append("deletionStrategy.onSuccess/onFailure: the legacy form; use deletionRules")
    if not rules:
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("no cleanup: neither shutdownAfterJobFinishes: true nor deletionRules")
        if "ttlSecondsAfterFinished" not in spec:
            problems.append("shutdownAfterJobFinishes without ttlSecondsAfterFinished")
    deleting = {r["condition"].get("jobStatus") for r in rules
                if r["policy"] in ("DeleteCluster", "DeleteSelf")}
    for status in ("SUCCEEDED", "FAILED") if rules else ():
        if status not in deleting:
            problems.append(f"deletionRules keep the cluster of a {status} job")
    return problems


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_lifecycle(path: Path) -> None:
    spec = _load(path)["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["backoffLimit"] > 0
    assert not _cleanup_problems(spec), _cleanup_problems(spec)


_RULES = [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 600}},
          {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": 600}}]


def _rules_only(spec: dict[str, Any]) -> None:
    del spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]
    spec["deletionStrategy"] = {"deletionRules": copy.deepcopy(_RULES)}


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda s: s.update(deletionStrategy={"deletionRules": copy.deepcopy(_RULES)}),
         "deletionRules combined with ['shutdownAfterJobFinishes', 'ttlSecondsAfterFinished']"),
        (lambda s: s.pop("shutdownAfterJobFinishes"), "no cleanup"),
        (lambda s: s.pop("ttlSecondsAfterFinished"), "without ttlSecondsAfterFinished"),
        (lambda s: (_rules_only(s), s["deletionStrategy"]["deletionRules"].pop()),
         "keep the cluster of a FAILED job"),
        (lambda s: (_rules_only(s), s.update(ttlSecondsAfterFinished=60)),
         "deletionRules combined with ['ttlSecondsAfterFinished']"),
        (lambda s: (_rules_only(s), s["deletionStrategy"].update(
            onSuccess={"policy": "DeleteCluster"})), "legacy form"),
    ],
    ids=["rules-and-ttl", "no-shutdown", "no-ttl", "rules-miss-failed", "rules-and-ttl-only",
         "legacy-policy"],
)
def test_cleanup_check_rejects_broken_rayjob(breakage: Any, expected: str) -> None:
    spec = copy.deepcopy(_load(RAYJOB)["spec"])
    breakage(spec)
    assert any(expected in p for p in _cleanup_problems(spec)), _cleanup_problems(spec)


def test_deletion_rules_alone_are_a_valid_cleanup(crds: None) -> None:
    doc = copy.deepcopy(_load(RAYJOB))
    _rules_only(doc["spec"])
    assert _cleanup_problems(doc["spec"]) == []
    assert _schema_errors(doc) == []


# --- cluster shape ------------------------------------------------------------------------------


def test_rayjob_and_raycluster_define_the_same_cluster() -> None:
    assert _cluster_spec(RAYJOB) == _cluster_spec(RAYCLUSTER), (
        "rayjob-pipeline.yaml's rayClusterSpec and raycluster.yaml's spec differ: edit both"
    )


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
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
    gpu = _group(spec, "gpu")["template"]["spec"]["containers"][0]
    assert gpu["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    gpu_images = (f"rayproject/ray:{RAY_VERSION}-py311-gpu",
                  f"rayproject/ray-llm:{RAY_VERSION}-py311-cu")
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        ray = pod["containers"][0]
        gpus = ray["resources"]["limits"].get("nvidia.com/gpu", 0)
        if gpus:
            # Kubernetes wants extended resources requested exactly as limited.
            assert ray["resources"]["requests"]["nvidia.com/gpu"] == gpus, group["groupName"]
            assert ray["image"].startswith(gpu_images), group["groupName"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        else:
            assert ray["image"] == head["image"], group["groupName"]
        replicas = group.get("replicas", group["minReplicas"])
        assert 0 <= group["minReplicas"] <= replicas <= group["maxReplicas"], group["groupName"]


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=lambda p: p.name)
def test_pipeline_cluster_idles_as_its_head(path: Path) -> None:
    spec = _cluster_spec(path)
    limits = _group(spec, "gpu")["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1  # one embed actor per GPU pod
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group["maxReplicas"]


@pytest.mark.parametrize("group", ["cpu", "gpu"])
def test_mining_shard_actors_have_a_disk_to_map_their_shards_from(paper: RunConfig,
                                                                  group: str) -> None:
    """The shard actors (CPU pods; GPU pods in the exact mode) copy each index shard to
    index.local_cache_dir and memory-map it there: the folder is a disk volume large enough
    for two of the paper profile's largest shards, not the container's writable layer."""
    pod = _group(_cluster_spec(RAYJOB), group)["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert paper.index.mmap and paper.index.local_cache_dir in mounts
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[paper.index.local_cache_dir]]
    assert "medium" not in volume["emptyDir"]  # disk, not memory
    assert volume["emptyDir"]["sizeLimit"] == "300Gi"  # 2 x 128 GB refine vectors (dino, 1e9)


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_every_container_has_requests_and_limits(path: Path) -> None:
    spec = _cluster_spec(path)
    pods = _ray_pods(spec)
    containers = [c for pod in pods for c in pod["containers"] + pod.get("initContainers", [])]
    containers.append({"name": "autoscaler", **spec["autoscalerOptions"]})
    for c in containers:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (
                f"{path.name}: container {c['name']} has no cpu/memory {kind}"
            )


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_s3_credentials_come_from_the_secret(path: Path) -> None:
    for pod in _ray_pods(_cluster_spec(path)):
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


def _twin(path: Path) -> Path:
    """The KubeRay manifest an Anyscale file mirrors: the RayJob with the job's entrypoint, the
    RayService with the service's applications, the manifest of the job or service naming the
    compute config."""
    doc = _load(path)
    if _kind(path) == "anyscale-compute":
        name = "megapairs-" + path.stem.removeprefix("compute-")
        (user,) = [p for p in ANYSCALE_JOBS + ANYSCALE_SERVICES
                   if _load(p).get("compute_config") == name]
        return _twin(user)
    if _kind(path) == "anyscale-job":
        found = [p for p in RAYJOBS if _load(p)["spec"]["entrypoint"] == doc["entrypoint"]]
    else:
        found = [p for p in _of_kind("RayService") if yaml.safe_load(
            _load(p)["spec"]["serveConfigV2"])["applications"] == doc["applications"]]
    assert len(found) == 1, f"{path.name}: no single KubeRay manifest with the same work"
    return found[0]


@pytest.mark.parametrize("path", ANYSCALE_JOBS + ANYSCALE_SERVICES, ids=lambda p: p.name)
def test_anyscale_file_loads_and_names_a_compute_config_file(path: Path) -> None:
    """Loads with the Anyscale CLI's own model; names a compute config registered from a file
    here (``megapairs-<name>`` from ``compute-<name>.yaml``)."""
    from anyscale.job.models import JobConfig
    from anyscale.service.models import ServiceConfig

    model = JobConfig if _kind(path) == "anyscale-job" else ServiceConfig
    config = model.from_yaml(str(path))
    assert config.name and config.working_dir == "."
    doc = _load(path)
    assert ("image_uri" in doc) != ("containerfile" in doc), "give one of image_uri, containerfile"
    assert RAY_VERSION in doc.get("image_uri", RAY_VERSION)
    name = doc["compute_config"]
    assert isinstance(name, str) and name.startswith("megapairs-"), name
    assert (ANYSCALE_DIR / f"compute-{name.removeprefix('megapairs-')}.yaml").is_file(), name
    assert isinstance(doc.get("env_vars", {}), dict)


@pytest.mark.parametrize("path", ANYSCALE_COMPUTE, ids=lambda p: p.name)
def test_anyscale_compute_config_loads(path: Path) -> None:
    from anyscale.compute_config.models import ComputeConfig

    compute = ComputeConfig.from_yaml(str(path))
    assert compute.head_node is not None and compute.worker_nodes
    assert f"anyscale compute-config create -n megapairs-{path.stem.removeprefix('compute-')} " \
        f"-f cluster/anyscale/{path.name}" in path.read_text(), "the header's command is wrong"


def test_anyscale_models_reject_what_they_do_not_know(tmp_path: Path) -> None:
    """The checks above can fail: a misspelt key or a bad quantity is refused."""
    from anyscale.compute_config.models import ComputeConfig
    from anyscale.job.models import JobConfig

    job = _load(ANYSCALE_JOB)
    job["entrypont"] = job.pop("entrypoint")
    with pytest.raises(TypeError, match="entrypont"):
        JobConfig.from_dict(job)
    compute = _load(ANYSCALE_DIR / "compute-pipeline.yaml")
    compute["worker_nodes"][1]["required_resources"]["memory"] = "64GB"
    with pytest.raises((TypeError, ValueError), match="64GB"):
        ComputeConfig.from_dict(compute)


@pytest.mark.parametrize("path", ANYSCALE_COMPUTE, ids=lambda p: p.name)
def test_anyscale_compute_config_matches_the_kuberay_pods(path: Path) -> None:
    """Every node group has the shape and bounds of the KubeRay worker group of the same name,
    and the head takes no work, as the KubeRay head's num-cpus 0."""
    compute = _load(path)
    spec = _cluster_spec(_twin(path))
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert compute["head_node"]["required_resources"] == {
        "CPU": _cpus(head_limits["limits"]["cpu"]), "memory": head_limits["limits"]["memory"]}
    assert compute["head_node"]["resources"] == {"CPU": 0}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["name"]: g for g in compute["worker_nodes"]}
    assert set(groups) == {g["groupName"] for g in spec["workerGroupSpecs"]}
    for name, node in groups.items():
        group = _group(spec, name)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus, gpus = _pod_limits(group)
        want = {"CPU": cpus, "memory": limits["memory"], **({"GPU": gpus} if gpus else {})}
        assert node["required_resources"] == want, name
        assert (node["min_nodes"], node["max_nodes"]) == (group["minReplicas"],
                                                          group["maxReplicas"]), name


@pytest.mark.parametrize("path", ANYSCALE_JOBS, ids=lambda p: p.name)
def test_anyscale_job_runs_what_its_rayjob_runs(path: Path) -> None:
    job, rayjob = _load(path), _load(_twin(path))
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert job["requirements"] == env["pip"], f"{path.name} and {_twin(path).name} install " \
        "different packages"
    assert job["max_retries"] > 0
    assert job["env_vars"] == env["env_vars"]


def test_anyscale_pipeline_nodes_hold_the_embed_pool(paper: RunConfig) -> None:
    compute = _load(ANYSCALE_DIR / "compute-pipeline.yaml")
    groups = {g["name"]: g for g in compute["worker_nodes"]}
    assert groups["gpu"]["required_resources"]["GPU"] >= paper.embed.num_gpus
    assert groups["gpu"]["max_nodes"] >= paper.embed.max_actors


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


# --- the retriever service: RayService ----------------------------------------------------------


def _serve_doc(path: Path) -> dict[str, Any]:
    """The Serve config a manifest carries: the RayService's serveConfigV2, parsed."""
    return yaml.safe_load(_load(path)["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def serve_app() -> ServeAppConfig:
    """The megapairs application's args in configs/serve-paper.yaml."""
    _, apps = validate_serve_doc(yaml.safe_load(SERVE_CONFIG.read_text()), str(SERVE_CONFIG))
    (app,) = apps.values()
    return app


def test_rayservice_carries_the_serve_config_file() -> None:
    assert _serve_doc(RAYSERVICE) == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "rayservice.yaml's serveConfigV2 and configs/serve-paper.yaml differ: edit both"
    )


def test_rayservice_serve_config_validates() -> None:
    doc = _serve_doc(RAYSERVICE)
    schema, apps = validate_serve_doc(doc, f"{RAYSERVICE.name} serveConfigV2")
    assert set(apps) == {"megapairs"}
    assert [a.import_path for a in schema.applications] == [IMPORT_PATH]
    app = apps["megapairs"]
    assert app.gallery_dir.startswith("s3://")
    assert app.query_encoder.device == "cuda" and app.query_encoder.num_gpus > 0
    assert app.auth.token_env, "the service must not serve without auth"


def _serve_apps() -> list[tuple[str, dict[str, Any]]]:
    """(manifest, application) of every Serve application a manifest names."""
    out = [(p.name, app) for p in _of_kind("RayService") for app in _serve_doc(p)["applications"]]
    return out + [(f"anyscale/{p.name}", app) for p in ANYSCALE_SERVICES
                  for app in _load(p)["applications"]]


SERVE_APPS = _serve_apps()


def _import_path_problem(import_path: str) -> str | None:
    module, _, attr = import_path.partition(":")
    try:
        builder = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        return f"{import_path}: {e}"
    return None if callable(builder) else f"{import_path} is not a callable"


@pytest.mark.parametrize(("manifest", "app"), SERVE_APPS, ids=[m for m, _ in SERVE_APPS])
def test_serve_import_path_names_the_app_builder(manifest: str, app: dict[str, Any]) -> None:
    assert _import_path_problem(app["import_path"]) is None, manifest


def test_import_path_check_rejects_what_does_not_import() -> None:
    assert "No module named" in str(_import_path_problem("megapairs_ray.serve.nope:build_app"))
    assert "is not a callable" in str(_import_path_problem("megapairs_ray.serve.app:nothing"))


def _misspelt_arg(doc: dict[str, Any]) -> None:
    encoder = doc["applications"][0]["args"]["query_encoder"]
    encoder["num_gpu"] = encoder.pop("num_gpus")


def _misspelt_serve_field(doc: dict[str, Any]) -> None:
    app = doc["applications"][0]
    app["route_prefx"] = app.pop("route_prefix")


def _inverted_bounds(doc: dict[str, Any]) -> None:
    doc["applications"][0]["args"]["search"]["autoscaling"]["min_replicas"] = 99


def _cuda_without_gpus(doc: dict[str, Any]) -> None:
    doc["applications"][0]["args"]["query_encoder"]["num_gpus"] = 0


def _bad_proxy_location(doc: dict[str, Any]) -> None:
    doc["proxy_location"] = "Everywhere"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_misspelt_arg, "query_encoder.num_gpu: Extra inputs are not permitted"),
        (_misspelt_serve_field, "unknown key(s) ['applications[0].route_prefx']"),
        (_inverted_bounds, "min_replicas (99) > max_replicas"),
        (_cuda_without_gpus, "device=cuda needs query_encoder.num_gpus > 0"),
        (_bad_proxy_location, "not a valid Ray Serve config"),
    ],
    ids=["misspelt-arg", "misspelt-serve-field", "inverted-bounds", "cuda-without-gpus",
         "bad-proxy-location"],
)
def test_serve_config_check_rejects_broken_serve_config(breakage: Any, expected: str) -> None:
    doc = _serve_doc(RAYSERVICE)
    breakage(doc)
    with pytest.raises(ConfigError) as e:
        validate_serve_doc(doc, RAYSERVICE.name)
    assert expected in str(e.value)


def _pod_limits(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) of one pod of a worker group."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return _cpus(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0))


def test_gpu_group_holds_the_query_encoders(serve_app: ServeAppConfig) -> None:
    enc = serve_app.query_encoder
    gpu = _group(_cluster_spec(RAYSERVICE), "gpu")
    cpus, gpus = _pod_limits(gpu)
    assert gpus >= enc.num_gpus and cpus >= enc.num_cpus, "a query encoder must fit one GPU pod"
    per_pod = min(gpus // enc.num_gpus, cpus // enc.num_cpus)
    assert gpu["maxReplicas"] * per_pod >= enc.autoscaling.max_replicas, (
        f"the GPU group holds at most {gpu['maxReplicas'] * per_pod} query encoders, but "
        f"query_encoder.autoscaling.max_replicas is {enc.autoscaling.max_replicas}"
    )
    # The pods the group keeps hold the encoders Serve always keeps.
    assert gpu["minReplicas"] * per_pod >= enc.autoscaling.min_replicas


def _pods_for(cpus_per_pod: float, search: tuple[int, float], ingress: tuple[int, float]) -> int:
    """CPU pods needed for (replicas, CPUs each) of search, then ingress in the space left."""
    (n_search, c_search), (n_ingress, c_ingress) = search, ingress
    per_pod = cpus_per_pod // c_search if c_search else math.inf
    pods = math.ceil(n_search / per_pod) if n_search else 0
    free = pods * cpus_per_pod - n_search * c_search
    fit_in_free = int(free // c_ingress) if c_ingress else n_ingress
    left = max(0, n_ingress - fit_in_free)
    return pods + (math.ceil(left / (cpus_per_pod // c_ingress)) if left else 0)


def test_cpu_group_holds_ingress_and_search(serve_app: ServeAppConfig) -> None:
    """Search and ingress replicas at their maxima fit the CPU group alone (the CPUs GPU pods
    leave over are a bonus), and its minimum holds their minima."""
    search, ingress = serve_app.search, serve_app.ingress
    cpu = _group(_cluster_spec(RAYSERVICE), "cpu")
    cpus, gpus = _pod_limits(cpu)
    assert gpus == 0
    assert search.num_gpus == ingress.num_gpus == 0
    assert cpus >= max(search.num_cpus, ingress.num_cpus), "a replica must fit one CPU pod"
    for bound, pods in (("max_replicas", cpu["maxReplicas"]), ("min_replicas", cpu["minReplicas"])):
        need = _pods_for(cpus, (getattr(search.autoscaling, bound), search.num_cpus),
                         (getattr(ingress.autoscaling, bound), ingress.num_cpus))
        assert pods >= need, f"{bound}: the CPU group needs {need} pods, has {pods}"


def test_serve_token_comes_from_a_secret(serve_app: ServeAppConfig) -> None:
    name = serve_app.auth.token_env
    spec = _cluster_spec(RAYSERVICE)
    refs = []
    for pod in _ray_pods(spec):
        ray = pod["containers"][0]
        (env,) = [e for e in ray.get("env", []) if e["name"] == name] or [None]
        assert env is not None, f"{ray['name']}: no {name} (the ingress refuses to start)"
        assert "value" not in env, f"{ray['name']}: {name} is written in the manifest"
        refs.append(env["valueFrom"]["secretKeyRef"])
    assert all(r == refs[0] for r in refs) and set(refs[0]) == {"name", "key"}
    assert refs[0]["name"] not in {"megapairs-s3", _load(RAYSERVICE)["metadata"]["name"]}


def test_rayservice_installs_the_project_before_ray_starts() -> None:
    """serveConfigV2 has no runtime_env, so the images must import megapairs_ray: every Ray
    container pip-installs the project, then runs KubeRay's ray start command."""
    doc = _load(RAYSERVICE)
    assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert 'name = "megapairs-ray"' in (REPO / "pyproject.toml").read_text()
    rays = [pod["containers"][0] for pod in _ray_pods(_cluster_spec(RAYSERVICE))]
    for ray in rays:
        assert ray["command"] == ["/bin/bash", "-lc", "--"], ray["name"]
        (script,) = ray["args"]
        assert script == rays[0]["args"][0], f"{ray['name']} starts differently from the head"
        assert script.startswith("ulimit -n 65536;")
        assert 'pip install --no-cache-dir "megapairs-ray @ ' in script
        assert script.endswith('&& exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"')


def test_rayservice_serving(serve_app: ServeAppConfig) -> None:
    doc = _load(RAYSERVICE)
    spec = doc["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    # In the v1 schema but unused since KubeRay 1.1 (kuberay#1685): setting them does nothing.
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(spec)
    port = _serve_doc(RAYSERVICE)["http_options"]["port"]
    for pod in _ray_pods(spec["rayClusterConfig"]):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0].get("ports", [])}
        assert ports.get("serve") == port
    # Search replicas copy the s3 index to local disk: the cache folder is a volume.
    cpu = _group(spec["rayClusterConfig"], "cpu")["template"]["spec"]
    mounts = {m["mountPath"] for m in cpu["containers"][0]["volumeMounts"]}
    assert serve_app.search.local_cache_dir in mounts


# --- the retriever service: Anyscale ------------------------------------------------------------


def test_anyscale_service_carries_the_serve_config_file(serve_app: ServeAppConfig) -> None:
    service, serve = _load(ANYSCALE_SERVICE), yaml.safe_load(SERVE_CONFIG.read_text())
    assert service["applications"] == serve["applications"], (
        "cluster/anyscale/service.yaml's applications differ from configs/serve-paper.yaml's"
    )
    assert service["applications"][0]["args"] == serve["applications"][0]["args"]
    assert service["proxy_location"] == serve["proxy_location"]
    assert service["requirements"] == _load(ANYSCALE_JOB)["requirements"]
    # One bearer token per request: the application's, or Anyscale's, never both.
    assert service["query_auth_token_enabled"] is (serve_app.auth.token_env is None)
    assert serve_app.auth.token_env not in service.get("env_vars", {}), "a secret in the file"


# --- the service's network exposure ------------------------------------------------------------


FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def _rayservice_pods() -> list[dict[str, Any]]:
    spec = _load(RAYSERVICE)["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"]["template"]] + [g["template"]
                                                  for g in spec["workerGroupSpecs"]]


def test_every_ray_container_runs_the_fast_path() -> None:
    """Serve reads the switches in every Ray process: head and workers alike."""
    for pod in _rayservice_pods():
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert {k: env.get(k) for k in FAST_PATH_ENV} == FAST_PATH_ENV, c["name"]
    assert {k: _load(ANYSCALE_SERVICE)["env_vars"].get(k) for k in FAST_PATH_ENV} == \
        FAST_PATH_ENV


def test_network_policy_admits_only_the_serve_port_from_outside_the_ray_cluster() -> None:
    policy = _load(NETWORK_POLICY)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for pod in _rayservice_pods():  # it selects every pod of the RayService
        assert selected.items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    serve_port = yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])["http_options"]["port"]
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        inside = peers and all(p.get("podSelector", {}).get("matchLabels") == selected
                               and "namespaceSelector" not in p for p in peers)
        if inside:
            assert "ports" not in rule  # Ray needs every port between its own pods
            continue
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, f"a rule open on every port to {peers or 'anyone'}"
        # the replicas' direct-ingress ports, HAProxy's stats and metrics: never from outside
        assert not ports & {8404, 9101} and not any(30000 <= p <= 31000 for p in ports)
        if not peers:
            assert ports == {serve_port}
