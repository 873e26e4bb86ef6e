"""The comparison: every arm trains in its own process, one evaluation suite scores their models,
and comparison.md has one row per claim; run on a cut-down budget (a few steps, 10 items). Its
parts on their own: which arms a row needs, numbers over seeds, the base prompted with examples,
the weight changes."""

import importlib.util
import json
import os
import time

import pytest
import torch

from conftest import FIXTURES, ROOT
from minituner.experiment import builtin, compare, prompting, report, weights
from minituner.hf.folder import load_pretrained, save_pretrained


@pytest.mark.slow
def test_compare_writes_one_row_per_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "compare"
    assert compare.main(["--out", str(out), "--scale", "0.001", "--eval-limit", "4", "--jobs", "2"]) == 0
    text = (out / "comparison.md").read_text()
    for claim in report.ROWS:
        assert f"| ({claim}) " in text
    saved = json.loads((out / "results.json").read_text())
    result, = saved["results"]
    runs, scores = result["runs"], result["scores"]
    assert set(scores) == {"base", *runs} - {"overfit"} and set(runs) == set(compare.arms_for(report.ROWS))
    assert all(set(scores[arm]) > {"heldout_inputs", "cloze", "general_ppl"} for arm in ("base", *compare.SCORED))
    assert set(scores["wrong-30"]) == {"heldout_inputs", "heldout_phrasings"}  # the task variants: exact match
    scored_by_runs = {"exact_match", "cloze", "general_ppl_after"}  # the suite scores, the runs don't
    assert not any(scored_by_runs & set(summary) for summary in runs.values())
    for arm, built_on in {"finetune-instruct": "finetune", "complementary": "finetune-replay"}.items():
        assert json.loads((out / arm / "config.json").read_text())["base"] == str(out / built_on / "model")
    assert runs["instruct-lora"]["trainable_params"] < runs["instruct-full"]["trainable_params"] / 5
    assert runs["finetune-lora"]["trainable_params"] < runs["finetune-replay"]["trainable_params"] / 5
    assert runs["overfit"]["restored_best"] in (True, False)
    # every number of a row is read from the runs and scores
    table = {claim[1]: result for claim, _, result in saved["rows"]}
    assert f"100: {scores['size-100']['heldout_inputs']:.1%}" in table["g"]
    assert f"1: {exact(scores['phrasings-1'])}" in table["j"] and f"30 %: {exact(scores['wrong-30'])}" in table["k"]
    replay = scores["finetune-replay"]
    assert f"replayed {replay['cloze']:.1%}, {replay['general_ppl']:,.2f}" in table["l"]
    both = scores["complementary"]
    assert f"replayed first: {both['cloze']:.1%} cloze, {exact(both)} exact match" in table["m"]
    few = result["prompting"]["pretraining"]["4"]["heldout_inputs"]
    assert f"4: {few['accuracy']:.1%} / " in table["i"]
    assert f"{few['tokens']:,.0f} tokens ({few['shots']:,.1f} fit)" in table["i"]
    assert f"rank {result['weights']['instruct-lora']['rank']:,.1f}" in table["n"]
    assert result["weights"]["instruct-lora"]["rank"] <= builtin.INSTRUCT_OPTIONS["lora_rank"] + 1e-6
    assert result["weights"]["finetune"]["rank"] > builtin.INSTRUCT_OPTIONS["lora_rank"]
    # the arms' data: as many examples as the built-in's, fewer phrasings or wrong answers
    phrased = [json.loads(line) for line in (out / "data" / "train-phrasings-1.jsonl").read_text().splitlines()]
    assert len(phrased) == builtin.INSTRUCT_EXAMPLES and len({r["messages"][0]["content"].split()[0] for r in phrased
                                                              if r["family"] == "add"}) == 1
    plotted = importlib.util.find_spec("matplotlib") is not None
    for png in ("loss_curves.png", "weight_change.png", "forgetting.png"):
        assert (out / png).is_file() == plotted


def exact(scores: dict) -> str:
    """A model's exact match on the held-out inputs / phrasings, as rows print it."""
    return f"{scores['heldout_inputs']:.1%} / {scores['heldout_phrasings']:.1%}"


def test_rows_train_only_the_arms_they_read():
    assert compare.arms_for(["i"]) == ["instruct-lora"]
    assert compare.arms_for(["d"]) == ["overfit"]
    assert compare.arms_for(["h"]) == ["finetune", "instruct-lora", "finetune-instruct"]
    assert compare.arms_for(["j", "k"]) == ["instruct-lora", "phrasings-1", "phrasings-2", "wrong-10", "wrong-30"]
    assert compare.arms_for(["m"]) == ["finetune", "finetune-replay", "finetune-instruct", "complementary"]


