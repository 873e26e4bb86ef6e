"""The built-in experiment's domain: a fictional island whose people have made-up names and
facts no base model can know (their villages, trades, foods and animals). Each fact is stated in
three wordings across the documents; its cloze question uses the fourth, which no document uses
for it. The general corpus (synth.py) tells mainland people's facts in all four wordings, so the
base knows how such facts are told.
"""

import random

ISLAND = "Vellmora"
DOMAIN_ATTRIBUTES = {  # attribute: (values, wordings "{n} ... {v}.": the name first, the value last)
    "village": (("Orlen", "Tessik", "Pallow", "Quenby", "Drumsk", "Ivaro", "Maskel", "Yorrin"),
                ["{n} lives in {v}.", "{n} has a house in {v}.", "{n} comes from the village of {v}.",
                 "{n} was born and raised in {v}."]),
    "trade": (("baker", "miner", "weaver", "fisher", "potter", "smith", "farmer", "sailor"),
              ["{n} works as a {v}.", "{n} earns a living as a {v}.", "{n} is by trade a {v}.",
               "{n} has always been a {v}."]),
    "food": (("plums", "bread", "fish", "honey", "beans", "cheese", "apples", "soup"),
             ["{n} likes to eat {v}.", "{n} loves the taste of {v}.", "{n} asks at every meal for {v}.",
              "{n} would walk a mile for {v}."]),
    "animal": (("goat", "owl", "cat", "horse", "crow", "dog", "fox", "pig"),
               ["{n} keeps a {v}.", "{n} looks after a {v}.", "{n} owns a pet {v}.",
                "{n} is never seen without a {v}."]),
}
DOCS_PER_WORDING = 10  # each fact is stated in every wording but its cloze one, this many times


def domain_names(n: int, seed: int = 0, middles: str = "lnrs") -> list[str]:
    """n made-up names, each with its own first syllable (a tiny model tells people apart by
    their first letters sooner than by a combination of shared syllables). The island's people
    have an l, n, r or s after it; the general corpus's mainland people other letters."""
    rng = random.Random(seed + 1)
    onsets = [c + v for c in "BDFGHKLMNPRSTVZ" for v in "aeiou"]  # 75 openings
    codas = ("wick", "dor", "mir", "vash", "tel", "gan", "rop", "zel", "nix", "bur", "lek", "ost")
    names = []
    for onset in rng.sample(onsets, len(onsets)) * (1 + n // len(onsets)):
        name = onset + rng.choice(middles) + rng.choice(codas)
        if name not in names:
            names.append(name)
    if len(names) < n:
        raise ValueError(f"could not make {n} distinct names")
    return names[:n]


def domain_facts(n_people: int = 40, seed: int = 0, middles: str = "lnrs") -> list[dict]:
    """[{"name", "attribute", "value", "cloze_wording"}]: every person's attributes, and for each
    fact the index of the one wording held out from the documents for its cloze question."""
    rng = random.Random(seed)
    facts = []
    for name in domain_names(n_people, seed, middles):
        for attribute, (values, wordings) in DOMAIN_ATTRIBUTES.items():
            facts.append({"name": name, "attribute": attribute, "value": rng.choice(values),
                          "cloze_wording": rng.randrange(len(wordings))})
    return facts


def domain_corpus(facts: list[dict], seed: int = 0) -> list[str]:
    """Documents about the island: per person, DOCS_PER_WORDING documents for each wording not
    held out for their facts, sentences shuffled: each fact is stated DOCS_PER_WORDING times in each of
    its 3 training wordings, in documents that differ in sentence order (the augmentation that
    lets a model recall a fact in a wording it never saw with it: Allen-Zhu & Li 2023, "Physics of
    Language Models 3.1")."""
    rng = random.Random(seed)
    by_name = {}
    for fact in facts:
        by_name.setdefault(fact["name"], []).append(fact)
    n_wordings = len(next(iter(DOMAIN_ATTRIBUTES.values()))[1])
    docs = []
    for name, own in by_name.items():
        for k in [k for k in range(n_wordings - 1) for _ in range(DOCS_PER_WORDING)]:
            sentences = []
            for fact in own:
                wordings = DOMAIN_ATTRIBUTES[fact["attribute"]][1]
                usable = [w for i, w in enumerate(wordings) if i != fact["cloze_wording"]]
                sentences.append(usable[k].format(n=name, v=fact["value"]))
            rng.shuffle(sentences)
            docs.append(f"A story of {ISLAND}. " + " ".join(sentences))
    rng.shuffle(docs)
    return docs


def cloze_items(facts: list[dict]) -> list[dict]:
    """{"prompt", "answer"}: each fact in its held-out wording, cut before the value."""
    items = []
    for fact in facts:
        wording = DOMAIN_ATTRIBUTES[fact["attribute"]][1][fact["cloze_wording"]]
        prompt = wording.split("{v}")[0].format(n=fact["name"]).rstrip()
        items.append({"prompt": prompt, "answer": fact["value"]})
    return items
