"""The instruct step's reply handling. The step itself runs on vLLM through ray.data.llm in
``test_synth_pipeline.py``, end to end with the describe step and the export."""

from __future__ import annotations

from megapairs_ray.config import InstructConfig
from megapairs_ray.synth.instruct import instructions_schema, make_postprocess

DESCRIPTION = ("Both images show a wooden boat on a lake. However, the Source Image is empty "
               "near the shore, whereas the Target Image has two people rowing in fog.")


def _cfg(tmp_path_factory, **kw) -> InstructConfig:
    return InstructConfig(
        model="tiny-random-llama", tiny_model_dir=str(tmp_path_factory.getbasetemp() / "llm"),
        batch_size=8, max_model_len=2048, max_tokens=400, retries=1, engine_num_gpus=0,
        engine_num_cpus=1, engine_kwargs={"enforce_eager": True, "dtype": "float32"}, **kw)


def test_postprocess_tells_truncation_from_a_missing_list(tmp_path_factory):
    cfg = _cfg(tmp_path_factory)
    post = make_postprocess(cfg, attempt=0)
    row = {"pair_id": "p", "description": "d"}
    cut = post({**row, "generated_text": '["Make it red.", "The same', "num_generated_tokens": 400})
    assert cut["reject_reason"] == "truncated"
    none = post({**row, "generated_text": "no idea", "num_generated_tokens": 12})
    assert none["reject_reason"] == "no_list"
    ok = post({**row, "generated_text": '["Make it red.", "Paint it red.", "A red one."]',
               "num_generated_tokens": 20})
    assert ok["reject_reason"] == "" and ok["instructions"][2] == "A red one."
    schema = instructions_schema(cfg)
    assert schema["minItems"] == 3 and schema["items"]["maxLength"] == 300


def test_the_engine_stage_leaves_the_jobs_own_env_vars_to_the_job():
    """``ray.data.llm`` hands the stage's runtime env to the driver's ``ray.init``, and Ray
    refuses a driver env naming a variable the job's runtime env names (found by the cluster
    soak: a job submitted with HF_HUB_OFFLINE failed at describe). Such a variable is left to
    the job when both agree, and is one line naming both when they do not."""
    import pytest

    from megapairs_ray.cli import is_internal_fault
    from megapairs_ray.synth.llm import KEEP_CHILDREN, RuntimeEnvConflict, stage_runtime_env

    cfg = InstructConfig(model="x", env_vars={"HF_HUB_OFFLINE": "1",
                                              "VLLM_CPU_KVCACHE_SPACE": "1"})
    keep = {KEEP_CHILDREN: "false"}
    assert stage_runtime_env(cfg, {}) == {"env_vars": {**cfg.env_vars, **keep}}
    assert stage_runtime_env(cfg, {"HF_HUB_OFFLINE": "1", "AWS_ENDPOINT_URL": "x"}) == {
        "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", **keep}}
    assert stage_runtime_env(cfg, dict(cfg.env_vars)) == {"env_vars": keep}
    # The job's own choice of Ray's child-killing stands.
    assert stage_runtime_env(cfg, {**cfg.env_vars, KEEP_CHILDREN: "true"}) == {"env_vars": {}}
    with pytest.raises(RuntimeEnvConflict) as e:
        stage_runtime_env(cfg, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert "instruct.env_vars.VLLM_CPU_KVCACHE_SPACE" in str(e.value)
    assert "\n" not in str(e.value) and not is_internal_fault(e.value)


def test_an_engine_on_cpus_runs_its_model_in_its_engine_process():
    """vLLM's CPU backend would start a third process for the model (``llm.py``,
    ``CPU_ENGINE_IN_ONE_PROCESS``); a GPU engine and a tensor-parallel one keep vLLM's choice,
    and so does a job that sets the variable itself."""
    from megapairs_ray.synth.llm import CPU_ENGINE_IN_ONE_PROCESS, stage_runtime_env

    def env(cfg: InstructConfig, job: dict[str, str]) -> dict[str, str]:
        return stage_runtime_env(cfg, job)["env_vars"]

    cpu = InstructConfig(model="x", engine_num_gpus=0)
    assert env(cpu, {})[CPU_ENGINE_IN_ONE_PROCESS] == "0"
    assert CPU_ENGINE_IN_ONE_PROCESS not in env(cpu, {CPU_ENGINE_IN_ONE_PROCESS: "1"})
    for other in (InstructConfig(model="x"),
                  InstructConfig(model="x", engine_num_gpus=0, tensor_parallel_size=2)):
        assert CPU_ENGINE_IN_ONE_PROCESS not in env(other, {})
    # A section's own setting stands.
    mine = InstructConfig(model="x", engine_num_gpus=0, env_vars={CPU_ENGINE_IN_ONE_PROCESS: "1"})
    assert env(mine, {})[CPU_ENGINE_IN_ONE_PROCESS] == "1"


def test_a_tiny_models_path_is_absolute_for_the_processes_that_load_it(tmp_path, monkeypatch):
    """Engine actors and preprocessing tasks have working directories of their own under
    ``ray job submit``: a relative tiny-model folder was found by none of them."""
    from pathlib import Path

    from megapairs_ray.synth.llm import model_path

    monkeypatch.chdir(tmp_path)
    path = model_path(InstructConfig(model="tiny-random-llama", tiny_model_dir="models/llm"))
    assert Path(path).is_absolute() and Path(path) == (tmp_path / "models" / "llm").resolve()
    assert (Path(path) / "config.json").is_file()
    assert model_path(InstructConfig(model="org/some-llm")) == "org/some-llm"  # hub ids as given
