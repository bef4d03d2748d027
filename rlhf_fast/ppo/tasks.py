"""Prompt sources and the embedded default task.

The default task needs no download: a character-level tokenizer and "sort the digits", e.g. the prompt "3141592="
has the answer "1123459". Its reward is the fraction of answer positions that are right (partial credit in
[0, 1]). Prompts are split by a fixed rule into training and held-out sets, so the evaluation (greedy decoding)
only sees prompts the run never trained on.

A task provides: `train_prompts(n, generator)`, `eval_prompts()`, `demonstration(prompt)` (a reference answer
for the supervised warm-up and PPO-ptx, or None) and optionally `reward(prompts, responses)`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


class CharTokenizer:
    """A character-level tokenizer over a fixed alphabet, with pad and end-of-sequence tokens."""

    PAD, EOS = "<pad>", "<eos>"

    def __init__(self, alphabet: str = "0123456789=,+-*/ abcdefghijklmnopqrstuvwxyz"):
        self.tokens = [self.PAD, self.EOS, *alphabet]
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        self.pad_token_id, self.eos_token_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.index)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"text {text!r} has characters outside the tokenizer's alphabet: {unknown}")
        return [self.index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.tokens[i] for i in ids if self.eos_token_id < i < len(self.tokens))

    def save(self, folder: Path) -> None:
        (Path(folder) / "char_tokenizer.json").write_text(json.dumps({"alphabet": "".join(self.tokens[2:])}))


class HFTokenizer:
    """Adapter giving a transformers tokenizer the small interface the trainer uses (encode / decode / ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the model's tokenizer has no eos_token; set one in its tokenizer_config.json")
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids], skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)


def load_tokenizer(model_path: str | None):
    if model_path is None:
        return CharTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(model_path))


class SortDigits:
    """Sort a string of `length` digits. A prompt is held out when the sum of its digits times their position
    is divisible by 7 (about 1/7 of all prompts): training never samples those, evaluation samples only those."""

    has_demonstrations = True

    def __init__(self, length: int = 6, eval_size: int = 256, seed: int = 0):
        self.length = length
        self._eval = self._sample(eval_size, random.Random(seed + 7919).randrange, held_out=True)

    @staticmethod
    def held_out(digits: str) -> bool:
        return sum((i + 1) * int(d) for i, d in enumerate(digits)) % 7 == 0

    def _sample(self, n, draw, held_out):
        prompts = []
        while len(prompts) < n:
            digits = "".join(str(draw(10)) for _ in range(self.length))
            if self.held_out(digits) == held_out:
                prompts.append(digits + "=")
        return prompts

    def train_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        def draw(high):
            return int(torch.randint(high, (), generator=generator))

        return self._sample(n, draw, held_out=False)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def demonstration(self, prompt: str) -> str:
        return "".join(sorted(prompt.rstrip("=")))

    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Fraction of the answer's positions that hold the right digit; extra or missing characters count wrong."""
        scores = []
        for prompt, response in zip(prompts, responses):
            target = self.demonstration(prompt)
            right = sum(a == b for a, b in zip(response, target))
            scores.append(right / max(len(target), len(response)))
        return scores


class PromptFile:
    """Prompts from a JSON-lines file: one object per line with a "prompt" string and optionally a "response"
    (a demonstration, used by the warm-up and PPO-ptx). The first `eval_size` prompts after a seeded shuffle are
    held out for evaluation."""

    def __init__(self, path: str, eval_size: int = 256, seed: int = 0):
        self.records = read_prompt_file(path)
        if len(self.records) < 2:
            raise ValueError(
                f"--prompts {path}: needs at least 2 prompts (training and held-out), found {len(self.records)}"
            )
        order = list(range(len(self.records)))
        random.Random(seed).shuffle(order)
        n_eval = min(eval_size, len(order) // 2)
        self._eval, self._train = order[:n_eval], order[n_eval:]
        self.responses = {r["prompt"]: r["response"] for r in self.records if "response" in r}
        self.has_demonstrations = bool(self.responses)

    def train_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        picks = torch.randint(len(self._train), (n,), generator=generator).tolist()
        return [self.records[self._train[i]]["prompt"] for i in picks]

    def eval_prompts(self) -> list[str]:
        return [self.records[i]["prompt"] for i in self._eval]

    def demonstration(self, prompt: str) -> str | None:
        return self.responses.get(prompt)


def read_prompt_file(path: str) -> list[dict]:
    """Parses and checks a prompts .jsonl file; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts {path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'--prompts {path}, line {number}: expected an object with a "prompt" string')
        if "response" in record and not isinstance(record["response"], str):
            raise ValueError(f'--prompts {path}, line {number}: "response" must be a string')
        records.append(record)
    return records
