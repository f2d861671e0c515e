"""Tiny random-initialised language models, built offline, for the ``tiny`` profile and tests.

They exercise the production path — ``ray.data.llm``, vLLM, the chat template, structured output —
without a model hub or a GPU. Their words are noise: what they prove is the plumbing.
"""

from __future__ import annotations

from pathlib import Path

from megapairs_ray.synth.prompts import INSTRUCT_HEADER, demonstration_pool

# Enough to give a byte-level BPE the prompts' vocabulary.
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


def _training_text() -> list[str]:
    lines = [INSTRUCT_HEADER]
    for d in demonstration_pool():
        lines.append(d.connection)
        lines.extend(d.queries)
    return lines


def build_tiny_llm(out: str | Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2,
                   seed: int = 0) -> Path:
    """A random Llama with a BPE tokenizer trained here; written with ``save_pretrained``.
    One attention head: vLLM's CPU attention kernels take head sizes of 32 and up, not 16.
    Rebuilding into the same folder is a no-op."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>", pad_token="<pad>")
    hf_tok.chat_template = CHAT_TEMPLATE
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
