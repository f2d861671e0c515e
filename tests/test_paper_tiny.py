"""The paper profile's shape, end to end: ``configs/paper-tiny.yaml`` (paper.yaml with its models
swapped for tiny random twins of InternVL2 and Llama 3, built offline) through the CLI, ingest to
export, with real vLLM (CPU) behind ``ray.data.llm`` for both synthesis steps.

What the engines received is traced from the rows they hand back (``prompt``, the token ids vLLM
made of it with the images expanded, the sampling parameters) and checked against the paper's
prompts, written out here independently of the code under test: InternVL2's chat template with
both images as ``<image>`` in the text, source first; InternVL2's tiling of each image at the
profile's ``image_size`` (256 tokens a 448-px tile, up to 12 tiles plus a thumbnail); one BOS;
generation stopped at the template's turn end ``<|im_end|>``, which is not the tokenizer's EOS;
Llama 3's chat template and special tokens for instruct. Each step runs one try (the profile's
retries are the paper's; one try keeps the test to one engine start a step).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.config import InputConfig, load_config
from megapairs_ray.corpus import OPENCLIPART
from megapairs_ray.io.shards import fetch_bytes
from megapairs_ray.synth import describe, instruct, llm, tiny_models
from megapairs_ray.synth.images import shrink_jpeg
from megapairs_ray.synth.prompts import describe_text, instruct_prompt
from tests.helpers import pair_rejects

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "configs" / "paper-tiny.yaml"
runner = CliRunner()
needs_corpus = pytest.mark.skipif(not (OPENCLIPART / "png").is_dir(),
                                  reason="Debian's openclipart packages are not installed "
                                         "(scripts/setup.sh installs them)")
TRACE = ("engine_prompt", "engine_prompt_token_ids", "engine_params")


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, Path]:
    """The two twins, built fresh from the current builders (a cached folder could be stale)."""
    root = tmp_path_factory.mktemp("twins")
    return {"describe": tiny_models.build_tiny_internvl2(root / "internvl2"),
            "instruct": tiny_models.build_tiny_llama3(root / "llama3")}


def test_the_twins_chat_formats_are_the_paper_models(twins, tiny_synth_models):
    from transformers import AutoTokenizer

    vl = llm.chat_format(str(twins["describe"]), True)
    tok = AutoTokenizer.from_pretrained(twins["describe"], trust_remote_code=True)
    assert (vl.model_type, vl.takes_parts, vl.image_placeholder) == ("internvl_chat", False,
                                                                     "<image>")
    assert vl.strip_prefix == "<s>" and tok.encode("x")[0] == tok.bos_token_id
    assert vl.stop_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),) != (tok.eos_token_id,)
    parts = [{"role": "user", "content": [{"type": "text", "text": "A: "}, {"type": "image"},
                                          {"type": "text", "text": "\nB: "}, {"type": "image"}]}]
    assert vl.render(parts) == ("<|im_start|>user\nA: <image>\nB: <image><|im_end|>\n"
                                "<|im_start|>assistant\n")
    l3 = llm.chat_format(str(twins["instruct"]), False)
    assert (l3.takes_parts, l3.strip_prefix, l3.stop_token_ids) == (False, "<|begin_of_text|>",
                                                                    ())
    assert l3.render([{"role": "user", "content": " Q "}]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    gen = json.loads((twins["instruct"] / "generation_config.json").read_text())
    t3 = AutoTokenizer.from_pretrained(twins["instruct"])
    assert t3.eos_token == "<|eot_id|>" and gen["eos_token_id"] == [
        t3.convert_tokens_to_ids("<|end_of_text|>"), t3.eos_token_id]
    # The LLaVA of the tiny profile renders typed parts with its own template.
    assert llm.chat_format(str(tiny_synth_models["describe"]), False).takes_parts


def _traced(row: dict[str, Any], post: Any) -> dict[str, Any]:
    """The step's postprocess, plus what the engine received for the row."""
    out = post(row)
    out["engine_prompt"] = str(row["prompt"])
    out["engine_prompt_token_ids"] = [int(i) for i in row["prompt_token_ids"]]
    out["engine_params"] = str(row["params"])
    return out


def _tracing(real: Any) -> Any:
    def build(cfg: Any, preprocess: Any, postprocess: Any, engine_kwargs: Any = None) -> Any:
        return real(cfg, preprocess, partial(_traced, post=postprocess), engine_kwargs)
    return build


def _cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output[-3000:]


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if path.exists() else []


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, ray_cluster, twins):
    tmp = tmp_path_factory.mktemp("paper-tiny")
    corpus, run_dir = tmp / "corpus", tmp / "run"
    _cli("corpus", "build", "--out", str(corpus), "--n-images", "16", "--shard-size", "8")
    with pytest.MonkeyPatch.context() as mp:
        for module in (describe, instruct):
            mp.setattr(module, "build_llm_processor", _tracing(llm.build_llm_processor))
        _cli("run", "-c", str(PROFILE), "-s", f"run_dir={run_dir}",
             "-s", f"input.uris=[{corpus}]", "-s", "describe.retries=0",
             "-s", "instruct.retries=0",
             "-s", f"describe.tiny_model_dir={twins['describe']}",
             "-s", f"instruct.tiny_model_dir={twins['instruct']}")
    cfg = load_config(PROFILE, [f"run_dir={run_dir}"])
    return run_dir, cfg


