"""The retriever's tokenizer, as a Hugging Face tokenizer in every case: a checkpoint's own
(either family), else CLIP's.

A checkpoint folder that carries tokenizer files (every released CLIP, BGE-VL and MMRet does, and
so does every checkpoint this project writes) uses its own. A random-initialised model has none:
it gets OpenAI CLIP's byte-level BPE, rebuilt from the vocabulary file that ships inside
``open_clip`` — the same 49,408 tokens, so ids equal the released tokenizer's and no model hub
is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerBase

from megapairs_ray.models.family import register_with_transformers

CLIP_VOCAB_SIZE = 49408
OPEN_CLIP_VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's file, as open_clip ships it


def load_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    if path is not None and _has_tokenizer_files(path):
        register_with_transformers()  # a towers checkpoint's config.json
        return AutoTokenizer.from_pretrained(path)
    return _openai_clip_bpe()


def _has_tokenizer_files(path: str) -> bool:
    p = Path(path)
    if not p.is_dir():
        return "/" in path and not p.exists()  # a hub id: let transformers resolve it
    return any((p / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def _open_clip_vocabulary() -> Path:
    """The BPE vocabulary file inside the installed ``open_clip``, found without importing it:
    its ``__init__`` imports every model it has (timm, transformers' model code), about 4 s of
    CPU in each training, loader and encoder process that only needs this one file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip is not installed: a random-initialised model takes "
                                  "OpenAI CLIP's vocabulary from it")
    return Path(spec.origin).parent / OPEN_CLIP_VOCABULARY


@lru_cache(maxsize=1)
def _openai_clip_bpe() -> PreTrainedTokenizerBase:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(_open_clip_vocabulary()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice OpenAI's tokenizer uses
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt",
                             pad_token="<|endoftext|>")


def bpe_tokenizer(texts: Sequence[str], vocab_size: int, chat_template: str,
                  extra_specials: tuple[str, ...] = (),
                  specials: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>"),
                  unk: str | None = "<unk>", bos: str = "<s>", eos: str = "</s>",
                  pad: str | None = "<pad>", add_bos: bool = False) -> Any:
    """A byte-level BPE trained here on ``texts`` (no hub download), for the tiny random twins:
    any text tokenizes (the byte alphabet), the words it was trained on in few tokens.
    ``add_bos``: the tokenizer puts ``bos`` before every text it encodes, as Llama's, Mistral's
    and InternLM2's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[*specials, *extra_specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
        pad_token=pad, extra_special_tokens=list(extra_specials) or None)
    hf_tok.chat_template = chat_template
    return hf_tok


