"""Talking to a tuned model: generate --chat, streaming, and the interactive chat (minituner/chat.py),
on a tiny model instruction-tuned here in the chatml format."""

import io
import json
import shutil

import pytest
import torch
from tokenizers import decoders

from conftest import FIXTURES, sentencepiece_like
from minituner import chat as chat_module
from minituner import generate as generate_module
from minituner.chat import Chat, session
from minituner.generate import TextStream, chat_conversation, chat_format, completions, cut_at_stop, stream_text
from minituner.hf.folder import load_pretrained
from minituner.loss import IGNORE_INDEX
from minituner.recipes import instruct as train_instruct
from minituner.sft import build_example, prompt_ids
from minituner.templates import MODEL

QUESTION = "Say the number 2."


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> str:
    """RUN/model of a short LoRA run on llama-tiny: it answers "n n n" and ends its turn."""
    folder = tmp_path_factory.mktemp("chat")
    records = [{"instruction": f"Say the number {n % 4}.", "input": "", "output": f"{n % 4} {n % 4} {n % 4}"}
               for n in range(24)]
    (folder / "data.json").write_text(json.dumps(records))
    assert train_instruct.main(["--base", str(FIXTURES / "llama-tiny"), "--data", str(folder / "data.json"),
                                "--out", str(folder / "run"), "--template", "chatml", "--batch-size", "4",
                                "--lr", "3e-3", "--max-len", "128", "--steps", "24", "--samples", "0",
                                "--export", "merged", "--no-progress"]) == 0
    return str(folder / "run" / "model")


@pytest.fixture(scope="module")
def loaded(tuned):
    return load_pretrained(tuned)


def prompt_part(example: dict) -> list[int]:
    """A training example's ids before its first trained token."""
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:first]


def test_chat_turns_are_written_as_training_wrote_them(loaded, tmp_path):
    """--chat renders the prompt part of the training examples id for id: the exported model's
    template (chatml, named by the export) and, for a folder with its own Jinja template, that."""
    model, tokenizer = loaded
    assert chat_format(tokenizer, None) == "chatml"
    for system in (None, "Answer briefly."):
        conversation = chat_conversation(QUESTION, system)
        example, _ = build_example(conversation + [{"role": "assistant", "content": "2 2 2"}], tokenizer, "chatml",
                                   max_len=128)
        assert prompt_ids(conversation, tokenizer, "chatml") == prompt_part(example)

    own = tmp_path / "own"
    shutil.copytree(FIXTURES / "llama-tiny", own)
    (own / "chat_template.jinja").write_text((FIXTURES / "chat_templates" / "chatml-tools.jinja").read_text())
    _, tokenizer = load_pretrained(own)
    assert chat_format(tokenizer, None) == MODEL
    conversation = chat_conversation(QUESTION)
    example, _ = build_example(conversation + [{"role": "assistant", "content": "2 2 2"}], tokenizer, MODEL,
                               max_len=128)
    assert prompt_ids(conversation, tokenizer, MODEL) == prompt_part(example)


def test_generate_chat_prints_only_the_reply_which_ends_at_the_end_of_turn_token(tuned, loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    calls = []
    real = generate_module.generate

    def spy(model, prompts, **options):
        calls.append((prompts, real(model, prompts, **options)))
        return calls[-1][1]
    monkeypatch.setattr(generate_module, "generate", spy)
    assert generate_module.main(["--model", tuned, "--chat", "--prompt", QUESTION, "--system", "Be brief."]) == 0
    (prompts, outputs), = calls
    assert prompts == [prompt_ids(chat_conversation(QUESTION, "Be brief."), tokenizer, "chatml")]
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert outputs[0][-1] == im_end and len(outputs[0]) < 64  # it stopped at the end of its turn
    reply = tokenizer.decode(outputs[0][:-1])
    assert reply.strip() and capsys.readouterr().out == reply + "\n"


@pytest.mark.parametrize("fixture", ["llama-tiny", "gpt2-tiny", "qwen2-tiny"])
def test_streamed_text_is_the_text_generated_at_once(fixture):
    """Sampled with a seed, byte-level (gpt2, qwen2) and SentencePiece (llama) tokenizers, with and
    without a stop string: the pieces join to completions()' text."""
    model, tokenizer = load_pretrained(FIXTURES / fixture)
    prompt = tokenizer.encode("The weather in Zürich")
    options = dict(max_new_tokens=40, temperature=1.0, top_k=0, seed=3)
    whole = completions(model, tokenizer, [prompt], stop_ids=tokenizer.stop_ids, **options)[0]
    assert "".join(stream_text(model, tokenizer, prompt, stop_ids=tokenizer.stop_ids, **options)) == whole
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = completions(model, tokenizer, [prompt], stop_strings=[stop], **options)[0]
    pieces = list(stream_text(model, tokenizer, prompt, stop_strings=[stop], **options))
    assert "".join(pieces) == cut == cut_at_stop(whole, [stop]) and len(pieces) > 1


def spm_tokenizer(shakespeare: str, style: str):
    """A SentencePiece-style tokenizer ("▁" for spaces, one before the text) whose decoder drops
    the text's first space: Metaspace's (Mistral, converted Llama), or Llama 2's Strip."""
    tokenizer = sentencepiece_like(shakespeare, "first" if style == "metaspace" else "prepend")
    tokenizer.backend.decoder = (decoders.Metaspace(prepend_scheme="first") if style == "metaspace" else
                                 decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]))
    return tokenizer