def _internvl2_tiles(width: int, height: int, tile: int = 448, max_num: int = 12) -> int:
    """Tiles InternVL2's published preprocessing (``dynamic_preprocess``) cuts an image into:
    the grid whose aspect ratio is closest to the image's, plus a thumbnail if it has more than
    one tile."""
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), math.inf
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    n = best[0] * best[1]
    return n + 1 if n > 1 else n


def _runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the runs of ``token`` in ``ids``, in order."""
    runs, n = [], 0
    for i in [*ids, -1]:
        if i == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _tries(run_dir: Path, step: str) -> list[dict[str, Any]]:
    files = sorted((run_dir / "synth" / step / "try-0").rglob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@needs_corpus
@pytest.mark.ray
@pytest.mark.slow
def test_describe_sends_both_images_in_order_with_the_papers_prompt(paper_run, twins):
    from transformers import AutoTokenizer

    run_dir, cfg = paper_run
    pairs = pq.read_table(run_dir / "pairs").to_pylist()
    assert len(pairs) >= 3
    described = _rows(run_dir / "descriptions")
    rejects = pair_rejects(run_dir / "rejects" / "describe")
    assert sorted(r["pair_id"] for r in described + rejects) == sorted(
        p["pair_id"] for p in pairs)  # each exactly once
    assert described, "no description passed the paper's checks"
    assert all(r["description"].strip() and r["reject_reason"] == "" for r in described)
    assert {r["reject_reason"] for r in rejects} <= {"too_short", "truncated",
                                                     "empty_description"}

    tok = AutoTokenizer.from_pretrained(twins["describe"], trust_remote_code=True)
    ctx, im_end = tok.convert_tokens_to_ids(["<IMG_CONTEXT>", "<|im_end|>"])
    images = {r["image_id"]: r for r in pq.read_table(run_dir / "images").to_pylist()}
    by_pair = {p["pair_id"]: p for p in pairs}

    def tiles(image_id: int) -> int:
        data = fetch_bytes([images[image_id]], InputConfig(uris=["unused"]))[0]
        small = Image.open(io.BytesIO(shrink_jpeg(data, cfg.describe.image_size)))
        return _internvl2_tiles(*small.size)

    engine_rows = _tries(run_dir, "describe")
    assert sorted(r["pair_id"] for r in engine_rows) == sorted(by_pair)
    orders = []
    for r in engine_rows:
        pid = r["pair_id"]
        assert r["engine_prompt"] == (
            "<|im_start|>user\nSource Image: <image>\nTarget Image: <image>\n"
            f"{describe_text(str(pid), cfg.describe.seed)}<|im_end|>\n<|im_start|>assistant\n")
        ids = r["engine_prompt_token_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        want = [256 * tiles(by_pair[pid]["query_id"]), 256 * tiles(by_pair[pid]["target_id"])]
        assert _runs(ids, ctx) == want, pid
        orders.append(want[0] != want[1])
        assert f"stop_token_ids=[{im_end}]" in r["engine_params"]
        assert r["generated_tokens"] <= cfg.describe.max_tokens
    # The order is visible (source and target tiled differently) for some pairs at least.
    assert any(orders)
    # Replies ended at the template's turn end, before max_tokens, and it is not in the text.
    ended = [r for r in engine_rows if r["generated_tokens"] < cfg.describe.max_tokens]
    assert len(ended) > len(engine_rows) // 2


@needs_corpus
@pytest.mark.ray
@pytest.mark.slow
def test_instruct_sends_llama3s_chat_form_and_every_pair_comes_out_once(paper_run, twins):
    from transformers import AutoTokenizer

    run_dir, cfg = paper_run
    described = _rows(run_dir / "descriptions")
    instructed = _rows(run_dir / "instructions")
    rejects = pair_rejects(run_dir / "rejects" / "instruct")
    assert sorted(r["pair_id"] for r in instructed + rejects) == sorted(
        r["pair_id"] for r in described)  # each exactly once
    assert instructed, "no pair got its instructions"
    assert all(len(r["instructions"]) >= 3 for r in instructed)
    assert {r["reject_reason"] for r in rejects} <= {"no_list", "truncated",
                                                     "too_few_instructions"}

    tok = AutoTokenizer.from_pretrained(twins["instruct"])
    bos, header = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>"])
    text = {r["pair_id"]: r["description"] for r in described}
    engine_rows = _tries(run_dir, "instruct")
    assert sorted(r["pair_id"] for r in engine_rows) == sorted(text)
    for r in engine_rows:
        prompt = instruct_prompt(str(r["pair_id"]), text[r["pair_id"]], cfg.instruct.seed)
        assert r["engine_prompt"] == (
            f"<|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        ids = r["engine_prompt_token_ids"]
        assert ids[0] == bos and ids.count(bos) == 1
        assert Counter(ids)[header] == 2  # the special tokens arrive as single tokens

    triplets = [json.loads(line) for line in
                (run_dir / "triplets" / "megapairs.jsonl").read_text().splitlines()]
    assert triplets and {t["describe_model"] for t in triplets} == {"tiny-random-internvl2"}
    assert {t["instruct_model"] for t in triplets} == {"tiny-random-llama3"}