def fake_result(seed: int, accuracy: float) -> dict:
    """One seed's results as measure() gives them, for rows (a) and (b)."""
    def scores(accuracy):
        return {"heldout_inputs": accuracy, "heldout_phrasings": accuracy / 2, "cloze": 0.1, "domain_ppl": 3.0,
                "general_ppl": 1.5}
    return {"seed": seed, "runs": {}, "scores": {"base": scores(0.0), "instruct-lora": scores(accuracy)}}


def test_several_seeds_give_the_mean_and_the_range(tmp_path, monkeypatch, capsys):
    accuracies = iter([0.8, 0.9, 0.85])
    folders = []
    monkeypatch.setattr(compare, "write_data", lambda folder, seed: folders.append(folder) or {})
    monkeypatch.setattr(compare, "train_all", lambda folder, arms, data, **k: {})
    monkeypatch.setattr(compare, "measure", lambda folder, arms, rows, data, *, seed, runs, limit:
                        fake_result(seed, next(accuracies)))
    out = tmp_path / "compare"
    assert compare.main(["--out", str(out), "--rows", "a,b", "--seeds", "3"]) == 0
    assert folders == [out / "seed-0", out / "seed-1", out / "seed-2"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in saved["results"]] == [0, 1, 2] and saved["command"].endswith("--rows a,b --seeds 3")
    assert saved["rows"][0][2] == "0.0% → 85.0% (80.0%–90.0%)"
    assert saved["rows"][1][2] == "0.0% → 42.5% (40.0%–45.0%)"
    assert "| instruct-lora | 85.0% (80.0%–90.0%) |" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("flags, message", [(["--rows", "az"], "--rows az: rows are letters"),
                                            (["--jobs", "0"], "--jobs 0: each must be at least 1")])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    assert compare.main(["--out", str(tmp_path / "c"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "c").exists()


def test_effective_rank_counts_the_directions_a_change_uses():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    spread_evenly = q[:, :5] @ q[:, 5:10].T  # five equal singular values
    assert weights.effective_rank(spread_evenly) == pytest.approx(5.0, rel=1e-5)
    assert weights.effective_rank(torch.zeros(8, 8)) == 0.0
    assert 1 < weights.effective_rank(torch.diag(torch.tensor([4.0, 2.0, 1.0]))) < 3


def test_weight_change_of_a_model_is_its_own_difference(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    base = weights.weight_change(FIXTURES / "llama-tiny", FIXTURES / "llama-tiny")
    assert base["relative"] == [0.0] * model.config.n_layers and base["rank"] == 0.0
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(1.5)  # a change of half its size, in one block
    save_pretrained(model, tokenizer, tmp_path / "tuned")
    change = weights.weight_change(FIXTURES / "llama-tiny", tmp_path / "tuned")
    assert change["relative"][0] == 0.0 and 0 < change["relative"][1] < 0.5
    assert change["ranks"]["up_proj"] > 0 and change["ranks"]["q_proj"] == 0.0


def test_few_shot_prompts_leave_out_the_oldest_examples_that_do_not_fit():
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")  # 256 positions, ChatML's tokens
    long = {"family": "f", "instruction": "Say " + "very " * 30 + "long.", "answer": "ok"}
    item = {"family": "f", "instruction": "Say hi.", "answer": "hi"}
    shots = {"f": [long] * 8}
    for wording in prompting.WORDINGS:
        measured = prompting.few_shot(model, tokenizer, [item], shots, wording=wording, template="chatml",
                                      max_new_tokens=16)
        assert 0 < measured["shots"] < 8 and measured["tokens"] <= 256 - 16
        fits = prompting.prompt(tokenizer, item, [long] * int(measured["shots"]), wording, "chatml")
        assert measured["tokens"] == len(fits)


def test_jobs_train_arms_side_by_side_and_an_arm_after_the_one_it_builds_on(tmp_path, monkeypatch):
    spans = {}

    def fake_run(module, out, extra, log, threads=None):
        start = time.perf_counter()
        time.sleep(0.05)
        spans[out.name] = (start, time.perf_counter(), threads)
        return {"arm": out.name}
    monkeypatch.setattr(compare, "run_script", fake_run)
    monkeypatch.setattr(compare, "arm_command", lambda root, arm, data, **k: ("m", root / arm, []))
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 4)
    arms = compare.arms_for(["h", "m"])
    runs = compare.train_all(tmp_path, arms, {}, seed=0, scale=1.0, log=lambda line: None, jobs=2)
    assert list(runs) == arms and all(runs[arm] == {"arm": arm} for arm in arms)
    for arm, built_on in compare.NEEDS.items():
        assert spans[arm][0] >= spans[built_on][1]  # trained from that arm's model
    first, second = spans["finetune"], spans["finetune-replay"]
    assert first[0] < second[1] and second[0] < first[1]  # side by side
    assert {threads for *_, threads in spans.values()} == {"2"}  # 4 cores shared by 2 jobs
