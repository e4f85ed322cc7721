"""Mixtures of sources in data.train / data.dev: parsing, splits without copies, weighted draws,
and their use by the reward, DPO and SFT recipes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chatrlhf import config as cfg_lib
from chatrlhf.config import DataConfig, DPOConfig, RewardConfig
from chatrlhf.data import mixture
from chatrlhf.recipes import dpo, sft
from conftest import read_metrics, separable_pairs, shared_file, write_jsonl


def quiet(*args, **kwargs):
    pass


def numbered_pairs(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


# ---- configuration ---------------------------------------------------------------------------

def test_a_single_path_is_one_source_with_the_sections_settings():
    data = DataConfig(train="a.jsonl", reader="pairs", allow_empty=True, options={"x": 1})
    [source] = mixture.parse(data.train, data, "train")
    assert (source.path, source.name, source.weight, source.reader, source.allow_empty, source.options) == \
        ("a.jsonl", "a.jsonl", None, "pairs", True, {"x": 1})


def test_sources_in_yaml_and_on_the_command_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  reader: pairs\n  train:\n    - a.jsonl\n"
                      "    - {path: b.json, name: b, weight: 2, nan_as_missing: true, records: [0, 10]}\n")
    with pytest.raises(ValueError, match="source 'a.jsonl' has no 'weight'"):
        cfg_lib.load(RewardConfig, preset)
    config = cfg_lib.load(RewardConfig, preset, ["data.train=[{path: a.jsonl, weight: 0.7}, "
                                                 "{path: b.json, weight: 0.3, reader: pandalm, holdout: 0.1}]"])
    a, b = mixture.parse(config.data.train, config.data, "train")
    assert (a.weight, a.reader, b.weight, b.reader, b.holdout, b.part) == (0.7, "pairs", 0.3, "pandalm", 0.1, "train")
    # The dev side of the same holdout, by default, in data.dev.
    [dev] = mixture.parse([{"path": "b.json", "holdout": 0.1}], config.data, "dev")
    assert dev.part == "dev"


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "wieght": 1}, r"data.train\[0\]: unknown key 'wieght'"),
    ({"path": "a.jsonl", "weight": -1}, r"data.train\[0\].weight: expected a number > 0, found -1"),
    ({"path": "a.jsonl", "holdout": 1.5}, r"data.train\[0\].holdout: expected a fraction in \(0, 1\)"),
    ({"path": "a.jsonl", "records": [5, 2]}, r"data.train\[0\].records: expected \[start, end\]"),
    ({"path": "a.jsonl", "part": "dev"}, r"data.train\[0\].part: only with 'holdout'"),
    ({"path": "a.jsonl", "allow_empty": "yes"}, r"data.train\[0\].allow_empty: expected bool"),
    ({"name": "x"}, r"data.train\[0\]: expected 'path'"),
])
def test_bad_sources_name_the_entry_the_key_and_what_was_expected(entry, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(train=[entry])


def test_duplicate_names_and_weights_on_dev_are_refused():
    with pytest.raises(ValueError, match="two sources are named 'a.jsonl'"):
        DataConfig(train=["a.jsonl", {"path": "a.jsonl", "options": {"aspects": "fluency"}}])
    with pytest.raises(ValueError, match="'weight' is for data.train"):
        DataConfig(train="a.jsonl", dev=[{"path": "b.jsonl", "weight": 1}])


# ---- weighted draws --------------------------------------------------------------------------

def test_weights_are_shares_of_the_units_drawn_with_replacement_where_needed():
    picks = mixture.draw([900, 100], [0.5, 0.5], seed=3)
    assert [len(p) for p in picks] == [500, 500]
    assert len(set(picks[0])) == 500  # a subset of the large source, no repeats
    assert Counter(Counter(picks[1]).values()) == {5: 100}  # the small one five times over
    assert picks == mixture.draw([900, 100], [0.5, 0.5], seed=3)
    assert picks[0] != mixture.draw([900, 100], [0.5, 0.5], seed=4)[0]
    # Shares that do not divide evenly still sum to the total, largest remainders first.
    assert [len(p) for p in mixture.draw([5, 5, 5], [1, 1, 1], 0)] == [5, 5, 5]
    assert [len(p) for p in mixture.draw([10, 1], [1, 2], 0)] == [4, 7]
    assert mixture.draw([3, 2], [None, None], 0) == [[0, 1, 2], [0, 1]]


def test_a_mixture_logs_each_sources_count_and_interleaves_them(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(40, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_pairs(10, "b"))
    lines = []
    data = DataConfig(train=[{"path": a, "name": "big", "weight": 1}, {"path": b, "name": "small", "weight": 3}])
    mix = mixture.load_mixture(data.train, data, "train", seed=1, log=lines.append)
    assert Counter(mix.names[i] for i in mix.source_of) == {"big": 13, "small": 37}
    assert all(r.prompt.startswith("a" if mix.names[s] == "big" else "b") for r, s in zip(mix.units, mix.source_of))
    assert any("source small: 10 units (0 skipped), 37 used" in line for line in lines)
    assert mix.source_of[:10] != sorted(mix.source_of[:10])  # interleaved, so data.limit takes from both


def test_scored_samples_of_two_sources_stay_apart(tmp_path):
    rows = [{"kind": "scored", "prompt": f"doc {i % 3}", "reply": f"summary {i}", "score": i % 4} for i in range(12)]
    a, b = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    data = DataConfig(train=[a, {"path": b, "name": "b"}])
    mix = mixture.load_mixture(data.train, data, "train", log=quiet)
    assert [len(r.replies) for r in mix.units] == [4] * 6  # 3 prompts x 2 sources, 4 replies each


# ---- splits without copies -------------------------------------------------------------------

def test_holdout_cuts_a_source_into_disjoint_train_and_dev_the_same_every_run(tmp_path):
    rows = numbered_pairs(400, "q") + numbered_pairs(100, "q")  # 100 prompts twice
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    cut = {"path": path, "holdout": 0.2, "seed": 7}
    data = DataConfig(train=[cut], dev=[cut])
    train = mixture.load_mixture(data.train, data, "train", seed=1, log=quiet).units
    dev = mixture.load_mixture(data.dev, data, "dev", seed=2, log=quiet).units
    assert len(train) + len(dev) == 500
    assert not {r.prompt for r in train} & {r.prompt for r in dev}  # a prompt is on one side only
    assert 60 < len({r.prompt for r in dev}) < 100  # about a fifth of the 400 prompts
    # Independent of train.seed and of the file's order; another holdout seed cuts elsewhere.
    path_reversed = write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    again = mixture.load_mixture([{"path": path_reversed, "holdout": 0.2, "seed": 7}], data, "dev", 9, log=quiet).units
    assert sorted(r.prompt for r in again) == sorted(r.prompt for r in dev)
    other = mixture.load_mixture([{"path": path, "holdout": 0.2, "seed": 8}], data, "dev", log=quiet).units
    assert {r.prompt for r in other} != {r.prompt for r in dev}


def test_record_ranges_do_not_overlap(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(30, "q"))
    data = DataConfig(train=[{"path": path, "records": [10, None]}], dev=[{"path": path, "records": [0, 10]}])
    train = mixture.load_mixture(data.train, data, "train", log=quiet).units
    dev = mixture.load_mixture(data.dev, data, "dev", log=quiet).units
    assert [r.prompt for r in dev] == [f"q question {i}" for i in range(10)]
    assert [r.prompt for r in train] == [f"q question {i}" for i in range(10, 30)]
    with pytest.raises(ValueError, match=r"a.jsonl \(.*\): nothing left after records \[40, end\)"):
        mixture.load_mixture([{"path": path, "name": "a.jsonl", "records": [40, None]}], data, "train", log=quiet)


def test_real_oasst_holdout_is_disjoint_and_stable():
    path = str(shared_file("oasst/en_80_tree.jsonl"))
    data = DataConfig()
    train = mixture.load_mixture([{"path": path, "holdout": 0.2}], data, "train", log=quiet).units
    dev = mixture.load_mixture([{"path": path, "holdout": 0.2}], data, "dev", log=quiet).units
    assert train and dev and not {str(r.prompt) for r in train} & {str(r.prompt) for r in dev}
    assert [r.replies for r in dev] == [r.replies for r in mixture.load_mixture(
        [{"path": path, "holdout": 0.2}], data, "dev", seed=5, log=quiet).units]


# ---- the recipes -----------------------------------------------------------------------------

def test_reward_train_on_a_mixture_reports_dev_accuracy_per_source(tmp_path, tiny_bert, capsys):
    from chatrlhf.cli import main

    a = write_jsonl(tmp_path / "a.jsonl", separable_pairs(120, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", separable_pairs(20, seed=2))
    out = tmp_path / "run"
    assert main(["reward", "train", f"model.name={tiny_bert}", f"train.output_dir={out}",
                 f"data.train=[{{path: {a}, name: a, weight: 1, holdout: 0.25}}, {{path: {b}, name: b, weight: 1}}]",
                 f"data.dev=[{{path: {a}, name: a, holdout: 0.25}}, {{path: {b}, name: b}}]",
                 "model.max_length=48", "train.batch_size=8", "train.lr=2e-3", "train.warmup_ratio=0",
                 "train.epochs=3", "train.eval_every=5"]) == 0
    captured = capsys.readouterr()
    assert "data.train source b: 20 units (0 skipped)" in captured.err + captured.out
    assert "data.train source a: " in captured.err + captured.out and " cut, 0 skipped" in captured.err + captured.out
    evaluations = [e for e in read_metrics(out) if "dev_accuracy" in e]
    assert len(evaluations) > 1 and all(set(e["dev_sources"]) == {"a", "b"} for e in evaluations)
    final = evaluations[-1]
    sources = final["dev_sources"]
    assert sources["b"]["pairs"] == 20 and 0 < sources["a"]["pairs"] < 60
    assert final["dev_source_mean_accuracy"] == pytest.approx((sources["a"]["accuracy"] + sources["b"]["accuracy"]) / 2)
    assert final["dev_source_mean_accuracy"] > 0.8
    assert f"  b accuracy {sources['b']['accuracy']:.4f} on 20 pairs" in captured.out
    assert "mean over 2 sources: accuracy" in captured.out


def test_dpo_reference_cache_key_covers_every_source_and_its_options(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(5, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_pairs(5, "b"))

    def key(**data):
        return dpo.cache_key(cfg_lib.from_dict(DPOConfig, {"model": {"name": "some/model"}, "data": data}))

    base = {"train": [{"path": a, "weight": 1}, {"path": b, "weight": 1}], "dev": [{"path": b, "holdout": 0.5}]}
    assert key(**base) == key(**base)
    assert key(train=a) != key(train=b)
    changed = [
        {**base, "train": [{"path": a, "weight": 1}, {"path": b, "weight": 2}]},
        {**base, "train": [{"path": a, "weight": 1}, {"path": b, "weight": 1, "nan_as_missing": True}]},
        {**base, "train": [{"path": a, "weight": 1}, {"path": b, "weight": 1, "records": [0, 3]}]},
        {**base, "dev": [{"path": b, "holdout": 0.5, "seed": 1}]},
        {**base, "dev": [{"path": b, "holdout": 0.5}, a]},
    ]
    assert len({key(**data) for data in changed} | {key(**base)}) == len(changed) + 1
    before = key(**base)
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text() + json.dumps(numbered_pairs(1, "c")[0]) + "\n")
    assert key(**base) != before  # a source file that changed


def test_dpo_and_sft_read_mixtures_through_the_same_loader(tmp_path, tiny_llama):
    from chatrlhf import policy

    a = write_jsonl(tmp_path / "a.jsonl", numbered_pairs(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_pairs(10, "b"))
    config = cfg_lib.from_dict(DPOConfig, {"model": {"name": tiny_llama}, "data": {
        "train": [{"path": a, "weight": 1}, {"path": b, "weight": 1, "records": [0, 5]}]}})
    _, tokenizer = policy.load_policy(tiny_llama)
    items = dpo.load_items(config.data.train, config, tokenizer, True, quiet)
    prompts = Counter(str(item.group.prompt)[:1] for item in items)
    assert prompts == {"a": 18, "b": 17}  # equal shares; b's 5 records repeated
    assert len({str(i.group.prompt) for i in items if str(i.group.prompt)[0] == "b"}) == 5

    sft_config = cfg_lib.from_dict(cfg_lib.SFTConfig, {"data": {
        "train": [{"path": a, "holdout": 0.5}, {"path": b, "name": "b"}]}})
    train = sft.read_examples(sft_config.data.train, sft_config.data, quiet, "train")
    dev = sft.read_examples([{"path": a, "holdout": 0.5}], sft_config.data, quiet, "dev")
    assert len(train) + len(dev) == 40 and not {p for p, _ in train} & {p for p, _ in dev}
    assert all(reply.startswith("good") for _, reply in train)


@pytest.mark.parametrize("preset", ["reward_general_minilm.yaml", "reward_general_smollm2.yaml"])
def test_general_presets_dev_splits_are_never_trained_on(preset):
    from pathlib import Path

    from chatrlhf.data.records import prompt_key

    shared_file("hh-rlhf/harmless-base/train.jsonl.gz")
    root = Path(__file__).resolve().parents[1]
    config = cfg_lib.load(RewardConfig, root / "configs" / preset)
    for source in config.data.train + config.data.dev:  # paths relative to the project root
        source["path"] = str(root / source["path"])
    train = mixture.load_mixture(config.data.train, config.data, "train", log=quiet)
    dev = mixture.load_mixture(config.data.dev, config.data, "dev", log=quiet)
    names = {"hh_harmless", "oasst", "pandalm", "dialsummeval", "unieval"}
    assert set(train.names) == set(dev.names) == names

    def openings(mix, name):
        return {prompt_key(r.prompt[:1] if isinstance(r.prompt, list) else r.prompt)
                for r, s in zip(mix.units, mix.source_of) if mix.names[s] == name}

    for name in names - {"hh_harmless"}:  # HH: upstream lines 1-1600 and 1601-1800
        assert openings(dev, name) and not openings(train, name) & openings(dev, name), name
