"""The built-in experiment's data: deterministic synthetic text whose answers can be checked
exactly, generated on the fly from a seed (no download).

Three sets, each with the role it plays for a real model:
  general   simple English-like prose in which words, numbers and operations appear as
            statements ("Written backwards, lamp becomes pmal.", "7 plus 5 is 12.", "The
            opposite of cold is hot."), questions with their answers (in wordings of their
            own), little stories, and short biographies of made-up mainland people. It is what
            the shipped base model was pretrained on: it knows the operations, but has never
            seen an instruction or a chat turn.
  tasks     instructions with exactly checkable answers, in FAMILIES (reverse, upper-case,
            count, add, subtract, sort, first, last, repeat, opposite), each with training and
            held-out phrasings. An input is held out by its key (the word, the word and count,
            the pair of numbers, the list; for sort the set of words, for opposite the pair), so
            no held-out input is ever an instruction in training. Splits: train, validation (training keys, other items),
            held-out inputs in the training phrasings, held-out inputs in held-out phrasings.
  domain    documents about a fictional island and cloze questions on its facts: domain.py.

Why this design lets a tiny model learn (see minituner/experiment/README.md):
  - The tokenizer is byte-level with no merges (vocabulary 256 bytes + 3 special tokens), so
    reversing, upper-casing and counting are operations on visible tokens; with BPE, "lamp" is
    one token and its letters are hidden from a 1.8 M-parameter model.
  - Pretraining states every operation, and asks about it, so instruction tuning only has to
    teach the format (answer after the assistant header, then stop), which a small LoRA learns
    in minutes; an unseen phrasing reuses words the model met in pretraining.
  - Pretraining biographies tell facts about people in all four wordings, so the base knows how
    such facts are told; fine-tuning then has to store the island's facts, and the documents
    repeat each in shuffled company, which lets a model recall a fact in a wording it never saw
    with it.
"""

import hashlib
import random
from typing import Callable, NamedTuple

from minituner.experiment.domain import DOMAIN_ATTRIBUTES, domain_facts

# ----------------------------------------------------------------------------- vocabulary
WORDS = tuple("""
ant apple arm baby bag ball band bank bed bell bird boat body bone book boot bowl box bread
brick bus cake camp car card cat chair chalk cloud coat corn cow cup desk dog door dress drum
duck egg farm fish flag foot fork frog game gate girl glass goat gold grape hand hat hill
horse house jam key kite lamp leaf lion milk moon mouse nest net nose nut oak pan pear pen
pig pin plate pond rain ring road rock roof rope salt sand seed ship shoe shop sock star
stick stone sun table tent toy tree truck van wall wave wind wolf wood yard
""".split())
OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
             ("wet", "dry"), ("dark", "light"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
             ("long", "short"), ("open", "closed"), ("loud", "quiet"), ("rich", "poor"), ("thick", "thin"),
             ("early", "late"), ("happy", "sad"), ("clean", "dirty"), ("near", "far"), ("strong", "weak"),
             ("heavy", "airy"), ("left", "right"), ("day", "night"), ("in", "out"), ("win", "lose"),
             ("buy", "sell"), ("push", "pull"), ("give", "take"), ("first", "last"), ("black", "white"),
             ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"), ("brave", "afraid"), ("true", "false"),
             ("top", "bottom"), ("inside", "outside"), ("start", "finish"), ("before", "after"), ("yes", "no"))
COLORS = ("red", "blue", "green", "yellow", "brown", "gray", "pink", "white")
ADJECTIVES = ("little", "old", "red", "happy", "big", "quiet", "green", "small", "tall", "lazy")
VERBS = ("saw", "found", "liked", "painted", "carried", "lost", "washed", "moved", "kept", "counted")
PLACES = ("near the river", "in the garden", "on the hill", "by the road", "at the farm", "in the town")
NAMES = ("Tom", "Ann", "Sam", "Lucy", "Ben", "Mia", "Max", "Ella", "Leo", "Zoe")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_NUMBER = 12  # operands of add and subtract: 0..12 (tables a tiny model learns in pretraining)


