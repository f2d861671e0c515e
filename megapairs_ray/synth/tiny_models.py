"""Tiny random-initialised language models, built offline, for the ``tiny`` profile and tests.

They exercise the production path — ``ray.data.llm``, vLLM, the chat template, structured output —
without a model hub or a GPU. Their words are noise: what they prove is the plumbing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megapairs_ray.synth.prompts import DESCRIBE_INSTRUCTION, INSTRUCT_HEADER, demonstration_pool

# Enough to give a byte-level BPE the prompts' vocabulary.
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


IMAGE_TOKEN = "<image>"
# A multimodal template in the usual HF form: content is a string or a list of typed parts.
VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


def _training_text() -> list[str]:
    lines = [INSTRUCT_HEADER, DESCRIBE_INSTRUCTION,
             "Both images show a red dog. However, the Source Image has a ball, whereas the "
             "Target Image shows a cat on grass."]
    for d in demonstration_pool():
        lines.append(d.connection)
        lines.extend(d.queries)
    return lines


def _tokenizer(vocab_size: int, chat_template: str, extra_specials: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE trained here on the prompts' own words (no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[*_SPECIALS, *extra_specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens=list(extra_specials) or None)
    hf_tok.chat_template = chat_template
    return hf_tok


def build_tiny_llm(out: str | Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                   seed: int = 0) -> Path:
    """A random Llama with a BPE tokenizer trained here; written with ``save_pretrained``.
    One attention head: vLLM's CPU attention kernels take head sizes of 32 and up, not 16.
    Rebuilding into the same folder is a no-op."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    hf_tok = _tokenizer(vocab_size, CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1,
        max_position_embeddings=4096, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=True, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def build_tiny_vlm(out: str | Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                   image_size: int = 56, patch_size: int = 14, seed: int = 0) -> Path:
    """A random LLaVA (CLIP vision tower, projector, Llama) with its processor; written with
    ``save_pretrained``. LLaVA is the simplest vision-language architecture vLLM runs on its CPU
    backend with several images per prompt. Each image becomes (image_size/patch_size)**2
    tokens. Rebuilding into the same folder is a no-op."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out)
    if (out / "config.json").exists() and (out / "processor_config.json").exists():
        return out
    hf_tok = _tokenizer(vocab_size, VLM_CHAT_TEMPLATE, extra_specials=(IMAGE_TOKEN,))
    image_token_id = hf_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                              num_hidden_layers=layers, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=hidden)
    text = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1,
        max_position_embeddings=4096, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    tokens_per_image = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=tokens_per_image, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=hf_tok, patch_size=patch_size,
                               vision_feature_select_strategy="default",
                               chat_template=VLM_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _published_llava_layout(out / "model.safetensors")
    return out


def _published_llava_layout(weights: Path) -> None:
    """transformers 5 saves the vision tower's weights without the ``vision_model.`` level that
    the published llava-hf checkpoints (and vLLM's loader) have; put it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    prefix = "vision_tower."
    renamed = {(prefix + "vision_model." + k[len(prefix):]
                if k.startswith(prefix) and not k.startswith(prefix + "vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
