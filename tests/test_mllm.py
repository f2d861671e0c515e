"""The mllm family on its tiny LLaVA-NeXT twin (no Ray): the released processor's inputs, the
embedding, LoRA, the checkpoint round trip, GradCache, and the one-line errors."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megapairs_ray.models.family import checkpoint_family, load_retriever
from megapairs_ray.models.inputs import PromptTooLong, tokenize_queries
from megapairs_ray.models.mllm import MMRetMLLM, NotLlavaNext, settings_model_input
from megapairs_ray.models.mllm_settings import (
    DEFAULT_LORA_TARGETS,
    RELEASED_CANDIDATE,
    RELEASED_INSTRUCTION,
    RELEASED_QUERY,
    MLLMConfigError,
    MLLMSettings,
)
from megapairs_ray.models.mllm_twin import build_tiny_llava_next
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.models.tokenizer import load_tokenizer
from megapairs_ray.pixels import to_model_input
from megapairs_ray.train.config import OptimConfig, TrainConfig
from megapairs_ray.train.step import TrainStep

from .train_helpers import train_config

SIDE = 56  # two twin tiles a side, as 512 is for the released model's 336-pixel tiles
LM_TARGETS = r".*language_model.*\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The twin, with the family's settings for its size written beside it."""
    path = build_tiny_llava_next(tmp_path_factory.mktemp("twin") / "llava-next")
    (path / "mmret_mllm.json").write_text(json.dumps(
        MLLMSettings(image_size=SIDE, max_text_len=96).to_dict()))
    return str(path)


def _model(twin: str, lora: bool = False, dropout: float = 0.0) -> MMRetMLLM:
    torch.manual_seed(0)
    m = MMRetMLLM.from_pretrained(twin, trainable=lora)
    assert m.settings.image_size == SIDE
    if lora:
        m.add_lora(r=4, alpha=8, dropout=dropout, target_modules=LM_TARGETS)
        with torch.no_grad():  # a trained adapter, not peft's zero start
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return m


def _photo(seed: int, h: int = 80, w: int = 120) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _levels(m: MMRetMLLM, images: list[Image.Image]) -> torch.Tensor:
    spec = m.model_input.image_spec()
    return to_model_input([torch.from_numpy(np.array(im)) for im in images], spec,
                          torch.float32)


def test_inputs_and_embeddings_are_the_released_processors(twin):
    """What BGE-VL-MLLM's own code feeds LLaVA-NeXT (the image squashed with Pillow, its
    processor's anyres tiles, the [INST] prompt with the image expanded) and what this family
    feeds it agree: the same token ids, the same tiles within a level's rounding, and the same
    embedding of a query and of a candidate."""
    from transformers import AutoProcessor

    m = _model(twin).eval()
    processor = AutoProcessor.from_pretrained(twin)
    image = _photo(0)
    squashed = image.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    prompt = RELEASED_QUERY.replace("{instruction}", RELEASED_INSTRUCTION).replace(
        "{text}", "make it red")
    ref_q = processor(images=[squashed], text=[prompt], return_tensors="pt")
    ref_c = processor(images=[squashed], text=[RELEASED_CANDIDATE], return_tensors="pt")
    tok = load_tokenizer(twin)
    ids, mask = tokenize_queries(tok, m.model_input, ["make it red"], [True])
    n = int(mask.sum())
    assert ids[0, :n].tolist() == ref_q["input_ids"][0].tolist()
    assert m.candidate_ids[0].tolist() == ref_c["input_ids"][0].tolist()
    # 24 image tokens: the whole image's 2x2 patches, the 4x4 grid's, a newline per grid row.
    assert m.image_tokens == 4 + 16 + 4 == int((ref_c["input_ids"] == m.image_token_id).sum())
    px = _levels(m, [image])
    from megapairs_ray.models.mllm import anyres

    tiles = anyres(px, m.grid, m.tile, m.mean, m.std)
    assert tiles.shape == ref_q["pixel_values"].shape
    assert (tiles - ref_q["pixel_values"]).abs().max() < 2 / 255 / min(m.std.flatten().tolist())
    with torch.no_grad():
        q = m.embed_queries(px, torch.from_numpy(ids), torch.from_numpy(mask))
        c = m.embed_candidates(px)
        inner = m.base_llava().model
        want_q = torch.nn.functional.normalize(inner(**ref_q).last_hidden_state[:, -1], dim=-1)
        want_c = torch.nn.functional.normalize(inner(**ref_c).last_hidden_state[:, -1], dim=-1)
    assert float((q * want_q).sum()) > 0.9999 and float((c * want_c).sum()) > 0.9999


