import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CHECKPOINTS, FIXTURES, reference
from minituner.config import ModelConfig
from minituner.errors import UserError
from minituner.generate import generate
from minituner.hf import folder as hf_folder
from minituner.hf.folder import load_pretrained, save_pretrained
from minituner.hf.tokenizer import load_tokenizer
from minituner.model import Transformer
from minituner.tokenizer import Tokenizer


def copy_fixture(tmp_path, name="llama-tiny"):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def assert_same_model(a: Transformer, b: Transformer, input_ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(input_ids), b(input_ids))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_save_load_round_trip_is_exact(tmp_path, name):
    model, tokenizer = load_pretrained(FIXTURES / name)
    save_pretrained(model, tokenizer, tmp_path / "out")
    again, tok_again = load_pretrained(tmp_path / "out")
    assert again.config == model.config
    assert_same_model(model, again, reference(name)["input_ids"])
    assert tok_again.encode("some text") == tokenizer.encode("some text")


def test_saved_files_use_transformers_names_and_layout(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "gpt2-tiny")
    save_pretrained(model, tokenizer, tmp_path / "gpt2")
    original = load_file(FIXTURES / "gpt2-tiny" / "model.safetensors")
    saved = load_file(tmp_path / "gpt2" / "model.safetensors")
    assert set(saved) == {f"transformer.{k}" for k in original}
    assert all(torch.equal(saved[f"transformer.{k}"], original[k]) for k in original)  # Conv1D layout, fused c_attn
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["tie_word_embeddings"] is True

    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    save_pretrained(model, tokenizer, tmp_path / "llama")
    assert load_file(tmp_path / "llama" / "model.safetensors").keys() == load_file(FIXTURES / "llama-tiny" / "model.safetensors").keys()
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"


