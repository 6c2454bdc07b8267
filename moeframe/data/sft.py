"""Supervised fine-tuning data: conversations -> packed, prompt-masked token batches.

Input: JSONL, one example per line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``; with no path
the embedded word task (``moeframe.data.tasks``) is used, so a run needs no download.

Rendering: a ``ChatTemplate`` turns each message into text; every assistant turn is followed
by the tokenizer's EOS so a fine-tuned model learns to stop. Only assistant tokens (and their
EOS) carry a label: prompt tokens get -100, the ignore index of the loss, because the model
should learn to answer, not to predict the questions it is asked.

Packing: short examples are concatenated into rows of ``seq_len`` tokens. Each example keeps
its own ``document_ids`` value, so attention never crosses examples (document-masked attention)
and a packed row computes exactly what the examples would compute one by one; labels are
shifted inside each example, so no example predicts its neighbour's first token.

Shapes: B rows, T = seq_len tokens.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from moeframe.data.tasks import word_task
from moeframe.data.tokenizer import Tokenizer, load_tokenizer
from moeframe.errors import ConfigError

IGNORE = -100  # label of tokens that carry no loss (F.cross_entropy's ignore_index)


@dataclass
class ChatTemplate:
    """How each role's message is written; ``{content}`` is the message text."""

    system: str = "{content}\n"
    user: str = "Q: {content}\n"
    assistant: str = "A: {content}"


@dataclass
class SFTExample:
    """One tokenised example: ``tokens`` and, per token, whether it is a response token."""

    tokens: list[int]
    is_response: list[bool]
    prompt_len: int  # tokens before the first response token: what generation is given
    response: str  # the first assistant turn, the reference for exact-match

    def shifted(self) -> tuple[list[int], list[int]]:
        """(inputs, labels): token i predicts token i + 1, labelled only if that is a response token."""
        labels = [t if r else IGNORE for t, r in zip(self.tokens[1:], self.is_response[1:])]
        return self.tokens[:-1], labels


def messages_of(record: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one JSONL record, validated; ``where`` is ``file:line`` for errors."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record:
        messages = [{"role": "user", "content": record["prompt"]}]
        if record.get("response") not in (None, ""):
            messages.append({"role": "assistant", "content": record["response"]})
    else:
        raise ConfigError(f"{where}: expected an object with 'messages' or 'prompt'/'response'")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ConfigError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: str}}")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ConfigError(
            f"{where}: the example has no (non-empty) assistant response, so it carries no loss; "
            "remove it or add a response"
        )
    return messages


