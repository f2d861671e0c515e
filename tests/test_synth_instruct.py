"""The instruct step end to end: ray.data.llm + vLLM (CPU) + a tiny random Llama built offline.

The model's words are noise, so which rows succeed is chance; what must hold is the contract:
every row comes out once, either with at least 3 clean instructions or with a reason, and rows
that failed their first try were tried again.
"""

from __future__ import annotations

import json

import pytest

from megapairs_ray.config import InstructConfig
from megapairs_ray.synth.instruct import instructions_schema, make_postprocess, run_instruct

DESCRIPTION = ("Both images show a wooden boat on a lake. However, the Source Image is empty "
               "near the shore, whereas the Target Image has two people rowing in fog.")


def _cfg(tmp_path_factory, **kw) -> InstructConfig:
    return InstructConfig(
        model="tiny-random-llama", tiny_model_dir=str(tmp_path_factory.getbasetemp() / "llm"),
        batch_size=8, max_model_len=2048, max_tokens=400, retries=1, engine_num_gpus=0,
        engine_num_cpus=1, engine_kwargs={"enforce_eager": True, "dtype": "float32"}, **kw)


@pytest.mark.usefixtures("ray_cluster")
def test_every_row_gets_instructions_or_a_reason(tmp_path_factory):
    import ray
    import vllm  # noqa: F401  (installed by scripts/setup.sh; a missing vLLM must fail, not skip)

    cfg = _cfg(tmp_path_factory)
    rows = [{"pair_id": f"pair-{i}", "description": DESCRIPTION} for i in range(12)]
    good, bad = run_instruct(ray.data.from_items(rows), cfg)
    good_rows, bad_rows = good.take_all(), bad.take_all()
    ids = [r["pair_id"] for r in good_rows + bad_rows]
    assert sorted(ids) == sorted(r["pair_id"] for r in rows)  # each exactly once
    for r in good_rows:
        assert len(r["instructions"]) >= 3 and r["reject_reason"] == ""
        assert all(s.isprintable() and 8 <= len(s) <= cfg.max_instruction_chars
                   for s in r["instructions"])
        assert r["generated_tokens"] > 0 and r["attempts"] in (1, 2)
    for r in bad_rows:
        assert r["reject_reason"] in {"no_list", "truncated", "too_few_instructions"}
        assert r["attempts"] == 2  # retried once before giving up
        json.loads(r["dropped"])


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
