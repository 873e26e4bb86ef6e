"""Prompting instead of tuning: the base model asked with k worked examples of the task in the
prompt (few-shot, Brown et al. 2020), scored like the tuned models, and what the examples cost.

Two wordings:
  pretraining  the form the base met questions in ("Question: ... Answer: ...." inside its
               general text, see synth.py): k solved examples, then "Question: <instruction>
               Answer:"; the reply is the continuation up to its sentence's end.
  chat         the chat template the tuned models use: k user/assistant exchanges, then the
               user turn; the reply ends at the end-of-turn token (scoring.exact_match's rule).

The examples are training items of the query's family, the same for all its queries, in their
training phrasings. The base model reads 256 positions: where k examples and the reply would
not fit, the oldest examples are left out, and the number that fit is reported with the
prompt's length in tokens (the price of every query, paid again at each one).
"""

import json
from pathlib import Path

import torch

from minituner.experiment.scoring import SENTENCE_END
from minituner.generate import greedy_texts
from minituner.sft import prompt_ids
from minituner.templates import stop_ids

SHOTS = (0, 1, 4, 8)
WORDINGS = ("pretraining", "chat")
ITEMS = 60  # held-out items asked per set (spread over the families): 8 prompts each is the suite's costliest part


def read_items(path) -> list[dict]:
    """A task file's records as {"family", "instruction", "answer"} (the built-in data's JSONL)."""
    items = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        user, assistant = record["messages"][0]["content"], record["messages"][-1]["content"]
        items.append({"family": record["family"], "instruction": user, "answer": assistant})
    return items


def examples_by_family(train: list[dict], k: int) -> dict[str, list[dict]]:
    """The first k training items of each family."""
    out: dict[str, list[dict]] = {}
    for item in train:
        shots = out.setdefault(item["family"], [])
        if len(shots) < k:
            shots.append(item)
    return out


def prompt(tokenizer, item: dict, shots: list[dict], wording: str, template: str) -> list[int]:
    """The token ids asking `item` after the worked `shots`, in `wording`."""
    if wording == "pretraining":
        solved = "".join(f"Question: {s['instruction']} Answer: {s['answer']}. " for s in shots)
        return list(tokenizer.prefix_ids) + tokenizer.encode_text(f"{solved}Question: {item['instruction']} Answer:")
    conversation = [message for s in shots for message in ({"role": "user", "content": s["instruction"]},
                                                             {"role": "assistant", "content": s["answer"]})]
    return prompt_ids(conversation + [{"role": "user", "content": item["instruction"]}], tokenizer, template)


@torch.no_grad()
def few_shot(model, tokenizer, items: list[dict], shots: dict[str, list[dict]], *, wording: str, template: str,
             max_new_tokens: int) -> dict:
    """{"accuracy", "tokens": mean prompt length, "shots": mean examples that fit} of `items` asked
    after their family's `shots`, the oldest left out until prompt and reply fit the context."""
    room = model.config.max_seq_len - max_new_tokens
    prompts, used = [], []
    for item in items:
        examples = list(shots.get(item["family"], []))
        ids = prompt(tokenizer, item, examples, wording, template)
        while len(ids) > room and examples:
            examples.pop(0)
            ids = prompt(tokenizer, item, examples, wording, template)
        prompts.append(ids[-room:])
        used.append(len(examples))
    stops = tokenizer.stop_ids if wording == "pretraining" else stop_ids(template, tokenizer)
    replies = greedy_texts(model, tokenizer, prompts, stops, max_new_tokens)
    if wording == "pretraining":
        replies = [SENTENCE_END.split(reply, 1)[0] for reply in replies]
    hits = [reply.strip() == item["answer"].strip() for reply, item in zip(replies, items)]
    return {"accuracy": sum(hits) / len(hits), "tokens": sum(map(len, prompts)) / len(prompts),
            "shots": sum(used) / len(used)}
