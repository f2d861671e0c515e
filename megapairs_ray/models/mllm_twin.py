"""A tiny random twin of the ``mllm`` family's backbone, built offline for tests and benchmarks.

It is LLaVA-NeXT as LLaVA-1.6-Mistral-7B is laid out (``LlavaNextForConditionalGeneration``: a
CLIP vision tower, the two-layer projector, the image-newline vector, a Mistral language model)
with the released processor's parts: anyres tiling over the same grid of pinpoints (scaled to
the twin's tile size), the image token expanded per tile, a Mistral-style ``[INST]`` chat
template and a tokenizer that puts ``<s>`` first. Only the widths, depths and vocabulary are
small, so loading the released checkpoint and loading the twin run the same code. Its weights
are random: what it proves is the plumbing, and, trained, that the plumbing learns.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megapairs_ray.models.tokenizer import bpe_tokenizer

# ``model.init`` / ``--checkpoint`` by this name is the twin, built on first use under the
# working directory of the process that resolves it (the driver), and passed on by absolute path.
TWIN_NAME = "tiny-random-llava-next"
TWIN_DIR = ".cache/megapairs/tiny-llava-next"

IMAGE_TOKEN = "<image>"
# LLaVA-1.6-Mistral's conversation form: user turns in [INST] ... [/INST], images first.
MISTRAL_LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in m['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %} [/INST]{% else %} {{ m['content'] if m['content'] is string else "
    "m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
)
# LLaVA-1.6's grid of anyres resolutions, in tiles of 336 px: 1x2, 2x1, 2x2, 3x1, 1x3.
RELEASED_TILE = 336
RELEASED_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

_WORDS = (
    "[INST] [/INST] Represent the given image. Retrieve the target image that best meets the "
    "combined criteria by using both the provided image and the image retrieval instructions. "
    "Find an image that shows the same object in another colour, a dog, a cat, a red car, a "
    "blue sky, grass, a house, two people, a frog, a flag, a computer, in summary, above. "
    "Show the same thing but at night; make it larger; change the background to a beach."
)


def build_tiny_llava_next(out: str | Path, vocab_size: int = 512, hidden: int = 64,
                          layers: int = 2, tile_size: int = 28, patch_size: int = 14,
                          init_range: float = 0.02, seed: int = 0) -> Path:
    """Write the twin to ``out`` with ``save_pretrained`` (model, processor, tokenizer, chat
    template). ``tile_size`` plays 336: each tile is ``(tile_size / patch_size)**2`` tokens, and
    a square image of two tiles a side is 4 tiles plus the whole image. Attention heads are 32
    wide, the narrowest vLLM's CPU kernels take. Rebuilding into the same folder is a no-op."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    out = Path(out)
    if (out / "config.json").exists() and (out / "processor_config.json").exists():
        return out
    tok = bpe_tokenizer([_WORDS], vocab_size, MISTRAL_LLAVA_CHAT_TEMPLATE,
                        extra_specials=(IMAGE_TOKEN,), pad=None, add_bos=True)
    tok.pad_token = tok.unk_token  # as LLaVA-1.6-Mistral's processor pads
    scale = tile_size / RELEASED_TILE
    pinpoints = [[round(h * scale), round(w * scale)] for h, w in RELEASED_PINPOINTS]
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                              num_hidden_layers=layers, num_attention_heads=hidden // 32,
                              image_size=tile_size, patch_size=patch_size, projection_dim=hidden)
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
        head_dim=32, max_position_embeddings=4096, sliding_window=None,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(tile_size // patch_size) ** 2,
        initializer_range=init_range)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessor(
        size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default",
                                   chat_template=MISTRAL_LLAVA_CHAT_TEMPLATE,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    # Written aside and renamed into place: a process that finds the folder finds it whole.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    published_llava_layout(tmp / "model.safetensors")
    try:
        tmp.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def twin_path() -> str:
    """The twin's folder (absolute), built if it is not there yet."""
    return str(build_tiny_llava_next(Path(TWIN_DIR).resolve()))


def published_llava_layout(weights: Path) -> None:
    """transformers 5 saves a LLaVA's vision tower weights without the ``vision_model.`` level
    that the published llava-hf and BGE-VL checkpoints (and vLLM's loader) have; put it back.
    transformers reads either."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    prefix = "vision_tower."
    renamed = {(prefix + "vision_model." + k[len(prefix):]
                if k.startswith(prefix) and not k.startswith(prefix + "vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
