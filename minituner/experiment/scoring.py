"""Exact-match scoring of greedy generations: the measure of whether a model can do a task,
where perplexity only says how surprised it is.

  exact_match     a conversation's final answer, the model's greedy reply to everything before it
                  (rendered by the template as in training, stopped at the end-of-turn token):
                  correct when the reply, stripped of surrounding whitespace, equals the answer.
  cloze_accuracy  a text prompt cut before a fact ("Kelbur lives in"): correct when the greedy
                  continuation, up to the end of its sentence (or a token the model stops on:
                  an instruction-tuned model ends its turn), equals the answer.

Files of cloze items are JSON lines {"prompt": str, "answer": str}; instruction items are
conversations in any format minituner/formats.py reads.
"""

import re
from pathlib import Path

import torch

from minituner.datafile import json_records, read_text, type_name
from minituner.errors import UserError
from minituner.generate import greedy_texts
from minituner.sft import prompt_ids
from minituner.templates import stop_ids

SENTENCE_END = re.compile(r"[.!?\n]")


@torch.no_grad()
def exact_match(model, tokenizer, template: str, conversations: list[list[dict]], *, max_new_tokens: int,
                source: str = "the evaluation set") -> dict:
    """{"accuracy", "correct", "n", "replies", "hits"}: greedy replies scored against the
    conversations' final (assistant) messages."""
    for i, conv in enumerate(conversations):
        if conv[-1]["role"] != "assistant":
            raise UserError(f"{source}: conversation {i + 1} does not end with an assistant answer to score")
    prompts = [prompt_ids(conv, tokenizer, template) for conv in conversations]
    replies = greedy_texts(model, tokenizer, prompts, stop_ids(template, tokenizer), max_new_tokens)
    hits = [reply.strip() == conv[-1]["content"].strip() for reply, conv in zip(replies, conversations)]
    return _score(hits, replies)


@torch.no_grad()
def cloze_accuracy(model, tokenizer, items: list[dict], *, max_new_tokens: int = 16) -> dict:
    """{"accuracy", "correct", "n", "replies", "hits"}: greedy continuations of the prompts, the
    first sentence of each compared with the answer."""
    prompts = [tokenizer.prefix_ids + tokenizer.encode_text(item["prompt"]) for item in items]
    replies = greedy_texts(model, tokenizer, prompts, tokenizer.stop_ids, max_new_tokens)
    hits = [SENTENCE_END.split(reply, 1)[0].strip() == item["answer"].strip() for reply, item in zip(replies, items)]
    return _score(hits, replies)


def _score(hits: list[bool], replies: list[str]) -> dict:
    if not hits:
        raise UserError("nothing to score: the evaluation set is empty")
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "n": len(hits), "replies": replies, "hits": hits}


def read_cloze(path) -> list[dict]:
    """Cloze items of a JSON or JSONL file of {"prompt", "answer"} records (errors name the line)."""
    path, items = Path(path), []
    for where, record in json_records(path, read_text(path, 'a JSONL file of {"prompt", "answer"} records')):
        if isinstance(record, UserError):
            raise UserError(f"{where}: {record}")
        for field in ("prompt", "answer"):
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                got = type_name(value) if isinstance(record, dict) and field in record else "missing"
                raise UserError(f'{where}: "{field}" must be a non-empty string ({got})')
        items.append({"prompt": record["prompt"], "answer": record["answer"]})
    if not items:
        raise UserError(f"{path}: no cloze items")
    return items


def spread(items: list, limit: int) -> list:
    """At most `limit` of `items` (0: all), taken evenly over the list, so that a set written family
    by family keeps every family."""
    if not limit or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]