def _items(rng: random.Random, low: int = 2, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _listed(items) -> str:
    return ", ".join(items)


# ----------------------------------------------------------------------------- task families
class Family(NamedTuple):
    """A task: `draw(rng)` gives (key, fields, answer); the key decides the held-out split, the
    fields fill the wordings, the answer is plain text compared exactly. Instruction tuning sees
    `train` phrasings; `heldout` phrasings are only evaluated; `pretrain` wordings ask the same
    question in the general corpus (a base model meets questions and answers in its text, in
    wordings that are neither of the other two)."""
    draw: Callable
    train: list[str]
    heldout: list[str]
    pretrain: list[str]



def _reverse(rng):
    w = rng.choice(WORDS)
    return w, {"w": w}, w[::-1]


def _upper(rng):
    w = rng.choice(WORDS)
    return w, {"w": w}, w.upper()


def _count(rng):
    items = _items(rng, 2, 7)
    return _listed(items), {"items": _listed(items)}, str(len(items))


def _add(rng):
    a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
    return f"{a}+{b}", {"a": a, "b": b}, str(a + b)


def _subtract(rng):
    a, b = sorted((rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)), reverse=True)
    return f"{a}-{b}", {"a": a, "b": b}, str(a - b)


def _sort(rng):
    items = _items(rng, 3, 4)  # the key is the sorted list: every order of it is held out, or none
    return _listed(sorted(items)), {"items": _listed(items)}, _listed(sorted(items))


def _first(rng):
    items = _items(rng, 2, 6)
    return _listed(items), {"items": _listed(items)}, items[0]


def _last(rng):
    items = _items(rng, 2, 6)
    return _listed(items), {"items": _listed(items)}, items[-1]


def _repeat(rng):
    w, n = rng.choice(WORDS), rng.randint(2, 4)
    return f"{w}x{n}", {"w": w, "n": n, "n_word": NUMBER_WORDS[n]}, " ".join([w] * n)


def _opposite(rng):
    pair = rng.choice(OPPOSITES)  # the key is the pair: both directions are held out, or neither
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return "|".join(sorted(pair)), {"w": a}, b