def render(messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer) -> SFTExample:
    tokens: list[int] = []
    is_response: list[bool] = []
    prompt_len, response = -1, ""
    for m in messages:
        if m["role"] != "assistant":
            ids = tokenizer.encode(getattr(template, m["role"]).format(content=m["content"]))
            tokens += ids
            is_response += [False] * len(ids)
            continue
        # the template text around the answer is prompt; the answer and its EOS are the target
        head, _, tail = template.assistant.partition("{content}")
        head_ids = tokenizer.encode(head)
        body_ids = tokenizer.encode(m["content"] + tail) + [tokenizer.eos_id]
        if prompt_len < 0:
            prompt_len, response = len(tokens) + len(head_ids), m["content"]
        tokens += head_ids + body_ids
        is_response += [False] * len(head_ids) + [True] * len(body_ids)
    return SFTExample(tokens, is_response, prompt_len, response)


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(``file:line``, record) for every non-blank line; a malformed line stops everything."""
    if not path.is_file():
        raise ConfigError(f"data path {str(path)!r} does not exist (expected a JSONL file)")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
                ) from None
    if not records:
        raise ConfigError(f"{path} holds no examples")
    return records


def fit_to_context(
    examples: list[tuple[str, SFTExample]], seq_len: int, overlong: Literal["truncate", "reject"]
) -> list[SFTExample]:
    """Examples longer than ``seq_len + 1`` tokens (one row after shifting) are cut or refused."""
    kept, cut = [], 0
    for where, ex in examples:
        if len(ex.tokens) - 1 <= seq_len:
            kept.append(ex)
            continue
        if overlong == "reject":
            raise ConfigError(
                f"{where}: the example has {len(ex.tokens)} tokens, more than data.seq_len + 1 = "
                f"{seq_len + 1}; raise data.seq_len, shorten it, or set data.overlong: truncate"
            )
        n = seq_len + 1
        if not any(ex.is_response[:n]):
            raise ConfigError(
                f"{where}: the prompt alone fills data.seq_len={seq_len}, so truncation would leave "
                "no response; raise data.seq_len or shorten the prompt"
            )
        kept.append(SFTExample(ex.tokens[:n], ex.is_response[:n], ex.prompt_len, ex.response))
        cut += 1
    if cut:
        warnings.warn(
            f"{cut} of {len(examples)} examples were longer than data.seq_len={seq_len} and were "
            "truncated (data.overlong: reject refuses them instead)",
            stacklevel=2,
        )
    return kept


def pack(examples: list[SFTExample], seq_len: int, pad_id: int, packing: bool) -> list[dict[str, torch.Tensor]]:
    """Rows of ``seq_len`` tokens; with ``packing`` several examples share a row (greedy, in
    order), each its own document. Padding carries no label and is its own document."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ex in examples:
        inputs, labels = ex.shifted()
        if rows[-1] and (not packing or used + len(inputs) > seq_len):
            rows.append([])
            used = 0
        rows[-1].append((inputs, labels))
        used += len(inputs)
    out = []
    for row in rows:
        ids, labels, docs = [], [], []
        for d, (i, lab) in enumerate(row):
            ids += i
            labels += lab
            docs += [d] * len(i)
        pad = seq_len - len(ids)
        out.append(
            {
                "input_ids": torch.tensor(ids + [pad_id] * pad),
                "labels": torch.tensor(labels + [IGNORE] * pad),
                "document_ids": torch.tensor(docs + [len(row)] * pad),
            }
        )
    return out


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data (see the module docstring).

    Args:
        train_path / val_path: JSONL files; both None: the embedded word task.
        tokenizer: ``"byte"`` or a HF ``tokenizer.json`` (must be the model's).
        template: how messages become text.
        seq_len: tokens per row.
        batch_size: rows per micro-batch.
        packing: put several short examples in one row (document-masked).
        overlong: ``truncate`` (counted warning) or ``reject`` (error) for examples over seq_len.
        task_operations / task_num_train / task_num_val / task_seed: the embedded task.
        max_bytes: quick runs: keep training examples only until their text reaches this many bytes.
        seed: shuffling seed.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        tokenizer: str = "byte",
        template: ChatTemplate = ChatTemplate(),
        seq_len: int = 128,
        batch_size: int = 16,
        packing: bool = True,
        overlong: Literal["truncate", "reject"] = "truncate",
        task_operations: tuple[str, ...] = ("upper", "reverse"),
        task_num_train: int = 4000,
        task_num_val: int = 200,
        task_seed: int = 0,
        max_bytes: int | None = None,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {value}")
        if (train_path is None) != (val_path is None):
            raise ConfigError("give both data.train_path and data.val_path, or neither (the embedded task)")
        self.tokenizer = load_tokenizer(tokenizer)
        self.template, self.seq_len, self.batch_size = template, seq_len, batch_size
        self.packing, self.seed = packing, seed
        if train_path is None:
            try:
                train, val = word_task(task_num_train, task_num_val, tuple(task_operations), seed=task_seed)
            except ValueError as exc:
                raise ConfigError(f"data.task_operations: {exc}") from None
            train_records = [(f"task:train:{i}", r) for i, r in enumerate(train)]
            val_records = [(f"task:val:{i}", r) for i, r in enumerate(val)]
        else:  # read and validate everything now: a bad line must stop the run before training
            train_records, val_records = read_jsonl(Path(train_path)), read_jsonl(Path(val_path))
        if max_bytes is not None:
            train_records = _first_bytes(train_records, max_bytes)
        self.train_examples = self._tokenise(train_records, overlong)
        self.val_examples = self._tokenise(val_records, overlong)

    def _tokenise(self, records: list[tuple[str, Any]], overlong: Literal["truncate", "reject"]) -> list[SFTExample]:
        examples = [(where, render(messages_of(r, where), self.template, self.tokenizer)) for where, r in records]
        return fit_to_context(examples, self.seq_len, overlong)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> DataLoader:
        # the order is reshuffled each epoch before packing, so rows differ between epochs too
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        rows = pack([self.train_examples[i] for i in order.tolist()], self.seq_len, self.tokenizer.eos_id, self.packing)
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=_collate, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        rows = pack(self.val_examples, self.seq_len, self.tokenizer.eos_id, self.packing)
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=_collate)


def _first_bytes(records: list[tuple[str, Any]], max_bytes: int) -> list[tuple[str, Any]]:
    kept, total = [], 0
    for where, record in records:
        total += len(json.dumps(record))
        if kept and total > max_bytes:
            break
        kept.append((where, record))
    return kept
