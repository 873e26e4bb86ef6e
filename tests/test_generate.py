import pytest
import torch

from conftest import FIXTURES, reference
from minituner.errors import UserError
from minituner.generate import generate, generate_text, main, next_token
from minituner.hf.folder import load_pretrained


@pytest.fixture(scope="module", params=["llama-tiny", "gpt2-tiny", "mistral-tiny"])
def loaded(request):
    return load_pretrained(FIXTURES / request.param)


def prompts():
    ids = reference("llama-tiny")["prompt_ids"][0].tolist()
    return [ids, ids[4:], ids[:2]]


def test_batched_prompts_of_different_lengths_decode_as_alone(loaded):
    model, _ = loaded
    batch = generate(model, prompts(), max_new_tokens=12)
    assert batch == [generate(model, [p], max_new_tokens=12)[0] for p in prompts()]


def test_cache_does_not_change_the_tokens(loaded):
    model, _ = loaded
    assert generate(model, prompts(), max_new_tokens=10) == generate(model, prompts(), max_new_tokens=10, use_cache=False)


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, _ = loaded
    options = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    first = generate(model, prompts(), seed=1, **options)
    assert first == generate(model, prompts(), seed=1, **options)
    assert first != generate(model, prompts(), seed=2, **options)
    assert first != generate(model, prompts(), max_new_tokens=16)  # not greedy


def test_top_k_1_and_tiny_top_p_are_greedy(loaded):
    model, _ = loaded
    greedy = generate(model, prompts(), max_new_tokens=8)
    assert generate(model, prompts(), max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, prompts(), max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_stops_at_a_stop_id_and_keeps_it(loaded):
    model, _ = loaded
    greedy = generate(model, prompts()[:1], max_new_tokens=12)[0]
    stop = greedy[3]
    first = greedy.index(stop)
    assert generate(model, prompts()[:1], max_new_tokens=12, stop_ids=[stop])[0] == greedy[:first + 1]


def test_stop_strings_cut_the_text(loaded):
    model, tokenizer = loaded
    full = generate_text(model, tokenizer, ["The"], max_new_tokens=20, stop_on_eos=False)[0]
    stop = full[5:8]
    cut = generate_text(model, tokenizer, ["The"], max_new_tokens=20, stop_on_eos=False, stop_strings=[stop])[0]
    assert cut == full.split(stop, 1)[0]


def test_nucleus_never_samples_outside_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    seen = {next_token(logits, 1.0, 0, 0.7, generator).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are outside the nucleus
    seen = {next_token(logits, 1.0, 3, 1.0, generator).item() for _ in range(300)}
    assert seen == {0, 1, 2}


def test_learned_positions_limit_is_a_clear_error():
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")  # 128 positions
    with pytest.raises(UserError, match=r"exceeds the model's 128 learned positions"):
        generate(model, [[5] * 100], max_new_tokens=50)


def test_cli_generates(capsys):
    assert main(["--model", str(FIXTURES / "llama-tiny"), "--prompt", "Hello", "--prompt", "The cat",
                 "--max-new-tokens", "5", "--temperature", "0.7", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and "\nThe cat" in out


def test_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such model folder" in err


def test_cli_rejects_an_unknown_device_in_one_line(capsys):
    assert main(["--model", str(FIXTURES / "llama-tiny"), "--prompt", "hi", "--device", "tpu9"]) == 2
    assert capsys.readouterr().err == "error: --device tpu9: not a device; use auto, cpu, cuda or cuda:N\n"


def test_cli_rejects_an_empty_stop_string(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(FIXTURES / "llama-tiny"), "--prompt", "hi", "--stop", ""])
    assert exit_info.value.code == 2 and "--stop needs a non-empty string" in capsys.readouterr().err


def test_decoding_waits_for_the_device_once_per_token(loaded, monkeypatch):
    """Reading a tensor on the host (.item(), .tolist(), bool()) waits for the GPU; per-row reads
    made decoding latency-bound. One read per token (is every row done?) and two at the end."""
    model, _ = loaded
    batch, reads = prompts(), []
    for name in ("item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: (reads.append(_name),
                                                                                           _real(self, *a))[1])
    out = generate(model, batch, max_new_tokens=10, stop_ids=[-1])  # no stop: every step decodes
    assert [len(row) for row in out] == [10, 10, 10]
    assert len(reads) <= 10 + 2, reads


@pytest.mark.parametrize("flags", [["--prompt", "The cat", "--prompt", "Hello"],
                                   ["--prompt", "Once", "--prompt", "The dog", "--temperature", "0.8", "--top-k", "40",
                                    "--seed", "2"]])
def test_cli_stream_prints_what_generation_at_once_prints(capsys, flags):
    """Each prompt is decoded on its own from a generator seeded with --seed, streamed or not, so
    a sampled prompt draws the same tokens either way."""
    argv = ["--model", str(FIXTURES / "llama-tiny"), "--max-new-tokens", "12", *flags]
    assert main(argv) == 0
    at_once = capsys.readouterr().out
    assert main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == at_once and at_once.startswith(flags[1])


def test_cli_chat_flags_need_chat(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(FIXTURES / "llama-tiny"), "--prompt", "hi", "--system", "Be brief."])
    assert exit_info.value.code == 2 and "add --chat" in capsys.readouterr().err