def test_tied_checkpoint_has_no_lm_head_tensor(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "qwen2-tiny")
    save_pretrained(model, tokenizer, tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    again, _ = load_pretrained(tmp_path / "out")
    assert again.lm_head.weight is again.embed_tokens.weight


def test_sharded_checkpoints_are_written_and_read(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    save_pretrained(model, tokenizer, tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    again, _ = load_pretrained(tmp_path / "out")
    assert_same_model(model, again, reference("llama-tiny")["input_ids"])


@pytest.mark.parametrize("name, buffers", [
    ("llama-tiny", {"layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),  # old Llama conversions
    ("gpt2-tiny", {"transformer.h.0.attn.bias": torch.ones(1, 1, 128, 128), "h.1.attn.masked_bias": torch.ones(1)}),
])
def test_prefixes_and_buffers_in_files_are_handled(tmp_path, name, buffers):
    """Names with or without the `model.` / `transformer.` prefix load; non-parameter buffers are skipped."""
    folder = copy_fixture(tmp_path, name)
    state = load_file(folder / "model.safetensors")
    state = {k.removeprefix("model."): v for k, v in state.items()} if name == "llama-tiny" else state
    state.update(buffers)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_pretrained(folder)
    ref = reference(name)
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() < 1e-4


def test_dtype_and_device_on_load():
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert not model.training


def test_bfloat16_model_saves_as_bfloat16(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny", dtype=torch.bfloat16)
    save_pretrained(model, tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, _ = load_pretrained(tmp_path / "out", dtype=None)  # None keeps the stored dtype
    assert again.norm.weight.dtype == torch.bfloat16
    assert_same_model(model, again, reference("llama-tiny")["input_ids"])


def test_from_scratch_model_and_tokenizer_make_a_loadable_folder(tmp_path, shakespeare):
    tokenizer = Tokenizer.train_bpe([shakespeare], vocab_size=320)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=128, tie_embeddings=True)
    model = Transformer(config)
    save_pretrained(model, tokenizer, tmp_path / "scratch")
    again, tok = load_pretrained(tmp_path / "scratch")
    ids = torch.tensor([tok.encode("First Citizen:")])
    assert_same_model(model, again, ids)
    assert len(generate(again, ids.tolist(), max_new_tokens=5)[0]) == 5


def test_save_replaces_an_old_checkpoint_atomically(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    target = tmp_path / "out"
    save_pretrained(model, tokenizer, target)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    save_pretrained(model, tokenizer, target)
    assert torch.equal(load_pretrained(target)[0].norm.weight, model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    target = tmp_path / "out"
    save_pretrained(model, tokenizer, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(tokenizer, path):
        raise OSError("disk full")

    monkeypatch.setattr(hf_folder, "save_tokenizer", crash)
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tokenizer, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_refuses_to_replace_a_folder_with_other_files(tmp_path):
    """A run folder has a config.json too; its metrics must survive a mistaken save."""
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("precious")
    with pytest.raises(UserError, match=r"holds 'metrics\.jsonl', which is not a model file; refusing to replace"):
        save_pretrained(model, tokenizer, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "precious"


def test_save_refuses_the_current_folder(tmp_path, monkeypatch):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="is the current folder or one above it"):
        save_pretrained(model, tokenizer, ".")


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_pretrained(model, tokenizer, tmp_path / "link")
    save_pretrained(model, tokenizer, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_save_removes_what_a_killed_save_left(tmp_path):
    model, tokenizer = load_pretrained(FIXTURES / "llama-tiny")
    dead_pid = 2**22 + 12345  # above Linux's pid_max: never a running process
    (tmp_path / f".out.tmp-{dead_pid}").mkdir()
    save_pretrained(model, tokenizer, tmp_path / "out")
    (tmp_path / f".out.old-{dead_pid}").mkdir()  # the swap had completed: out exists
    save_pretrained(model, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- bad input
def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: no such model folder$"):
        load_pretrained(tmp_path / "nowhere")


def test_no_config_json(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"llama-tiny: no config\.json"):
        load_pretrained(folder)


def test_unsupported_model_type(tmp_path):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(UserError, match=r"config\.json: model_type 'falcon' is not supported; supported: llama, mistral, qwen2, gpt2"):
        load_pretrained(folder)


def with_weights(tmp_path, edit) -> Path:
    """A copy of the fixture whose model.safetensors `edit` (a function of the state dict) changed."""
    folder = copy_fixture(tmp_path)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_tensor(tmp_path):
    folder = with_weights(tmp_path, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' missing"):
        load_pretrained(folder)


def test_wrong_shape(tmp_path):
    folder = with_weights(tmp_path, lambda state: state.update({"model.layers.0.self_attn.k_proj.weight":
                                                                torch.zeros(64, 64)}))
    with pytest.raises(UserError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), "
                                        r"but config\.json implies \(32, 64\)"):
        load_pretrained(folder)


def test_unexpected_tensor(tmp_path):
    folder = with_weights(tmp_path, lambda state: state.update({"model.layers.2.mlp.up_proj.weight":
                                                                torch.zeros(176, 64)}))
    with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        load_pretrained(folder)


def test_tokenizer_larger_than_embedding(tmp_path):
    folder = copy_fixture(tmp_path)
    tok = load_tokenizer(folder)
    tok.backend.add_special_tokens(["<|extra_a|>", "<|extra_b|>"])
    tok.backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError, match=r"tokenizer\.json: the tokenizer has 386 tokens but the model's embedding has only 384 rows"):
        load_pretrained(folder)


def test_unreadable_safetensors(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(folder)


def test_no_weights_file(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no model\.safetensors or model\.safetensors\.index\.json \(found pytorch_model\.bin"):
        load_pretrained(folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"index\.json: lists shard model-00001-of-00002\.safetensors, which is not in"):
        load_pretrained(folder)


def test_index_with_a_malformed_weight_map(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": 1}}')
    with pytest.raises(UserError, match=r"index\.json: no 'weight_map' from tensor names to shard file names"):
        load_pretrained(folder)


def test_invalid_config_json_names_the_line_and_column(tmp_path):
    config = copy_fixture(tmp_path) / "config.json"
    config.write_text('{"model_type": "llama",\n  "hidden_size": }')
    with pytest.raises(UserError) as error:
        load_pretrained(config.parent)
    assert str(error.value) == f"{config}: invalid JSON at line 2, column 18: Expecting value"