def test_a_mixed_batch_embeds_each_query_as_it_would_alone(twin):
    """Composed, text-only and image-only queries in one padded batch: each row's embedding is
    the one it gets alone (its image is the right one, its padding changes nothing)."""
    enc = RetrieverEncoder(twin, batch_size=8)

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        _photo(seed, 64 + seed, 90).save(buf, format="PNG")
        return buf.getvalue()

    images = [jpeg(1), None, jpeg(2), jpeg(3)]
    texts = ["make it red", "a dog on grass at night, seen from far above", None, "bigger"]
    together = enc.queries(images, texts)
    alone = np.concatenate([enc.queries([i], [t]) for i, t in zip(images, texts)])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert not np.allclose(together[0], together[3], atol=1e-3)


def test_a_long_text_is_shortened_and_the_prompt_is_never_cut(twin):
    m = _model(twin)
    tok = load_tokenizer(twin)
    mi = m.model_input
    ids, mask = tokenize_queries(tok, mi, ["red " * 200, "red"], [True, True])
    assert mask[0].sum() <= mi.max_text_len and mask[0].all()
    assert tok.decode(ids[0]).endswith(" [/INST]")  # the turn closes: its last token embeds
    assert int((ids[0] == m.image_token_id).sum()) == m.image_tokens
    short = settings_model_input(MLLMSettings(image_size=SIDE, max_text_len=30), m.image_tokens)
    with pytest.raises(PromptTooLong, match="max_text_len 30 is shorter than the prompt"):
        tokenize_queries(tok, short, ["red"], [True])


def test_the_adapter_checkpoint_reloads_to_identical_embeddings(twin, tmp_path):
    """Saved as peft saves an adapter (the base named, not copied) with the family's settings;
    loaded back by the family (merged) and by peft on the base, it embeds as before."""
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration

    m = _model(twin, lora=True).eval()
    px = _levels(m, [_photo(4), _photo(5, 100, 60)])
    with torch.no_grad():
        before = m.embed_candidates(px)
    m.save_pretrained(tmp_path / "ckpt")
    load_tokenizer(twin).save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "mmret_mllm.json"} <= files
    assert "model.safetensors" not in files
    assert checkpoint_family(str(tmp_path / "ckpt")) == "mllm"
    again = load_retriever(str(tmp_path / "ckpt")).eval()
    assert again.settings == m.settings and not again.is_lora  # merged for embedding
    with torch.no_grad():
        assert torch.allclose(again.embed_candidates(px), before, atol=1e-5)
    peft_user = PeftModel.from_pretrained(LlavaNextForConditionalGeneration.from_pretrained(twin),
                                          str(tmp_path / "ckpt"))
    theirs = MMRetMLLM(peft_user, load_tokenizer(twin), m.settings).eval()
    with torch.no_grad():
        assert torch.allclose(theirs.embed_candidates(px), before, atol=1e-5)
    trainable = load_retriever(str(tmp_path / "ckpt"), trainable=True)
    assert trainable.is_lora and any(p.requires_grad for p in trainable.parameters())


