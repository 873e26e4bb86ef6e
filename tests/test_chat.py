"""Talking to a tuned model: generate --chat, streaming, and the interactive chat (minituner/chat.py),
on a tiny model instruction-tuned here in the chatml format."""

import io
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders

from conftest import FIXTURES, sentencepiece_like
from minituner import chat as chat_module
from minituner import generate as generate_module
from minituner.chat import Chat, session
from minituner.detokenize import TextStream, decode_after
from minituner.generate import chat_conversation, chat_format, completions, cut_at_stop, stream_text
from minituner.hf.folder import load_pretrained
from minituner.loss import IGNORE_INDEX
from minituner.recipes import instruct as train_instruct
from minituner.sft import build_example, prompt_ids
from minituner.templates import MODEL
from minituner.tokenizer import Tokenizer

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
    """A training example's ids before its last answer: before the last run of trained tokens."""
    trained = [label != IGNORE_INDEX for label in example["labels"]]
    start = max(i for i in range(len(trained)) if trained[i] and (i == 0 or not trained[i - 1]))
    return example["input_ids"][:start]


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



@pytest.mark.parametrize("template", sorted(p.name for p in (FIXTURES / "chat_templates").iterdir()))
def test_chat_turns_in_a_folders_own_template_are_written_as_training_wrote_them(tmp_path, template):
    """The folder's Jinja template, whatever its generation prompt ends with: a space before the
    answer ("Answer: "), which training tokenises with the answer's first word, stays out."""
    own = tmp_path / "own"
    shutil.copytree(FIXTURES / "llama-tiny", own)
    (own / "chat_template.jinja").write_text((FIXTURES / "chat_templates" / template).read_text())
    _, tokenizer = load_pretrained(own)
    assert chat_format(tokenizer, None) == MODEL
    earlier = [{"role": "user", "content": "Say the number 1."}, {"role": "assistant", "content": "one"}]
    for conversation in (chat_conversation(QUESTION), earlier + chat_conversation(QUESTION)):
        example, _ = build_example(conversation + [{"role": "assistant", "content": "two two"}], tokenizer, MODEL,
                                   max_len=1024)
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


def spm_tokenizer(shakespeare: str, style: str) -> Tokenizer:
    """A SentencePiece-style tokenizer ("▁" for spaces, one before the text) with byte fallback (a
    character outside the vocabulary is written as its UTF-8 bytes, <0xE6><0x97><0xA5>), whose
    decoder drops the text's first space: Metaspace's (Mistral, converted Llama), or Llama 2's."""
    trained = sentencepiece_like(shakespeare, "first" if style == "metaspace" else "prepend")
    spec = json.loads(trained.backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Backend.from_str(json.dumps(spec))
    backend.decoder = (decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(),
                                          decoders.Fuse()]) if style == "metaspace" else
                       decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)]))
    return Tokenizer(backend, bos_id=trained.bos_id, eos_id=trained.eos_id, pad_id=trained.pad_id)


TOKENIZERS = ["llama-tiny", "gpt2-tiny", "qwen2-tiny", "metaspace", "strip"]  # byte-level BPE, SentencePiece-style


def tokenizer_named(name: str, shakespeare: str) -> Tokenizer:
    return spm_tokenizer(shakespeare, name) if name in ("metaspace", "strip") else load_pretrained(FIXTURES / name)[1]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_stream_never_splits_a_character(name, shakespeare):
    tokenizer = tokenizer_named(name, shakespeare)
    text = "naïve café — 日本語で話す 🙂🙂 done, my lord: good  night"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text  # every character is there, through bytes where need be
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > len(text.split())  # it streamed, not all at the end


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_stream_joins_to_the_decoded_text_of_any_ids(name, shakespeare):
    """Random ids, invalid UTF-8 among them (a byte run that never completes is one U+FFFD per
    byte), each after a context of other ids: the pieces join to the text decode_after gives."""
    tokenizer = tokenizer_named(name, shakespeare)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        ids = torch.randint(0, tokenizer.vocab_size, (24,), generator=generator).tolist()
        context, new = ids[:4], ids[4:]
        stream = TextStream(tokenizer, context=context)
        pieces = [stream.push(i) for i in new] + [stream.finish()]
        assert "".join(pieces) == decode_after(tokenizer, context, new)
    byte = tokenizer.token_to_id("<0xC3>")
    if byte is not None:  # "ï" then a stray continuation byte: the valid "ï" must not be released early
        ids = tokenizer.encode("n", add_special_tokens=False) + [byte, tokenizer.token_to_id("<0xAF>"),
                                                                 tokenizer.token_to_id("<0xAF>")]
        stream = TextStream(tokenizer)
        assert "".join([stream.push(i) for i in ids] + [stream.finish()]) == tokenizer.decode(ids)


def test_a_continuation_keeps_the_space_after_its_prompt(shakespeare):
    """A SentencePiece decoder drops a text's first space: the words after "Once upon a" are
    decoded after the prompt's last tokens, streamed or not."""
    tokenizer = spm_tokenizer(shakespeare, "strip")
    ids = tokenizer.encode("Once upon a time there", add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]) == "Once upon a")
    prompt, new = ids[:cut], ids[cut:]
    assert tokenizer.decode(new) == "time there"  # alone, the space is lost
    assert decode_after(tokenizer, prompt[-4:], new) == " time there"
    stream = TextStream(tokenizer, context=prompt[-4:])
    assert "".join([stream.push(i) for i in new] + [stream.finish()]) == " time there"


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
        if len(written) == 1 and len(chat.messages) == 1:  # Ctrl-C once the first reply has begun
            raise KeyboardInterrupt
        written.append(text)
    session(chat, read, write, notes.append)  # returns at Ctrl-D
    assert notes[0] == "(stopped)" and notes[1].startswith("(Ctrl-D")  # a stopped reply, Ctrl-C at the prompt
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == written[0]  # what was printed stays in the conversation

    before = list(chat.messages)  # Ctrl-C before anything is printed: the turn did not happen
    with pytest.raises(KeyboardInterrupt):
        chat.reply("Say the number 3.", lambda text: (_ for _ in ()).throw(KeyboardInterrupt))
    assert chat.messages == before


def test_the_oldest_exchanges_make_way_when_the_context_is_full(loaded):
    model, tokenizer = loaded
    room = model.config.max_seq_len - 60  # leaves 60 tokens of prompt
    chat = Chat(model, tokenizer, "chatml", system="Be brief.", max_new_tokens=room, temperature=0.0, top_k=0,
                top_p=1.0, stop_strings=[])
    history = []  # every exchange, kept here
    for n in range(6):
        history += [{"role": "user", "content": f"Say the number {n % 4}."}]
        chat.reply(history[-1]["content"], lambda text: None)
        history.append(chat.messages[-1])
        kept = chat.conversation()[:-1]  # the prompt of this reply: the system message, the newest messages
        n = len(kept) - 1
        assert kept[0] == {"role": "system", "content": "Be brief."} and kept[1:] == history[-n - 1:-1]
        assert len(prompt_ids(kept, tokenizer, "chatml")) <= 60
        if n < len(history) - 1:  # exchanges were dropped: with one more, it would not have fitted
            one_more = [kept[0], *history[-n - 3:-1]]
            assert len(prompt_ids(one_more, tokenizer, "chatml")) > 60
    assert len(chat.messages) < len(history)
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


def test_a_chat_turn_longer_than_the_context_is_one_line(tuned, capsys):
    assert generate_module.main(["--model", tuned, "--chat", "--prompt", "word " * 60, "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit in the model's context of 256" in err
