"""Supervised fine-tuning examples: a conversation rendered by a template, tokenised, with every
prompt token masked. An example is {"input_ids": [int], "labels": [int]}, labels as in loss.py:
the token id where the model is trained to write that token, IGNORE_INDEX elsewhere.

With the model's own chat template (template "model"), the rendered string is tokenised whole
and each token labelled by its characters: minituner/chat_template.py. What follows under
"Tokenising" is about minituner's own templates (templates.py).

Tokenising. Each segment of the rendered conversation is encoded on its own and the ids are
concatenated, so no token straddles a prompt/response boundary and the labels follow the
template's trained flags exactly. (Encoding the whole text at once can merge the last prompt
characters with the first response ones.) The tokenizer's prefix_ids (BOS) come once at the
start, masked; its suffix_ids are never added, since a response ends with the template's own end
token. Message text is encoded with Tokenizer.encode_text, so "<|im_end|>"
typed in a message is plain text and cannot end a turn; the template's scaffolding is encoded
normally, so its special-token strings become the control ids.

Each segment is encoded as the continuation of what came before it, BOS included, as a chat
template writes it: SentencePiece-style tokenizers put a "▁" before the start of a text, and a
continuation gets it only where encoding the whole string would (Tokenizer.encode_text). The
segments' ids are then those of the whole rendered string encoded by the folder's tokenizer.json,
except where that would merge characters across a segment boundary: a prompt/response boundary
must not be merged over (e.g. an answer starting with punctuation right after a text "[/INST]",
or with indentation after chatml's header newline), and a few whitespace runs in scaffolding (a
plain-template "\n\n" before text) are split differently. (transformers 5 rebuilds Llama-2-style
tokenizers from their class, with their own rules; see tokenizer.py.)

Too long for max_len, an example is shortened in this order:
  1. drop the oldest exchanges (a user message and all that follows up to the next user message),
     keeping the system message, while more than one exchange remains: later turns depend on
     earlier ones less than the reverse, and a whole exchange dropped leaves no half-turn;
  2. cut prompt tokens from the left, BOS kept, but leave the prompt at least MIN_PROMPT_SHARE of
     max_len (or all of itself, if shorter): an answer without its question teaches nothing;
  3. cut the end of what remains, which is response.
An example left with no trained token after position 0 (which no token predicts) is dropped.
"""

from itertools import groupby

from minituner import chat_template
from minituner.errors import UserError
from minituner.loss import IGNORE_INDEX
from minituner.templates import EOS, MARKUP, MODEL, check_template, generation_prompt, render

MIN_PROMPT_SHARE = 0.5  # of max_len, the least a prompt is cut down to before the response is cut
MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


def build_examples(conversations: list, tokenizer, template: str, *, max_len: int, train_on_prompt: bool = False,
                   source: str | None = None) -> tuple[list[dict], dict]:
    """Training examples of `conversations` in `template`, at most max_len tokens each, and stats:
    {"examples": kept, "truncated": of those, shortened to fit, "dropped": no room for a response,
     "tokens": of the examples kept, "trained_tokens": of those, carrying loss (labels[1:] set, as in loss.py),
     and for the model's own template (see chat_template.py): "straddling", trained tokens reaching over a
     trained span's boundary; "unprompted", assistant turns that do not start with the template's generation
     prompt; "unended", assistant turns followed by no special token (nothing teaches the model to stop);
     "per_turn", conversations taken one assistant turn per example}.

    train_on_prompt: label every token, prompt included (an ablation; truncation is unchanged).
    source: the data's name for error messages.
    """
    check_template(template, tokenizer)
    where = f"{source}: " if source else ""
    if not conversations:
        raise UserError(f"{where}no conversations to make training examples from")
    examples, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "tokens": 0, "trained_tokens": 0,
                           "straddling": 0, "unprompted": 0, "unended": 0, "per_turn": 0}
    for n, conversation in enumerate(conversations, 1):
        try:
            try:
                built = [_build(conversation, tokenizer, template, max_len, train_on_prompt)]
            except chat_template.TurnsRewritten:
                stats["per_turn"] += 1
                built = [_build(turn, tokenizer, template, max_len, train_on_prompt)
                         for turn in chat_template.per_turn(conversation)]
        except UserError as e:
            raise UserError(f"{where}conversation {n}: {e}") from None
        for example, truncated, counts in built:
            if example is None:
                stats["dropped"] += 1
                continue
            examples.append(example)
            stats["examples"] += 1
            stats["truncated"] += truncated
            for name, count in counts.items():
                stats[name] += count
            stats["tokens"] += len(example["input_ids"])
            stats["trained_tokens"] += sum(label != IGNORE_INDEX for label in example["labels"][1:])
    if not examples:
        raise UserError(f"{where}no training example fits in max_len={max_len} tokens: all {len(conversations)} "
                        "conversations leave no room for a response token; use a longer max_len")
    return examples, stats


def build_example(conversation: list[dict], tokenizer, template: str, *, max_len: int,
                  train_on_prompt: bool = False) -> tuple[dict | None, bool]:
    """(example, truncated): one conversation as input_ids and labels, or (None, True) if no
    response token fits in max_len."""
    return _build(conversation, tokenizer, template, max_len, train_on_prompt)[:2]


