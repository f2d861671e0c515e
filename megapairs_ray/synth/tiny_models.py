"""Tiny random-initialised language models, built offline, for the ``tiny`` profile and tests.

They exercise the production path — ``ray.data.llm``, vLLM, the chat template, structured output —
without a model hub or a GPU. Their words are noise: what they prove is the plumbing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megapairs_ray.models.mllm_twin import published_llava_layout
from megapairs_ray.models.tokenizer import bpe_tokenizer
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


def _tokenizer(vocab_size: int, chat_template: str, extra_specials: tuple[str, ...] = (),
               specials: tuple[str, ...] = tuple(_SPECIALS), unk: str | None = "<unk>",
               bos: str = "<s>", eos: str = "</s>", pad: str | None = "<pad>",
               add_bos: bool = False) -> Any:
    """A byte-level BPE trained here on the prompts' own words (``tokenizer.bpe_tokenizer``)."""
    return bpe_tokenizer(_training_text(), vocab_size, chat_template, extra_specials,
                         specials=specials, unk=unk, bos=bos, eos=eos, pad=pad, add_bos=add_bos)


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
    published_llava_layout(out / "model.safetensors")
    return out


# --- The paper's families: InternVL2 (describe) and Llama 3 (instruct) -------------------------

# InternVL2-26B's tokenizer (InternLM2's, with InternVL's image tokens added) and its chat
# template, which takes each message's content as one string: images are "<image>" in the text,
# and vLLM's InternVL processor expands each into <img><IMG_CONTEXT>...</img>, 256 per tile.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INTERNLM2_SPECIALS = ("<unk>", "<s>", "</s>")
INTERNVL2_ADDED = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                   "<|interpreter|>", "<|plugin|>", "<img>", "</img>", "<IMG_CONTEXT>",
                   "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

# Meta-Llama-3-8B-Instruct's chat template and the first ten of its special tokens, in its order.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>")

# OpenGVLab's checkpoints load their config through remote code (``configuration_internvl_chat.
# py``, ``configuration_intern_vit.py``, ``configuration_internlm2.py``), which is not available
# offline. This stand-in defines the same fields vLLM reads; vLLM's own InternVLChatModel,
# InternViT, InternLM2 and InternVL processor do the rest, as they do for the real checkpoint.
INTERNVL_CHAT_CONFIG_PY = '''"""A stand-in for OpenGVLab's InternVL2 config classes."""

import copy

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=448, qkv_bias=False,
                 hidden_size=3200, num_attention_heads=25, intermediate_size=12800,
                 qk_normalization=True, num_hidden_layers=48, use_flash_attn=True,
                 hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                 initializer_factor=0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=92544, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000,
                 rope_scaling=None, attn_implementation="eager", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attn_implementation = attn_implementation
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0,
                 use_llm_lora=0, select_layer=-1, force_image_size=None,
                 downsample_ratio=0.5, template=None, dynamic_image_size=False,
                 use_thumbnail=False, ps_version="v1", min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        llm_config = dict(llm_config or {"architectures": ["InternLM2ForCausalLM"]})
        if llm_config["architectures"][0] != "InternLM2ForCausalLM":
            raise ValueError("this stand-in knows InternLM2 language models only")
        self.llm_config = InternLM2Config(**llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
'''


def _random(shape: tuple[int, ...], std: float = 0.02) -> Any:
    import torch

    return torch.randn(shape) * std


def _nudge(embed: Any, final_norm: Any, lm_head: Any, token_id: int, logit: float) -> None:
    """Give one token a steady chance at every step of a random model (in place).

    Random weights make every next token about equally likely, so a reply ends only when
    ``max_tokens`` cuts it off. A trained model ends its replies; to give the pipeline replies
    of the lengths it meets with one, the embeddings get a constant hidden dimension (0), which
    the final norm scales to about ``logit`` and only ``token_id``'s output row reads: that
    token then gets about ``exp(logit / T)`` times the odds of any other at temperature T."""
    embed.normal_(0.0, 1.0)
    embed[:, 0] = 1.0
    lm_head.normal_(0.0, 0.02)
    lm_head[:, 0] = 0.0
    lm_head[token_id, 0] = 1.0
    final_norm[0] = logit