@pytest.mark.parametrize("fixture", ["llama-tiny", "gpt2-tiny", "qwen2-tiny", "metaspace", "strip"])
def test_text_stream_never_splits_a_character(fixture, shakespeare):
    if fixture in ("metaspace", "strip"):
        tokenizer = spm_tokenizer(shakespeare, fixture)
    else:
        _, tokenizer = load_pretrained(FIXTURES / fixture)
    text = "naïve café — 日本語で話す 🙂🙂 done, my lord: good  night"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > len(text.split())  # it streamed, not all at the end


def test_text_stream_holds_back_what_may_start_a_stop_string():
    _, tokenizer = load_pretrained(FIXTURES / "gpt2-tiny")
    ids = tokenizer.encode("one two three STOPPED four", add_special_tokens=False)
    stream = TextStream(tokenizer, stop_strings=["STOP", "thr33"])
    sent = ""
    for i in ids:
        sent += stream.push(i)
        assert "STO" not in sent and "thr3" not in sent
    sent += stream.finish()
    assert sent == "one two three " and stream.stopped


def run_chat(tuned, monkeypatch, lines: str, *flags) -> tuple[int, list, list]:
    """chat.main on `lines` as stdin: its exit status, and for each reply its prompt, the generator's
    state before it, its decoding options and its streamed text."""
    calls = []
    real = chat_module.stream_text

    def spy(model, tokenizer, prompt, *, generator, **options):
        calls.append([prompt, generator.get_state(), options, ""])
        for piece in real(model, tokenizer, prompt, generator=generator, **options):
            calls[-1][3] += piece
            yield piece
    monkeypatch.setattr(chat_module, "stream_text", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return chat_module.main(["--model", tuned, *flags]), calls


def test_chat_through_stdin_two_turns_reset_and_exit(tuned, loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    lines = f"{QUESTION}\nSay the number 3.\n/reset\n/system Be brief.\nSay the number 1.\n/exit\n{QUESTION}\n"
    status, calls = run_chat(tuned, monkeypatch, lines, "--temperature", "0.9", "--top-p", "0.95", "--seed", "7")
    assert status == 0 and len(calls) == 3  # nothing is read after /exit
    replies = [text for _, _, _, text in calls]
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in replies)
    first, second, third = (prompt for prompt, _, _, _ in calls)
    turn = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "Say the number 3."}]
    assert first == prompt_ids(turn[:1], tokenizer, "chatml") and second == prompt_ids(turn, tokenizer, "chatml")
    assert third == prompt_ids(chat_conversation("Say the number 1.", "Be brief."), tokenizer, "chatml")  # /reset
    for prompt, state, options, reply in calls:  # streamed = generated at once, from the same draws
        generator = torch.Generator().set_state(state)
        assert options["max_new_tokens"] == 128 and options["stop_ids"] == [0, 2]  # half of 256 positions; chatml
        assert reply == completions(model, tokenizer, [prompt], generator=generator, **options)[0]
    # the first reply is generate --chat's with the same flags
    assert generate_module.main(["--model", tuned, "--chat", "--prompt", QUESTION, "--temperature", "0.9",
                                 "--top-p", "0.95", "--seed", "7", "--max-new-tokens", "128"]) == 0
    assert capsys.readouterr().out == replies[0] + "\n"


def test_ctrl_c_stops_the_reply_not_the_chat(loaded):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer, "chatml", max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, stop_strings=[])
    inputs = iter([QUESTION, KeyboardInterrupt, "Say the number 1.", EOFError])
    notes, written = [], []

    def read():
        item = next(inputs)
        if isinstance(item, type):
            raise item()
        return item

    def write(text):
        written.append(text)
        if len(written) == 2 and len(chat.messages) == 1:  # Ctrl-C once the first reply has begun
            raise KeyboardInterrupt
    session(chat, read, write, notes.append)
    assert notes[0] == "(stopped)" and notes[1].startswith("(Ctrl-D")  # a stopped reply, Ctrl-C at the prompt
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == "".join(written[:2])  # what was printed stays in the conversation
    assert written[-1] == "\n"  # Ctrl-D ended it


def test_the_oldest_exchanges_make_way_when_the_context_is_full(loaded):
    model, tokenizer = loaded
    room = model.config.max_seq_len - 60  # leaves 60 tokens of prompt
    chat = Chat(model, tokenizer, "chatml", system="Be brief.", max_new_tokens=room, temperature=0.0, top_k=0,
                top_p=1.0, stop_strings=[])
    for n in range(6):
        chat.reply(f"Say the number {n % 4}.", lambda text: None)
        assert len(prompt_ids(chat.conversation()[:-1], tokenizer, "chatml")) <= 60
    assert chat.conversation()[0] == {"role": "system", "content": "Be brief."}
    assert len(chat.messages) < 12 and chat.messages[-2]["content"] == "Say the number 1."
    before = list(chat.messages)
    with pytest.raises(Exception, match="does not fit"):
        chat.reply("word " * 80, lambda text: None)
    assert chat.messages == before


@pytest.mark.parametrize("untuned, prompt, flags, message", [
    (True, QUESTION, [], "no chat template"),
    (False, QUESTION, ["--template", "vicuna"], 'template "vicuna" is not one of'),
    (False, "  ", [], "an empty chat turn"),
])
def test_bad_chat_input_is_one_line(tuned, capsys, untuned, prompt, flags, message):
    model = str(FIXTURES / "llama-tiny") if untuned else tuned
    assert generate_module.main(["--model", model, "--chat", "--prompt", prompt, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_chat_on_a_folder_without_a_template_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert chat_module.main(["--model", str(FIXTURES / "llama-tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chat template" in err and "--template" in err