FAMILIES = {  # name: Family(draw, training phrasings, held-out phrasings, pretraining wordings)
    "reverse": Family(
        _reverse,
        ["Reverse the word {w}.", "Write {w} backwards.",
         "What is {w} spelled backwards?", "Spell the word {w} in reverse."],
        ["Give me the word {w} reversed.", "How is {w} written backwards?"],
        ["How do you spell {w} backwards?", "What is {w} in reverse?"]),
    "upper": Family(
        _upper,
        ["Write {w} in capital letters.", "Convert {w} to upper case.",
         "Uppercase this word: {w}", "What is {w} in capitals?"],
        ["Spell {w} with all capital letters.", "Turn the word {w} into upper case."],
        ["How do you write {w} in capitals?", "What is {w} in upper case?"]),
    "count": Family(
        _count,
        ["How many words are in this list: {items}?", "Count the items: {items}.",
         "Count the words in the list {items}.", "What is the number of items in {items}?"],
        ["Tell me how many words this list has: {items}", "Give the count of the words {items}."],
        ["How many words does {items} have?", "How many items are there in {items}?"]),
    "add": Family(
        _add,
        ["What is {a} plus {b}?", "Add {a} and {b}.",
         "Compute {a} + {b}.", "Find the sum of {a} and {b}."],
        ["Tell me the sum of {a} and {b}.", "What do you get if you add {b} to {a}?"],
        ["How much is {a} plus {b}?", "What is the sum of {a} and {b}?"]),
    "subtract": Family(
        _subtract,
        ["What is {a} minus {b}?", "Subtract {b} from {a}.",
         "Compute {a} - {b}.", "Find the difference of {a} and {b}."],
        ["Take {b} away from {a}. What is left?", "Tell me what {a} minus {b} is."],
        ["How much is {a} minus {b}?", "What is {b} less than {a}?"]),
    "sort": Family(
        _sort,
        ["Sort these words: {items}.", "Put {items} in alphabetical order.",
         "Arrange the words {items} from A to Z.", "Sort the list {items} alphabetically."],
        ["Give me {items} sorted.", "What is the alphabetical order of {items}?"],
        ["How do you sort {items}?", "What is {items} in alphabetical order?"]),
    "first": Family(
        _first,
        ["What is the first item in {items}?", "Name the first word of the list {items}.",
         "Which word comes first in {items}?", "Give the first item: {items}."],
        ["Tell me the word at the start of {items}.", "Which item is first in the list {items}?"],
        ["Which item starts the list {items}?", "What comes first in {items}?"]),
    "last": Family(
        _last,
        ["What is the last item in {items}?", "Name the last word of the list {items}.",
         "Which word comes last in {items}?", "Give the last item: {items}."],
        ["Tell me the word at the end of {items}.", "Which item is last in the list {items}?"],
        ["Which item ends the list {items}?", "What comes last in {items}?"]),
    "repeat": Family(
        _repeat,
        ["Repeat the word {w} {n} times.", "Say {w} {n} times.",
         "Write {w} {n_word} times.", "Repeat {w}, {n} times."],
        ["Write the word {w} {n} times in a row.", "Give me {w} repeated {n_word} times."],
        ["What is {w} said {n} times?", "How do you say {w} {n_word} times?"]),
    "opposite": Family(
        _opposite,
        ["What is the opposite of {w}?", "Give the opposite of the word {w}.",
         "Name the opposite of {w}.", "What word means the opposite of {w}?"],
        ["Tell me the opposite of {w}.", "Which word is the opposite of {w}?"],
        ["What is the opposite of the word {w}?", "Which word is opposite to {w}?"]),
}
HELD_OUT_SHARE = 0.2  # of each family's inputs (by key), never an instruction in training


def held_out(family: str, key: str) -> bool:
    """Whether an input is held out: a hash of (family, key), the same for every seed and run."""
    digest = hashlib.sha256(f"{family}|{key}".encode()).digest()
    return digest[0] < 256 * HELD_OUT_SHARE


