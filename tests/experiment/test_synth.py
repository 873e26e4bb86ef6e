"""The built-in experiment's synthetic data: deterministic, answers right, held-out splits
disjoint from what is trained (inputs, phrasings, and the pretraining wordings)."""

import random
import re

import pytest

from minituner.experiment import domain, synth


@pytest.fixture(scope="module")
def splits():
    return synth.task_splits(n_train=2000, n_eval=20, seed=0)


def check_answer(item: dict) -> None:
    family, key, answer = item["family"], item["key"], item["answer"]
    expected = {
        "reverse": lambda: key[::-1],
        "upper": lambda: key.upper(),
        "count": lambda: str(len(key.split(", "))),
        "add": lambda: str(sum(int(x) for x in key.split("+"))),
        "subtract": lambda: str(int(key.split("-")[0]) - int(key.split("-")[1])),
        "sort": lambda: ", ".join(sorted(key.split(", "))),
        "first": lambda: key.split(", ")[0],
        "last": lambda: key.split(", ")[-1],
        "repeat": lambda: " ".join([key.rsplit("x", 1)[0]] * int(key.rsplit("x", 1)[1])),
        "opposite": lambda: next(w for w in key.split("|") if w not in item["instruction"].split(" ")[-1]),
    }[family]()
    assert answer == expected, item


def test_task_splits_are_deterministic_and_seeded():
    assert synth.task_splits(n_train=50, seed=3) == synth.task_splits(n_train=50, seed=3)
    assert synth.task_splits(n_train=50, seed=3)["train"] != synth.task_splits(n_train=50, seed=4)["train"]


def test_every_family_has_answers_that_check_and_enough_phrasings(splits):
    assert len(synth.FAMILIES) >= 8
    for split in splits.values():
        for item in split:
            check_answer(item)
    for name, family in synth.FAMILIES.items():
        assert len(family.train) >= 3 and len(family.heldout) >= 2, name
        assert {i["family"] for i in splits["train"]} == set(synth.FAMILIES)


def test_held_out_inputs_and_phrasings_never_trained(splits):
    train_keys = {(i["family"], i["key"]) for i in splits["train"]}
    train_texts = {i["instruction"] for i in splits["train"]}
    for split in ("heldout_inputs", "heldout_phrasings"):
        items = splits[split]
        assert items and not train_keys & {(i["family"], i["key"]) for i in items}
        assert not train_texts & {i["instruction"] for i in items}
        inputs = [(i["family"], i["key"], i["answer"]) for i in items]
        assert len(inputs) == len(set(inputs)), f"{split} repeats an input"
    for name, family in synth.FAMILIES.items():  # the wordings of the three uses are disjoint
        assert not set(family.train) & set(family.heldout), name
        assert not set(family.pretrain) & (set(family.train) | set(family.heldout)), name
    # each held-out-phrasing item uses a held-out phrasing, each training item a training one
    validation = {i["instruction"] for i in splits["validation"]}
    assert validation and not validation & train_texts
    assert not {(i["family"], i["key"]) for i in splits["validation"]} - train_keys - {
        (i["family"], i["key"]) for i in splits["validation"]}  # training keys only (checked below)
    assert all(not synth.held_out(i["family"], i["key"]) for i in splits["validation"])
    for split, attr in (("train", "train"), ("validation", "train"), ("heldout_inputs", "train"),
                        ("heldout_phrasings", "heldout")):
        for item in splits[split]:
            patterns = [re.escape(p).replace(r"\{", "{").replace(r"\}", "}") for p in
                        getattr(synth.FAMILIES[item["family"]], attr)]
            patterns = [re.sub(r"\{\w+\}", ".+", p) for p in patterns]
            assert any(re.fullmatch(p, item["instruction"]) for p in patterns), (split, item)


def test_general_corpus_states_operations_but_never_the_instructions(splits):
    docs = synth.general_corpus(2000, seed=0)
    assert docs == synth.general_corpus(2000, seed=0) and docs != synth.general_corpus(2000, seed=1)
    text = "\n".join(docs)
    assert "Question: " in text and " backwards is " in text and " plus " in text
    for item in splits["heldout_phrasings"] + splits["heldout_inputs"][::5]:
        assert item["instruction"] not in text


def test_domain_cloze_wording_is_never_in_the_documents_but_the_fact_is():
    facts = domain.domain_facts(seed=0)
    docs = domain.domain_corpus(facts, seed=0)
    text = " ".join(docs)
    items = domain.cloze_items(facts)
    assert len(items) == len(facts) >= 100
    for fact, item in zip(facts, items):
        assert item["prompt"] not in text, item  # the question's wording is held out for this fact
        stated = [s for s in re.split(r"(?<=\.) ", text) if fact["name"] in s and s.endswith(f" {fact['value']}.")]
        attribute_wordings = domain.DOMAIN_ATTRIBUTES[fact["attribute"]][1]
        n_stated = sum(any(re.fullmatch(re.escape(w.format(n=fact["name"], v=fact["value"])), s)
                           for w in attribute_wordings) for s in stated)
        assert n_stated == domain.DOCS_PER_WORDING * (len(attribute_wordings) - 1), fact  # in every other wording
    names = {f["name"] for f in facts}
    assert not any(name in " ".join(synth.general_corpus(500)) for name in names)  # unknown to the base


def test_training_items_in_fewer_phrasings_and_with_wrong_answers():
    """The data of the diversity and quality rows: as many items, each family in its first P
    phrasings; a share answered with another item's answer of the same family."""
    one = synth.training_items(random.Random(0), 400, phrasings=1)
    assert len(one) == 400 and not any(synth.held_out(i["family"], i["key"]) for i in one)
    for name, family in synth.FAMILIES.items():
        fields = [i for i in one if i["family"] == name]
        assert fields and all(i["instruction"].split()[0] == family.train[0].split()[0] for i in fields)
    right = synth.training_items(random.Random(0), 400)
    wrong = synth.with_wrong_answers(right, 0.3, seed=1)
    changed = [(a, b) for a, b in zip(right, wrong) if a["answer"] != b["answer"]]
    assert len(changed) == 120 and all(a["instruction"] == b["instruction"] for a, b in changed)
    answers = {(i["family"], i["answer"]) for i in right}
    assert all((b["family"], b["answer"]) in answers for _, b in changed)  # a plausible answer of its family
    assert synth.with_wrong_answers(right, 0.0) == right