def _triplets(b: int = 4, h: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def px(*s: int) -> torch.Tensor:
        return torch.randint(0, 256, s, generator=g, dtype=torch.uint8)

    return {"query_pixels": px(b, 3, SIDE, SIDE), "target_pixels": px(b, 3, SIDE, SIDE),
            "negative_pixels": px(b, h, 3, SIDE, SIDE)}


def _query_batch(twin: str, m: MMRetMLLM, texts: list[str]) -> dict[str, torch.Tensor]:
    """``_triplets()`` with ``texts`` as the queries' instructions, tokenized as training does."""
    batch = _triplets()
    ids, mask = tokenize_queries(load_tokenizer(twin), m.model_input, texts, [True] * len(texts))
    batch["input_ids"], batch["attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    return batch


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None,
           ) -> tuple[float, dict[str, torch.Tensor]]:
    model = copy.deepcopy(model).train()
    # The first of two accumulated micro-batches: gradients, and no optimiser step yet.
    cfg = OptimConfig(max_steps=10, batch_size=4, grad_cache_chunk=chunk, grad_accum_steps=2)
    step = TrainStep(model, model, cfg, 2, model.model_input, torch.device("cpu"))
    torch.manual_seed(5)
    assert step(batch) is None
    return float(step._loss_sum), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize(("dropout", "chunk"), [(0.0, 3), (0.1, 12)])
def test_grad_cache_gives_the_full_batch_loss_and_gradients(twin, dropout, chunk):
    """Chunks of 3 (queries and candidates each cut across rows): the loss and every LoRA
    gradient equal one pass over the whole batch. With dropout, each chunk's second pass
    replays its first pass's masks: chunks as large as the batch then draw the one-pass masks,
    and the gradients are equal only because they are replayed."""
    m = _model(twin, lora=True, dropout=dropout)
    batch = _query_batch(twin, m, ["red", "a blue car", "night", "a bigger dog please"])
    full_loss, full = _grads(m, batch, None)
    cached_loss, cached = _grads(m, batch, chunk)
    assert cached_loss == pytest.approx(full_loss, abs=1e-6)
    assert full.keys() == cached.keys() and len(full) == 8  # A and B of q, v in 2 layers
    for name, g in full.items():
        assert torch.allclose(cached[name], g, atol=1e-6, rtol=1e-4), name
    assert all(g.abs().sum() > 0 for g in full.values())


def test_lora_under_grad_cache_learns(twin):
    """The step the cluster test's run takes (LoRA from peft's zero start with the family's
    default targets, GradCache in chunks of 2, AdamW with warm-up, the cluster test's lr), in
    one process on one fixed batch, so that learning shows without a step's sampling noise: the
    loss falls from chance, ln(4 targets + 8 negatives), to well below it."""
    torch.manual_seed(0)
    m = MMRetMLLM.from_pretrained(twin, trainable=True)
    m.add_lora(r=8, alpha=16, dropout=0.0, target_modules=DEFAULT_LORA_TARGETS)
    m.train()
    batch = _query_batch(twin, m, ["red", "a blue car", "night", "a bigger dog please"])
    cfg = OptimConfig(max_steps=12, batch_size=4, warmup_steps=2, lr=3e-3, grad_cache_chunk=2,
                      temperature=0.05)
    step = TrainStep(m, m, cfg, 2, m.model_input, torch.device("cpu"))
    losses = [float(step(batch)) for _ in range(cfg.max_steps)]
    assert losses[0] == pytest.approx(np.log(12), abs=0.3), losses
    assert losses[-1] < losses[0] / 2, losses


def test_bad_mllm_settings_are_one_line_errors(twin, tmp_path):
    m = _model(twin)
    with pytest.raises(MLLMConfigError, match=r"target_modules '\.\*nothing\.\*' matches no"):
        m.add_lora(r=4, alpha=8, dropout=0.0, target_modules=".*nothing.*")
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(NotLlavaNext, match="model_type 'clip' is not llava_next"):
        MMRetMLLM.from_pretrained(clip)
    doc = train_config("x.jsonl", str(tmp_path / "s"), "n",
                       model={"init": twin, "family": "mllm",
                              "mllm": {"prompts": {"candidate": "[INST] a picture [/INST]"}}})
    with pytest.raises(ValueError, match=r"model\.mllm\.prompts\.candidate must hold the "
                                         r"image placeholder <image> exactly once"):
        TrainConfig.model_validate(doc)
    doc["model"] = {"init": None, "family": "mllm"}
    with pytest.raises(ValueError, match=r"model\.init must name a LLaVA-NeXT"):
        TrainConfig.model_validate(doc)
    with pytest.raises(MLLMConfigError, match="text_layers_trained does not apply"):
        m.freeze(False, 2)


def test_gradient_checkpointing_keeps_the_gradients(twin):
    """Activations recomputed in the backward pass (the 7B recipe's memory saving), under
    GradCache: the same gradients."""
    m = _model(twin, lora=True)
    batch = _query_batch(twin, m, ["red", "blue", "a", "b"])
    _, plain = _grads(m, batch, 3)
    m.gradient_checkpointing_enable()
    assert m.base_llava().model.language_model.gradient_checkpointing
    _, recomputed = _grads(m, batch, 3)
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, atol=1e-6, rtol=1e-4), name


def test_a_hub_id_says_its_family_through_its_config(monkeypatch):
    """llava-hf/llava-v1.6-mistral-7b-hf or BAAI/BGE-VL-MLLM-S1 as model.init: their config
    (fetched, or from the hub cache) says llava_next; one that cannot be read is taken for CLIP,
    whose loading then names the problem."""
    from types import SimpleNamespace

    import transformers

    types = {"org/llava": "llava_next", "org/clip": "clip"}

    def config(hub_id: str, **kw: object) -> SimpleNamespace:
        if hub_id not in types:
            raise OSError(f"{hub_id} is not cached and the hub is offline")
        return SimpleNamespace(model_type=types[hub_id])

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    assert [checkpoint_family(h) for h in ("org/llava", "org/clip", "org/gone")] == [
        "mllm", "clip", "clip"]