def task_splits(n_train: int = 4000, n_eval: int = 20, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "validation", "heldout_inputs", "heldout_phrasings"}: lists of {"family", "key",
    "instruction", "answer"}.

    train: n_train examples (families in turn) with training inputs and phrasings.
    validation: n_eval // 2 per family like train, but none of train's instructions (for the
      validation loss and early stopping, so that the held-out sets are only ever scored).
    heldout_inputs: n_eval per family, held-out inputs in the training phrasings.
    heldout_phrasings: n_eval per family, held-out inputs in the held-out phrasings.
    Within a held-out set each input appears once (a family with fewer held-out inputs gives fewer items)."""
    rng = random.Random(seed)
    splits = {"train": training_items(rng, n_train), "validation": [], "heldout_inputs": [], "heldout_phrasings": []}
    trained = {item["instruction"] for item in splits["train"]}
    for name, family in FAMILIES.items():
        for j in range(n_eval // 2):
            phrasing = family.train[j % len(family.train)]
            drawn = _draw(family, rng, lambda k, f, a: not held_out(name, k) and phrasing.format(**f) not in trained)
            if drawn:
                splits["validation"].append(_item(name, drawn[0], phrasing, drawn[1], drawn[2]))
        for split, phrasings in (("heldout_inputs", family.train), ("heldout_phrasings", family.heldout)):
            seen = set()
            for j in range(n_eval):
                drawn = _draw(family, rng, lambda k, f, a: held_out(name, k) and (k, a) not in seen)
                if drawn is None:
                    break  # the family has fewer held-out inputs than n_eval
                seen.add((drawn[0], drawn[2]))
                splits[split].append(_item(name, drawn[0], phrasings[j % len(phrasings)], drawn[1], drawn[2]))
    return splits


def training_items(rng: random.Random, n: int, phrasings: int | None = None) -> list[dict]:
    """n training items, the families in turn, inputs never held out; each in one of the family's
    first `phrasings` training phrasings (None: all of them)."""
    names, items = list(FAMILIES), []
    for i in range(n):
        name = names[i % len(names)]
        key, fields, answer = _draw(FAMILIES[name], rng, lambda k, f, a: not held_out(name, k))
        items.append(_item(name, key, rng.choice(FAMILIES[name].train[:phrasings]), fields, answer))
    return items


def with_wrong_answers(items: list[dict], share: float, seed: int = 0) -> list[dict]:
    """`items` with round(share * len) of them, chosen at random, answered wrongly: with the answer
    of another item of the same family (a plausible answer, not noise)."""
    rng = random.Random(seed)
    out = [dict(item) for item in items]
    answers: dict[str, list[str]] = {}
    for item in items:
        answers.setdefault(item["family"], []).append(item["answer"])
    for i in rng.sample(range(len(out)), round(share * len(out))):
        others = [a for a in answers[out[i]["family"]] if a != out[i]["answer"]]
        out[i]["answer"] = rng.choice(others)
    return out


def _draw(family: Family, rng: random.Random, accept, tries: int = 10_000) -> tuple | None:
    """A (key, fields, answer) of the family that accept(key, fields, answer) takes, or None."""
    for _ in range(tries):
        drawn = family.draw(rng)
        if accept(*drawn):
            return drawn
    return None


def _item(family: str, key: str, phrasing: str, fields: dict, answer: str) -> dict:
    return {"family": family, "key": key, "instruction": phrasing.format(**fields), "answer": answer}


def as_messages(item: dict) -> dict:
    """A task item as a chat record (the `messages` format of minituner/formats.py)."""
    messages = [{"role": "user", "content": item["instruction"]}, {"role": "assistant", "content": item["answer"]}]
    return {"messages": messages, "family": item["family"], "key": item["key"]}


# ----------------------------------------------------------------------------- general corpus
# How often each kind of sentence comes: the operations a small model learns slowest come more
# often (arithmetic three times, reversing, sorting and finding the first item twice). 10: a little story. 11: a
# question and its answer, asked in one of the family's pretraining wordings.
STATEMENT_KINDS = (0, 0, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8, 9, 10, 11, 11, 11, 11)


def _statement(rng: random.Random) -> str:
    """One sentence stating an operation, a fact or a little story, in one of several wordings."""
    kind = rng.choice(STATEMENT_KINDS)
    w = rng.choice(WORDS)
    if kind == 0:
        return rng.choice(["If you reverse the word {w}, you get {r}.", "The word {w} spelled backwards is {r}.",
                           "Written backwards, {w} becomes {r}.", "{W}, reversed, reads {r}.",
                           "Spell {w} in reverse and you have {r}."]).format(w=w, W=w.capitalize(), r=w[::-1])
    if kind == 1:
        return rng.choice(["In capital letters, {w} is {u}.", "The word {w} in upper case is {u}.",
                           "Write {w} with capitals and you get {u}.", "{W} in uppercase is {u}."]
                          ).format(w=w, W=w.capitalize(), u=w.upper())
    if kind == 2:
        items = _items(rng, 2, 7)
        n = len(items)
        return rng.choice(["The list {l} has {n} words.", "There are {n} items in {l}.",
                           "Count the words {l} and you get {n}.", "The number of items in {l} is {n}."]
                          ).format(l=_listed(items), n=n)
    if kind == 3:
        a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
        return rng.choice(["{a} plus {b} is {s}.", "The sum of {a} and {b} is {s}.",
                           "If you add {a} and {b}, you get {s}.", "{a} + {b} = {s}."]).format(a=a, b=b, s=a + b)
    if kind == 4:
        a, b = sorted((rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)), reverse=True)
        return rng.choice(["{a} minus {b} is {d}.", "The difference of {a} and {b} is {d}.",
                           "Take {b} away from {a} and {d} is left.", "{a} - {b} = {d}."]).format(a=a, b=b, d=a - b)
    if kind == 5:
        items = _items(rng, 3, 4)
        return rng.choice(["In alphabetical order, {l} becomes {s}.", "Sorted from A to Z, {l} reads {s}.",
                           "The words {l}, sorted, are {s}."]).format(l=_listed(items), s=_listed(sorted(items)))
    if kind == 6:
        items = _items(rng, 2, 6)
        return rng.choice(["The first item in {l} is {f}.", "In the list {l}, the first word is {f}.",
                           "{l}: it starts with {f}."]).format(l=_listed(items), f=items[0])
    if kind == 7:
        items = _items(rng, 2, 6)
        return rng.choice(["The last item in {l} is {f}.", "In the list {l}, the last word is {f}.",
                           "{l}: it ends with {f}."]).format(l=_listed(items), f=items[-1])
    if kind == 8:
        n = rng.randint(2, 4)
        return rng.choice(["Said {n} times, {w} is {r}.", "The word {w} repeated {nw} times is {r}.",
                           "Repeat {w} {n} times: {r}."]).format(w=w, n=n, nw=NUMBER_WORDS[n], r=" ".join([w] * n))
    if kind == 9:
        a, b = rng.choice(OPPOSITES)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return rng.choice(["The opposite of {a} is {b}.", "{A} is the opposite of {b}.",
                           "What is not {a} is {b}."]).format(a=a, A=a.capitalize(), b=b)
    if kind == 11:
        family = rng.choice(list(FAMILIES))
        draw, _, _, wordings = FAMILIES[family]
        _, fields, answer = draw(rng)
        return f"Question: {rng.choice(wordings).format(**fields)} Answer: {answer}."
    return _story_sentence(rng, w)


def _story_sentence(rng: random.Random, w: str) -> str:
    name, other = rng.sample(WORDS, 2)[0], rng.choice(WORDS)
    person = rng.choice(NAMES)
    return rng.choice([f"{person} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {w} {rng.choice(PLACES)}.",
                       f"The {w} was {rng.choice(COLORS)} and the {other} was {rng.choice(COLORS)}.",
                       f"{person} had {rng.randint(2, 9)} {w}s and a {rng.choice(ADJECTIVES)} {name}.",
                       f"One day {person} went {rng.choice(PLACES)} with a {w}."])


MAINLAND_PEOPLE = 300  # people of the general corpus's biographies
BIOGRAPHY_SHARE = 0.2  # of its documents


def general_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """n_docs documents: mostly 4 to 9 sentences of statements and questions, and (a fifth)
    short biographies of mainland people, who have the attributes the island's people have, in
    the same wordings. Pretraining on them teaches how such facts are told and asked for, not
    any fact about the island (its people are other people)."""
    rng = random.Random(seed)
    people = domain_facts(MAINLAND_PEOPLE, seed=seed, middles="mkt")
    by_name = {}
    for fact in people:
        by_name.setdefault(fact["name"], []).append(fact)
    names = sorted(by_name)
    docs = []
    for _ in range(n_docs):
        if rng.random() < BIOGRAPHY_SHARE:
            own = by_name[rng.choice(names)]
            sentences = [rng.choice(DOMAIN_ATTRIBUTES[f["attribute"]][1]).format(n=f["name"], v=f["value"])
                         for f in own]
            rng.shuffle(sentences)
            docs.append("A story of the mainland. " + " ".join(sentences))
        else:
            docs.append(" ".join(_statement(rng) for _ in range(rng.randint(4, 9))))
    return docs
