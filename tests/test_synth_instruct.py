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