def _build(conversation, tokenizer, template, max_len, train_on_prompt) -> tuple[dict | None, bool, dict]:
    """build_example's (example, truncated), and encode_conversation's counts."""
    ids, trained, counts = encode_conversation(conversation, tokenizer, template)
    assert any(trained), "a conversation ends with an assistant answer, which is trained"
    truncated = len(ids) > max_len
    if truncated:
        ids, trained = _truncate(conversation, tokenizer, template, max_len, ids, trained)
    if not any(trained[1:]):  # no token predicts position 0: a response token there trains nothing
        return None, truncated, {}
    labels = list(ids) if train_on_prompt else [t if k else IGNORE_INDEX for t, k in zip(ids, trained)]
    return {"input_ids": ids, "labels": labels}, truncated, counts


def encode_conversation(conversation: list[dict], tokenizer, template: str) -> tuple[list[int], list[bool], dict]:
    """(ids, trained, counts): the conversation in `template` as token ids, whether each trains, and
    for the model's template, {"straddling": ..., "unprompted": ...} (see build_examples)."""
    if template != MODEL:
        return *tokenize_segments(render(conversation, template), tokenizer), {}
    rendering = chat_template.trained_text(tokenizer, conversation)
    ids, trained, straddling = chat_template.encode(tokenizer, rendering.text, rendering.spans)
    return ids, trained, {"straddling": straddling, "unprompted": rendering.unprompted, "unended": rendering.unended}


def tokenize_segments(segments, tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, trained): the tokenizer's prefix (BOS), then each segment's ids; per id, whether it is
    trained. Also how a generation prompt is tokenised, so that it matches training."""
    ids = list(tokenizer.prefix_ids)
    trained = [False] * len(ids)
    for segment in segments:
        if segment.kind == EOS:
            piece = [tokenizer.eos_id]
        else:  # each piece continues what came before (BOS included, as a chat template writes it)
            piece = tokenizer.encode_text(segment.text, specials_as_text=segment.kind != MARKUP,
                                          previous=ids[-1] if ids else None)
        ids += piece
        trained += [segment.trained] * len(piece)
    return ids, trained


def prompt_ids(conversation: list[dict], tokenizer, template: str) -> list[int]:
    """Token ids a model continues to answer `conversation` (see templates.generation_prompt; for
    the model's template, its rendering with add_generation_prompt), tokenised as in training.

    With the model's template, training tokenises prompt and answer as one text, so a space that
    ends the prompt ("Answer: ") is part of the answer's first token (" Paris"), which trains: the
    model learnt to continue the prompt before that space, and is prompted so."""
    if template == MODEL:
        if conversation and conversation[-1]["role"] == "assistant":
            conversation = conversation[:-1]
        messages, tools = chat_template.hf_messages(conversation)
        text = chat_template.render(tokenizer, messages, tools=tools, add_generation_prompt=True)
        return tokenizer.encode_with_offsets(text[:-1] if text.endswith(" ") else text)[0]
    return tokenize_segments(generation_prompt(conversation, template), tokenizer)[0]


def n_prefix(ids: list[int], tokenizer) -> int:
    """How many of `ids` open every text and are kept when a prompt is cut: the tokenizer's
    prefix_ids (BOS) where they lead, or a BOS that the model's template wrote."""
    prefix = list(tokenizer.prefix_ids)
    if prefix and ids[:len(prefix)] == prefix:
        return len(prefix)
    return int(bool(ids) and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id)


# ----------------------------------------------------------------------------- truncation
def _truncate(conversation, tokenizer, template, max_len, ids, trained) -> tuple[list[int], list[bool]]:
    """ids, trained shortened to max_len in the module docstring's order."""
    while len(ids) > max_len:
        shorter = without_first_exchange(conversation)
        if shorter is None:
            break
        conversation = shorter
        ids, trained, _ = encode_conversation(conversation, tokenizer, template)
    kept = n_prefix(ids, tokenizer)
    prompt = trained.index(True) - kept  # prompt tokens between BOS and the first response token
    keep = min(prompt, int(max_len * MIN_PROMPT_SHARE))
    cut = max(0, min(len(ids) - max_len, prompt - keep))
    ids = ids[:kept] + ids[kept + cut:]
    trained = trained[:kept] + trained[kept + cut:]
    return ids[:max_len], trained[:max_len]


def without_first_exchange(conversation: list[dict]) -> list[dict] | None:
    """The conversation without its oldest exchange, the system message kept; None if it has only
    one (an exchange runs from a user message up to the next user message after an answer)."""
    start = 1 if conversation[0]["role"] == "system" else 0
    answered = False
    for i in range(start, len(conversation)):
        role = conversation[i]["role"]
        if role == "user" and answered:
            return conversation[:start] + conversation[i:]
        answered = answered or role == "assistant"
    return None


# ----------------------------------------------------------------------------- inspection
def show_mask(example: dict, tokenizer) -> str:
    """An example's text with every trained span in ⟦…⟧, under a legend line."""
    legend = (f"legend: {MASK_OPEN}trained{MASK_CLOSE} (labels = token ids); "
              f"the rest is masked (labels = {IGNORE_INDEX})")
    pieces = []
    pairs = zip(example["input_ids"], example["labels"])
    for is_trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        pieces.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if is_trained else text)
    return legend + "\n" + "".join(pieces)