def _internvl2_weights(vision: dict[str, Any], llm: dict[str, Any], downsample: float,
                       turn_end: int, turn_end_logit: float) -> dict[str, Any]:
    """Random weights under the names InternVL2's checkpoints use (InternViT-6B style: RMS
    norms, q/k normalisation, no qkv bias; an InternLM2 language model), the turn end
    nudged (``_nudge``)."""
    import torch

    w: dict[str, Any] = {}
    d, inter = vision["hidden_size"], vision["intermediate_size"]
    p, n = vision["patch_size"], (vision["image_size"] // vision["patch_size"]) ** 2
    v = "vision_model."
    w[v + "embeddings.class_embedding"] = _random((1, 1, d))
    w[v + "embeddings.patch_embedding.weight"] = _random((d, 3, p, p))
    w[v + "embeddings.patch_embedding.bias"] = torch.zeros(d)
    w[v + "embeddings.position_embedding"] = _random((1, n + 1, d))
    for i in range(vision["num_hidden_layers"]):
        layer = f"{v}encoder.layers.{i}."
        w[layer + "attn.qkv.weight"] = _random((3 * d, d))
        w[layer + "attn.q_norm.weight"] = torch.ones(d)
        w[layer + "attn.k_norm.weight"] = torch.ones(d)
        w[layer + "attn.proj.weight"] = _random((d, d))
        w[layer + "attn.proj.bias"] = torch.zeros(d)
        w[layer + "mlp.fc1.weight"] = _random((inter, d))
        w[layer + "mlp.fc1.bias"] = torch.zeros(inter)
        w[layer + "mlp.fc2.weight"] = _random((d, inter))
        w[layer + "mlp.fc2.bias"] = torch.zeros(d)
        w[layer + "norm1.weight"] = torch.ones(d)
        w[layer + "norm2.weight"] = torch.ones(d)
        w[layer + "ls1"] = torch.full((d,), 0.1)
        w[layer + "ls2"] = torch.full((d,), 0.1)
    h, vocab = llm["hidden_size"], llm["vocab_size"]
    shuffled = d * int(1 / downsample) ** 2
    w["mlp1.0.weight"], w["mlp1.0.bias"] = torch.ones(shuffled), torch.zeros(shuffled)
    w["mlp1.1.weight"], w["mlp1.1.bias"] = _random((h, shuffled)), torch.zeros(h)
    w["mlp1.3.weight"], w["mlp1.3.bias"] = _random((h, h)), torch.zeros(h)
    heads, kv_heads, ffn = (llm["num_attention_heads"], llm["num_key_value_heads"],
                            llm["intermediate_size"])
    head_dim = h // heads
    lm = "language_model.model."
    w[lm + "tok_embeddings.weight"] = _random((vocab, h), 1.0)
    for i in range(llm["num_hidden_layers"]):
        layer = f"{lm}layers.{i}."
        w[layer + "attention.wqkv.weight"] = _random(((heads + 2 * kv_heads) * head_dim, h))
        w[layer + "attention.wo.weight"] = _random((h, heads * head_dim))
        w[layer + "feed_forward.w1.weight"] = _random((ffn, h))
        w[layer + "feed_forward.w3.weight"] = _random((ffn, h))
        w[layer + "feed_forward.w2.weight"] = _random((h, ffn))
        w[layer + "attention_norm.weight"] = torch.ones(h)
        w[layer + "ffn_norm.weight"] = torch.ones(h)
    w[lm + "norm.weight"] = torch.ones(h)
    w["language_model.output.weight"] = _random((vocab, h))
    _nudge(w[lm + "tok_embeddings.weight"], w[lm + "norm.weight"],
           w["language_model.output.weight"], turn_end, turn_end_logit)
    return w


def build_tiny_internvl2(out: str | Path, vocab_size: int = 1024, hidden: int = 64,
                         layers: int = 2, tile_size: int = 448, turn_end_logit: float = 1.8,
                         seed: int = 0) -> Path:
    """A random InternVL2 in OpenGVLab's layout (``InternVLChatModel``: InternViT, the pixel-
    shuffle MLP projector, an InternLM2 language model), with InternVL2-26B's image handling
    (448-px tiles, up to 12 of them plus a thumbnail, 256 tokens each) and its tokenizer's
    special tokens and chat template, at tiny widths and depths. vLLM loads it as it loads the
    real checkpoint, with ``trust_remote_code`` (the config classes are a stand-in written here:
    ``INTERNVL_CHAT_CONFIG_PY``). Like a trained InternVL2 it ends its turn with ``<|im_end|>``,
    which is not its tokenizer's EOS (about 1.3 % a step at the paper's temperature 0.7:
    ``_nudge``). Rebuilding into the same folder is a no-op."""
    import json

    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    hf_tok = _tokenizer(vocab_size, INTERNLM2_CHAT_TEMPLATE, extra_specials=INTERNVL2_ADDED,
                        specials=INTERNLM2_SPECIALS, pad="</s>", add_bos=True)
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
              "hidden_size": hidden, "intermediate_size": hidden * 4,
              "num_attention_heads": 2, "num_hidden_layers": layers, "image_size": tile_size,
              "patch_size": 14, "qkv_bias": False, "qk_normalization": True,
              "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
              "initializer_factor": 0.1, "use_flash_attn": False}
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
           "vocab_size": len(hf_tok), "hidden_size": hidden, "intermediate_size": hidden * 2,
           "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
           "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
           "bias": False, "tie_word_embeddings": False,
           "bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id,
           "pad_token_id": hf_tok.pad_token_id, "torch_dtype": "float32"}
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "vision_config": vision, "llm_config": llm, "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": tile_size, "max_dynamic_patch": 12,
        "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": "internlm2-chat", "use_thumbnail": True, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    weights = _internvl2_weights(vision, llm, config["downsample_ratio"],
                                 hf_tok.convert_tokens_to_ids("<|im_end|>"), turn_end_logit)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    (out / "configuration_internvl_chat.py").write_text(INTERNVL_CHAT_CONFIG_PY)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_tiny_llama3(out: str | Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                      quote_logit: float = 3.0, seed: int = 0) -> Path:
    """A random Llama with Meta-Llama-3-8B-Instruct's chat template, special tokens (a BOS the
    tokenizer adds itself, turns ended by ``<|eot_id|>``) and generation config, at tiny sizes.
    Its strings end (a ``"`` about 4 % a step at the paper's temperature 0.8: ``_nudge``), so
    the JSON lists that structured output makes of its noise fit the paper's ``max_tokens``.
    Rebuilding into the same folder is a no-op."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    hf_tok = _tokenizer(vocab_size, LLAMA3_CHAT_TEMPLATE, specials=LLAMA3_SPECIALS, unk=None,
                        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True)
    end_of_text = hf_tok.convert_tokens_to_ids("<|end_of_text|>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        _nudge(model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight,
               hf_tok.convert_tokens_to_ids('"'), quote_logit)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": hf_tok.bos_token_id,
        "eos_token_id": [end_of_text, hf_tok.eos_token_id],
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}, indent=2))
    return out
