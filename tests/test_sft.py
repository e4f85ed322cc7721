"""`chatrlhf sft` through the real CLI with a tiny Llama: loss on the reply only, packing, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatrlhf import config as cfg_lib
from chatrlhf import policy, sharing
from chatrlhf.cli import main
from chatrlhf.recipes import sft
from conftest import crash_after_checkpoint, read_metrics as log, separable_pairs, tiny_decoder, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_sft(tmp_path, model: str, rows: list[dict], *extra: str, name="run", dev_rows=None) -> Path:
    out = tmp_path / name
    args = ["sft", f"model.name={model}", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
            f"train.output_dir={out}", "model.max_length=48", "train.batch_size=8", "train.lr=3e-3",
            "train.warmup_ratio=0.0", *extra]
    if dev_rows:
        args.append(f"data.dev={write_jsonl(tmp_path / 'dev.jsonl', dev_rows)}")
    assert main(args) == 0
    return out



def sft_rows(n: int, seed: int) -> list[dict]:
    """Alternate the two SFT formats: {prompt, response} and {messages}."""
    rows = []
    for i, r in enumerate(separable_pairs(n, seed)):
        rows.append({"prompt": r["prompt"], "response": r["chosen"]} if i % 2 else
                    {"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r["chosen"]}]})
    return rows


@pytest.mark.parametrize("packing", [False, True])
def test_sft_lowers_the_held_out_response_loss(tmp_path, tiny_llama, packing, capsys):
    out = run_sft(tmp_path, tiny_llama, sft_rows(96, seed=1), "train.max_steps=40", f"data.packing={packing}",
                  dev_rows=sft_rows(32, seed=2))
    entries = log(out)
    assert entries[0]["step"] == 0 and entries[-1]["step"] == len(entries) - 1
    assert entries[-1]["dev_loss"] < 0.8 * entries[0]["dev_loss"]
    assert entries[-1]["loss"] < entries[1]["loss"]
    saved = json.loads((out / "model" / "chatrlhf.json").read_text())
    assert saved["eval"]["loss"] == entries[-1]["dev_loss"] and saved["recipe"] == "sft"
    assert "dev response-only loss" in capsys.readouterr().out
    if packing:  # 96 short examples share far fewer rows than 96
        assert entries[1]["rows"] < 8 * 96 // 12


def test_prompt_tokens_carry_no_loss(tiny_llama):
    model, tokenizer = policy.load_policy(tiny_llama)
    examples = [sft.Example(*policy.encode_prompt_response(tokenizer, p, r, 48).__dict__.values(), i)
                for i, (p, r) in enumerate([("the a of to and", "good it is"), ("hi", "bad")])]
    nll, count = sft.reply_nll(model, examples, 512)
    assert count == sum(len(e.input_ids) - e.prompt_tokens for e in examples)
    batch = policy.collate_lm(examples, tokenizer.pad_token_id)
    torch.testing.assert_close(nll, -policy.sequence_logps(model, batch).sum())
    # Another reply token: another loss.
    changed = [sft.Example(list(e.input_ids), e.prompt_tokens, e.cut) for e in examples]
    changed[0].input_ids[-1] = 7
    assert not torch.equal(sft.reply_nll(model, changed, 512)[0], nll)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2-mixed"])
@pytest.mark.parametrize("layout", ["one row", "packed rows"])
def test_reply_nll_equals_separate_forwards(tiny_llama, kind, layout, monkeypatch):
    # Mistral: a sliding window of 4 in every layer; Qwen2: layer 0 full, layer 1 window 4. Both
    # shorter than the examples: packed rows must apply the window to the right layers.
    model, tokenizer = policy.load_policy(tiny_llama)
    if kind != "llama":
        model = tiny_decoder(tokenizer, kind, "ForCausalLM", window=4)
    if layout == "packed rows":
        monkeypatch.setattr(sharing, "PER_GROUP_DEVICES", ())
    pairs = [("the a of", "good it is"), ("hi hi", "bad"), ("to and in is it", "good")]
    examples = [sft.Example(*policy.encode_prompt_response(tokenizer, p, r, 48).__dict__.values(), i)
                for i, (p, r) in enumerate(pairs)]
    expected = -sum(policy.sequence_logps(model, policy.collate_lm([e], tokenizer.pad_token_id)) for e in examples)
    for tokens_per_forward in (512, 12):  # all in one forward, or one example per forward
        nll, count = sft.reply_nll(model, examples, tokens_per_forward)
        assert count == sum(len(e.input_ids) - e.prompt_tokens for e in examples)
        torch.testing.assert_close(nll, expected[0])


def test_packing_refuses_models_with_recurrent_layers(tmp_path, tiny_llama, capsys):
    # Jamba's Mamba layers ignore the attention mask: packed examples would see each other.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tiny_decoder(tokenizer, "jamba", "ForCausalLM").save_pretrained(tmp_path / "jamba")
    tokenizer.save_pretrained(tmp_path / "jamba")
    path = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "hi", "response": "good"}])
    args = ["sft", f"model.name={tmp_path / 'jamba'}", f"data.train={path}", f"train.output_dir={tmp_path / 'out'}"]
    assert main([*args, "data.packing=true"]) == 2
    err = capsys.readouterr().err
    assert "data.packing=true needs a model whose layers all attend" in err and "linear_attention" in err


def test_resume_after_a_crash_ends_with_the_same_loss(tmp_path, tiny_llama, monkeypatch):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in separable_pairs(40, seed=3)]
    settings = ("train.max_steps=6", "train.save_every=3", "model.lora_r=4", "data.packing=true")
    whole = log(run_sft(tmp_path, tiny_llama, rows, *settings, name="whole"))

    with crash_after_checkpoint(monkeypatch, sft, at_step=3):
        run_sft(tmp_path, tiny_llama, rows, *settings, name="crashed")
    resumed = log(run_sft(tmp_path, tiny_llama, rows, *settings, "train.resume=true", name="crashed"))
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed[3:]] == pytest.approx([e["loss"] for e in whole[3:]], abs=1e-6)
    assert (tmp_path / "crashed" / "model" / "adapter" / "adapter_config.json").exists()


def test_bad_sft_row_names_file_line_and_field(tmp_path, tiny_llama, capsys):
    rows = [{"prompt": "hi", "response": "good"}, {"messages": [{"role": "user", "content": "hi"}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["sft", f"model.name={tiny_llama}", f"data.train={path}", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2: field 'messages'" in err and "assistant" in err


def test_preset_loads_and_help_lists_every_setting(capsys):
    config = cfg_lib.load(sft.SFTConfig, ROOT / "configs" / "sft_hh_smollm2.yaml")
    assert config.model.name == "smollm2-135m" and config.model.lora_r > 0 and config.data.allow_empty
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for section in ("model", "data", "train"):
        section_cls = type(getattr(config, section))
        for field in section_cls.__dataclass_fields__:
            assert f"{section}.{field}=" in text
