"""The paper's two prompts (docs/method.md §2), demonstration sampling, and parsing the LLM's reply.

Describe: the MLLM sees the source and the target image and summarises their commonality and
differences in under WORD_NUM words, WORD_NUM drawn per pair from 60 to 100. Instruct: the LLM sees
5 demonstrations drawn per row from a pool of 50 (``demonstrations.jsonl``: the paper's two
published ones plus 48 written in their form) and the description, and answers with a list of
instructions. Every draw is seeded by the pair id, so a rerun builds the same prompts.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from megapairs_ray.reasons import Reason

DESCRIBE_INSTRUCTION = (
    "Carefully observe the connections and differences between Source Image and Target Image. "
    "Summarize the key commonality and detailed differences between them in under WORD_NUM "
    "words. Use this template: 'Both images are / have / exhibit / show [COMMON POINTS]. "
    "However, the Source Image [DIFFERENCES], whereas the Target Image [DIFFERENCES].'"
)

INSTRUCT_HEADER = (
    "## Instruction: Based on the provided connection of two different images, create "
    "interesting text queries that can be used with the source image to retrieve the target "
    "image.\n"
    "1) Replace similarities with the source image using non-specific pronouns to avoid "
    "revealing explicit details about the source image, and keep it concise.\n"
    "2) Detail the unique differences that are present only in the target image.\n"
    "## Demonstrations:\n"
)

WORD_NUM_RANGE = (60, 100)
NUM_DEMONSTRATIONS = 5


@dataclass(frozen=True)
class Demonstration:
    connection: str
    queries: tuple[str, ...]


@lru_cache(maxsize=1)
def demonstration_pool() -> tuple[Demonstration, ...]:
    text = resources.files("megapairs_ray.synth").joinpath("demonstrations.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return tuple(Demonstration(r["connection"], tuple(r["queries"])) for r in rows)


def _rng(seed: int, key: str, purpose: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}/{purpose}/{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def word_num(pair_id: str, seed: int = 0) -> int:
    lo, hi = WORD_NUM_RANGE
    return int(_rng(seed, pair_id, "word_num").integers(lo, hi + 1))


def describe_text(pair_id: str, seed: int = 0) -> str:
    """The text that follows the two images in the MLLM prompt."""
    return DESCRIBE_INSTRUCTION.replace("WORD_NUM", str(word_num(pair_id, seed)))


def describe_messages(pair_id: str, source_image: object, target_image: object,
                      seed: int = 0) -> list[dict[str, object]]:
    """OpenAI-style chat messages with the two images in the paper's order and labels."""
    return [{"role": "user", "content": [
        {"type": "text", "text": "Source Image: "},
        {"type": "image", "image": source_image},
        {"type": "text", "text": "\nTarget Image: "},
        {"type": "image", "image": target_image},
        {"type": "text", "text": "\n" + describe_text(pair_id, seed)},
    ]}]


def sample_demonstrations(pair_id: str, seed: int = 0,
                          k: int = NUM_DEMONSTRATIONS) -> list[Demonstration]:
    pool = demonstration_pool()
    idx = _rng(seed, pair_id, "demonstrations").choice(len(pool), size=k, replace=False)
    return [pool[i] for i in idx]


def instruct_prompt(pair_id: str, description: str, seed: int = 0) -> str:
    lines = [INSTRUCT_HEADER.rstrip("\n")]
    for d in sample_demonstrations(pair_id, seed):
        lines.append(f"- Connection: {d.connection}")
        lines.append(f"- Text Query: {json.dumps(list(d.queries), ensure_ascii=False)}")
    lines.append("## Your Task:")
    lines.append(f"- Connection: {' '.join(description.split())}")
    lines.append("- Text Query:")
    return "\n".join(lines)


# --- parsing the LLM's reply ---------------------------------------------------------------------

MIN_INSTRUCTIONS = 3
MAX_INSTRUCTION_CHARS = 300
_PROMPT_ECHOES = ("connection:", "text query", "## ", "demonstrations", "your task",
                  "source image [differences]")


@dataclass
class ParsedInstructions:
    instructions: list[str]
    # Why candidate strings were dropped: empty, duplicate, too_long, too_short, prompt_echo,
    # unprintable (nothing visible left); and unprintable_removed: kept once invisible
    # characters were taken out.
    dropped: Counter[str] = field(default_factory=Counter)
    # "" when a list was found, else why not (no_list).
    problem: str = ""

    @property
    def usable(self) -> bool:
        return len(self.instructions) >= MIN_INSTRUCTIONS


def _candidate_lists(text: str) -> list[list[object]]:
    """Every bracketed list in ``text`` that parses as JSON or a Python literal."""
    found = []
    for m in re.finditer(r"\[[^\[\]]*\]", text, flags=re.S):
        chunk = m.group(0)
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(chunk)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(value, list):
                found.append(value)
                break
    return found


def _fallback_items(text: str) -> list[str]:
    """Quoted strings, else bulleted or numbered lines, for replies without a valid list."""
    quoted = re.findall(r'"([^"\n]{2,})"', text)
    if len(quoted) >= MIN_INSTRUCTIONS:
        return quoted
    items = []
    for line in text.splitlines():
        m = re.match(r"^\s*(?:[-*•]|\d+[.)])\s+(.*\S)\s*$", line)
        if m:
            items.append(m.group(1).strip().strip('"'))
    return items


def parse_instructions(text: str, max_chars: int = MAX_INSTRUCTION_CHARS) -> ParsedInstructions:
    """The instructions in an LLM reply: the longest list of strings found (code fences and
    prose around it are ignored), falling back to quoted strings or list lines; junk is dropped
    and counted."""
    lists = [v for v in _candidate_lists(text) if any(isinstance(x, str) for x in v)]
    items: list[object] = max(lists, key=len) if lists else _fallback_items(text)
    out = ParsedInstructions([])
    if not items:
        out.problem = Reason.NO_LIST
        return out
    seen: set[str] = set()
    for item in items:
        s = " ".join(str(item).split()) if item is not None else ""
        if s and not s.isprintable():
            # Invisible characters (controls, lone surrogates, unassigned code points) arrive
            # through JSON escapes; they are removed and counted, and the rest judged as usual.
            raw = s
            s = " ".join("".join(ch for ch in s if ch.isprintable()).split())
            if not s:
                out.dropped["unprintable"] += 1
                continue
            out.dropped["unprintable_removed"] += raw != s
        key = s.lower().rstrip(".!?")
        if not s:
            out.dropped["empty"] += 1
        elif len(s) > max_chars:
            out.dropped["too_long"] += 1
        elif len(key) < 3:
            out.dropped["too_short"] += 1
        elif any(e in s.lower() for e in _PROMPT_ECHOES):
            out.dropped["prompt_echo"] += 1
        elif key in seen:
            out.dropped["duplicate"] += 1
        else:
            seen.add(key)
            out.instructions.append(s)
    return out
