"""Policy training throughput: chatrlhf's DPO and SFT against TRL's DPOTrainer and SFTTrainer, in one run.

    python bench/policy_throughput.py --case all --plot runs/policy_losses.png
    python bench/policy_throughput.py --case dpo --mode full --steps 4
    python bench/policy_throughput.py --case sft --repeats 2

The method is reward_throughput.py's. Each case trains ``smollm2-135m`` (the embedded default
policy; TRL gets the same cached safetensors folder) one epoch over a seeded random sample of HH
harmless train (DPO: steps x batch pairs, default 8 x 4 at max length 128; SFT: steps x batch
chosen replies, default 8 x 8 at max length 256), with the same threads, learning rate, schedule
(linear, no warm-up), optimizer settings and, by default, the presets' LoRA (r 16, alpha 32,
dropout 0.05, every linear map; ``--mode full`` or ``both`` adds full fine-tuning). Every side runs
in its own child process, so its peak resident memory is its own:

- chatrlhf: the recipe's own ``train`` (dpo.train / sft.train: setup, reference pass, fit, save)
  with a config built from configs/dpo_hh_smollm2.yaml or sft_hh_smollm2.yaml, each step's time
  read from its metrics.jsonl;
- TRL at its defaults (gradient checkpointing on; DPO without precomputed reference
  log-probabilities), and TRL at its fastest setting on this machine: gradient checkpointing
  off, plus ``precompute_ref_log_probs=True`` (DPO) and ``padding_free=True`` (SFT) where the
  installed TRL accepts them (a setting TRL turns off or refuses is printed as such). Each step
  is timed by a TrainerCallback.

Both sides get the same token ids: TRL is fed chatrlhf's encodings (chat-templated prompt cut
from the left, reply with its end-of-turn marker), as pre-tokenised rows, so neither drops or cuts
differently (the counts are printed), in chatrlhf's batches and their order (length-bucketed; TRL
reads them sequentially): the same examples at every step, so the loss curves compare step by
step and TRL gets chatrlhf's low padding too. The few settings where both sides are set alike
rather than left at TRL's defaults are printed with TRL's settings (precision: TRL would autocast
to bf16 on CPU; dropout: TRL's DPO would also zero LoRA's dropout). Each side first runs one
untimed forward and backward on its largest batch (reward_throughput.py says why).

Printed per case: examples/s (pairs for DPO), real tokens/s, peak memory, MFU (6 x non-embedding
parameters x real tokens, the tied output layer not counted, even with LoRA, as in
reward_throughput.py) against a matmul peak measured in the same run, the ratios chatrlhf/TRL
default and chatrlhf/TRL fastest (the figure that counts), setup time (model, data, DPO's
reference pass) and the whole child's wall time (warm-up excluded), and peak memory at equal
gradient checkpointing: both off (chatrlhf against TRL fastest) and both on (where chatrlhf's
recipe has ``train.gradient_checkpointing``; TRL's default has it on). ``--plot FILE`` draws
every side's loss per step. ``--repeats N`` alternates the sides N times and times each by each
step's fastest run. Needs the benchmark extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # the child's wall time counts its imports too

import torch  # noqa: E402

from chatrlhf import config as cfg_lib  # noqa: E402
from chatrlhf import models, training  # noqa: E402
from chatrlhf.config import DPOConfig, SFTConfig  # noqa: E402
from chatrlhf.data import load, save  # noqa: E402
from reward_throughput import SHARED, matmul_peak, non_embedding_parameters, peak_mib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED / "hh-rlhf/harmless-base/train.jsonl.gz"
# case: (preset, config class, default batch, default max length, what one example is)
CASES = {"dpo": (ROOT / "configs/dpo_hh_smollm2.yaml", DPOConfig, 4, 128, "pairs"),
         "sft": (ROOT / "configs/sft_hh_smollm2.yaml", SFTConfig, 8, 256, "examples")}
SIDES = ["chatrlhf", "chatrlhf-ckpt", "trl-default", "trl-fastest"]
FULL_LR = 1e-5  # full fine-tuning: the presets' rates are LoRA's


def recipe(case: str):
    from chatrlhf.recipes import dpo, sft

    return {"dpo": dpo, "sft": sft}[case]


def has_checkpointing(case: str) -> bool:
    """Whether chatrlhf's recipe for ``case`` has a train.gradient_checkpointing setting."""
    train_class = typing_hint(CASES[case][1], "train")
    return "gradient_checkpointing" in {f.name for f in dataclasses.fields(train_class)}


def typing_hint(cls, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


# ---- the data, the same for every side ------------------------------------------------------

def sample_file(args, workdir: Path) -> Path:
    """A seeded random sample of steps x batch HH records, written in the project's format to a
    temporary folder (the data is never copied into the project)."""
    records = load(DATA, allow_empty=True).records
    records = random.Random(0).sample(records, min(args.steps * args.batch, len(records)))
    save(records, workdir / "data.jsonl")
    return workdir / "data.jsonl"


def chatrlhf_config(args, data_file: Path, output_dir: Path, checkpointing: bool = False):
    """The preset's config with the bench's data, lengths, batch and a single epoch."""
    preset, config_class = CASES[args.case][:2]
    train = {"output_dir": str(output_dir), "epochs": 1, "max_steps": None, "batch_size": args.batch,
             "warmup_ratio": 0.0, "schedule": "linear", "save_every": 0, "eval_every": 0, "overwrite": True,
             "bf16": args.precision == "bf16", "grad_accum": 1, "max_grad_norm": 1.0, "weight_decay": 0.0}
    if args.mode == "full":
        train["lr"] = FULL_LR
    if checkpointing:
        train["gradient_checkpointing"] = True
    model = {"max_length": args.max_length, **({"lora_r": 0} if args.mode == "full" else {})}
    return cfg_lib.load(config_class, preset, {
        "model": model, "data": {"train": str(data_file), "dev": None, "limit": None, "allow_empty": True},
        "train": train})


def encoded_examples(args, config, tokenizer) -> list:
    """chatrlhf's own encoding of the sample: DPO items (a pair's two encoded replies) or SFT
    examples, as its recipe reads them."""
    quiet = lambda *a, **k: None  # noqa: E731
    if args.case == "dpo":
        return recipe("dpo").load_items(config.data.train, config, tokenizer, True, quiet)
    sft = recipe("sft")
    return sft.encode_examples(sft.read_examples(config.data.train, config.data, quiet), tokenizer,
                               config.model, config.data.train, quiet)


def chatrlhf_order(args, config, examples) -> list[list[int]]:
    """The indices of each step's examples, in chatrlhf's order (its length-bucketed batches of
    epoch 0, as sft.fit and dpo.fit draw them); checked against its metrics after the run."""
    batches = recipe("sft").epoch_batches(examples, args.batch, config.train.seed, 0, False, args.max_length)
    return [[row[0] for row in batch] for batch in batches]


def sequences(args, example) -> list:
    """The encoded sequences (input_ids, prompt_tokens) of one example."""
    return list(example.encoded) if args.case == "dpo" else [example]


# ---- chatrlhf -------------------------------------------------------------------------------

def chatrlhf_run(args, workdir: Path, checkpointing: bool) -> dict:
    module = recipe(args.case)
    config = chatrlhf_config(args, sample_file(args, workdir), workdir / "chatrlhf", checkpointing)
    timings: dict = {}
    setup, fit = module.setup, module.fit

    def timed_setup(config):
        start = time.perf_counter()
        run = setup(config)
        timings["setup_s"] = time.perf_counter() - start
        return run

    def fit_after_warm_up(run):
        start = time.perf_counter()
        timings["warm_up"] = chatrlhf_warm_up(args, module, run)
        timings["warm_up_s"] = time.perf_counter() - start
        timings["params"] = non_embedding_parameters(training.inner(run.model))
        items = run.train_items if args.case == "dpo" else run.train_examples
        timings["order"] = chatrlhf_order(args, run.config, items)
        timings["step_tokens"] = [sum(len(s.input_ids) for i in batch for s in sequences(args, items[i]))
                                  for batch in timings["order"]]
        timings["step_reply_tokens"] = [sum(len(s.input_ids) - max(s.prompt_tokens, 1)
                                            for i in batch for s in sequences(args, items[i]))
                                        for batch in timings["order"]]
        timings["count"] = len(items)
        timings["cut"] = sum(s.cut for item in items for s in sequences(args, item))
        return fit(run)

    module.setup, module.fit = timed_setup, fit_after_warm_up  # train() looks both up when called
    module.train(config)
    steps = [json.loads(line) for line in (workdir / "chatrlhf" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "seconds" in s]
    # The bench's replica of chatrlhf's batches (TRL's input) must be the batches it trained on.
    own = [s.get("tokens", s.get("reply_tokens")) for s in steps]
    replica = timings["step_tokens"] if args.case == "dpo" else timings["step_reply_tokens"]
    mismatch = own != replica
    return {"seconds": [s["seconds"] for s in steps], "losses": [s["loss"] for s in steps],
            "step_tokens": timings["step_tokens"], "examples": sum(len(b) for b in timings["order"]),
            "params": timings["params"], "setup_s": timings["setup_s"], "warm_up_s": timings["warm_up_s"],
            "warm_up": timings["warm_up"], "count": timings["count"], "cut": timings["cut"],
            "order_mismatch": mismatch, "peak_mib": peak_mib(),
            "settings": {"train.gradient_checkpointing": checkpointing} if checkpointing else {}}


def chatrlhf_warm_up(args, module, run) -> str:
    """One untimed forward and backward on the largest batch, through the recipe's own functions;
    skipped (and said so) where they have changed."""
    pad_id, train = run.tokenizer.pad_token_id, run.config.train
    try:
        run.model.train()
        with run.engine.autocast():
            if args.case == "dpo":
                items = sorted(run.train_items, key=lambda item: item.num_tokens)[-args.batch:]
                average = run.config.loss.average_logps
                if hasattr(module, "item_logps"):  # the shared-prompt forward (issue 29)
                    out = module.item_logps(run.model, items, average, train.tokens_per_forward).sum()
                else:
                    encoded = [e for item in items for e in item.encoded]
                    out = module.batch_logps(run.model, encoded, pad_id, run.engine.device, average).sum()
            else:
                largest = sorted(run.train_examples, key=lambda e: e.num_tokens)[-args.batch:]
                if hasattr(module, "reply_nll"):  # the padding-free, chunked forward (issue 29)
                    out = module.reply_nll(run.model, largest, train.tokens_per_forward)[0]
                else:
                    batch = module.make_batch([[e] for e in largest], pad_id, False)
                    out = module.response_nll(module.forward(run.model, batch), batch["input_ids"],
                                              batch["loss_mask"])[0]
    except (AttributeError, TypeError) as error:
        return f"skipped: the recipe's functions changed ({error})"
    out.backward()
    run.model.zero_grad(set_to_none=True)
    return "largest batch"


# ---- TRL ------------------------------------------------------------------------------------

def trl_settings(args, fastest: bool) -> dict:
    """The TRL settings of one side; everything else is TRL's default."""
    import trl

    settings = {"gradient_checkpointing": not fastest}
    if fastest and args.case == "dpo":
        settings["precompute_ref_log_probs"] = True
        settings["padding_free"] = True  # checked after the trainer is built: TRL may turn it off
    if fastest and args.case == "sft":
        settings["padding_free"] = True
    if settings.get("padding_free") and args.case == "sft":
        settings["max_length"] = None  # TRL requires it padding-free without packing; rows come cut
    elif args.case == "sft":
        settings["max_length"] = args.max_length  # rows come cut: its truncation keeps all
    else:
        settings["max_length"] = args.max_length
    if args.case == "dpo":
        settings["beta"] = recipe_config_value(args, "loss.beta")
        settings["loss_type"] = ["sigmoid"]
        # TRL's DPO default would also zero LoRA's dropout, which chatrlhf keeps (smollm2 has none).
        settings["disable_dropout"] = False
        settings["remove_unused_columns"] = False  # the rows carry each reply's prompt length
    return {"trl_version": trl.__version__, **settings}


def recipe_config_value(args, key: str):
    preset, config_class = CASES[args.case][:2]
    config = cfg_lib.load(config_class, preset)
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def trl_run(args, workdir: Path, fastest: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    started = time.perf_counter()
    config = chatrlhf_config(args, sample_file(args, workdir), workdir / "unused")
    tokenizer = models.load_tokenizer(config.model.name)
    examples = encoded_examples(args, config, tokenizer)
    order = chatrlhf_order(args, config, examples)
    path = models.resolve(config.model.name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not config.model.dropout:
        models.disable_dropout(model)
    lora = config.model.lora()
    if lora:
        from peft import LoraConfig, TaskType

        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, **lora)
    settings = trl_settings(args, fastest)
    common = dict(output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                  learning_rate=config.train.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, gradient_accumulation_steps=1, seed=config.train.seed,
                  train_sampling_strategy="sequential", use_cpu=True, bf16=args.precision == "bf16",
                  report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1,
                  dataloader_num_workers=0, disable_tqdm=True)
    kwargs = {k: v for k, v in settings.items() if k != "trl_version"}
    rows = [examples[i] for batch in order for i in batch]  # chatrlhf's batches, read in order
    if args.case == "dpo":
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        class PromptPerReply(DataCollatorForPreference):
            """TRL's collator, but each reply keeps its own prompt cut (chatrlhf cuts each reply's
            prompt to fit it): every sequence goes in as a 'completion', then the prompt's
            positions leave the completion mask."""

            def torch_call(self, examples):
                out = super().torch_call([{**e, "prompt_ids": []} for e in examples])
                prompts = [e["chosen_prompt"] for e in examples] + [e["rejected_prompt"] for e in examples]
                for row, n in enumerate(prompts):
                    out["completion_mask"][row, :n] = 0
                return out

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):  # rows come tokenised and cut
                return dataset

        data = []
        for item in rows:
            better = 0 if item.group.ranks[0] < item.group.ranks[1] else 1
            chosen, rejected = item.encoded[better], item.encoded[1 - better]
            data.append({"prompt_ids": [], "chosen_ids": chosen.input_ids, "rejected_ids": rejected.input_ids,
                         "chosen_prompt": chosen.prompt_tokens, "rejected_prompt": rejected.prompt_tokens})
        training_args = TRLConfig(**common, **kwargs)
        collator = PromptPerReply(pad_token_id=tokenizer.pad_token_id, max_length=None)
        trainer_kwargs = {"data_collator": collator}
    else:
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer as Trainer

        data = [{"input_ids": e.input_ids, "labels": [-100] * e.prompt_tokens + e.input_ids[e.prompt_tokens:]}
                for e in rows]
        training_args = TRLConfig(**common, **kwargs)
        trainer_kwargs = {}
    losses, times, batches = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=Dataset.from_list(data),
                      callbacks=[Timer()], peft_config=lora, **trainer_kwargs)
    setup_s = time.perf_counter() - started  # model, data and (precomputed) reference pass
    notes = []
    if settings.get("padding_free") and not getattr(trainer, "padding_free", True):
        notes.append(f"padding_free=True: TRL {settings['trl_version']} turned it off (falls back to padding)")
        settings["padding_free"] = "requested, turned off by TRL"
    if len(trainer.train_dataset) != len(data):
        notes.append(f"TRL dropped {len(data) - len(trainer.train_dataset)} of {len(data)} rows")
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        batches.append(real)
        return batch

    trainer.data_collator = counting_collator
    start = time.perf_counter()
    trl_warm_up(trainer, collator, [trainer.train_dataset[i] for i in largest(args, examples, order)], args)
    warm_up_s = time.perf_counter() - start
    trainer.train()
    trainer.save_model(str(workdir / "trl" / "model"))  # as chatrlhf's command saves its model
    return {"seconds": times, "losses": losses, "step_tokens": batches, "examples": len(data),
            "params": non_embedding_parameters(model), "setup_s": setup_s, "warm_up_s": warm_up_s,
            "warm_up": "largest batch", "count": len(data), "cut": sum(s.cut for e in examples for s in sequences(args, e)),
            "order_mismatch": False, "peak_mib": peak_mib(), "settings": settings, "notes": notes}


def largest(args, examples, order) -> list[int]:
    """Row positions (in TRL's dataset) of the batch of largest examples."""
    flat = [i for batch in order for i in batch]
    size = {position: sum(len(s.input_ids) for s in sequences(args, examples[i])) for position, i in enumerate(flat)}
    return sorted(size, key=size.get)[-args.batch:]


def trl_warm_up(trainer, collator, features, args) -> None:
    """One untimed forward and backward of TRL's own loss on the largest batch."""
    batch = collator(features)
    trainer.model.train()
    if trainer.args.gradient_checkpointing:  # the Trainer turns it on in train(); so must the warm-up
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    for values in getattr(trainer, "_metrics", {}).get("train", {}).values():
        values.clear()  # the warm-up's metrics are not the first step's


# ---- the parent: children, ratios, plot -----------------------------------------------------

def side(args) -> dict:
    torch.set_num_threads(args.threads)
    training.keep_freed_memory()  # as the chatrlhf command does; the same for TRL's side
    with tempfile.TemporaryDirectory() as tmp:
        if args.side.startswith("chatrlhf"):
            return chatrlhf_run(args, Path(tmp), checkpointing=args.side == "chatrlhf-ckpt")
        return trl_run(args, Path(tmp), fastest=args.side == "trl-fastest")


def in_child(args, which: str) -> dict:
    command = [sys.executable, __file__, "--side", which, "--case", args.case, "--mode", args.mode,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--threads", str(args.threads), "--precision", args.precision]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{which} on {args.case} ({args.mode}) failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "whole_s": wall - result["warm_up_s"]}


def fastest(runs: list[dict]) -> dict:
    """One side's runs of the same steps, timed by each step's fastest run."""
    if any(r["step_tokens"] != runs[0]["step_tokens"] for r in runs):
        raise RuntimeError("the runs of one side took different steps; their times cannot be compared step by step")
    seconds = sum(map(min, zip(*(r["seconds"] for r in runs))))
    run = runs[0]
    tokens = sum(run["step_tokens"])
    return {**run, "per_s": run["examples"] / seconds, "tokens_per_s": tokens / seconds,
            "gflops": 6 * run["params"] * tokens / seconds / 1e9, "peak_mib": max(r["peak_mib"] for r in runs),
            "whole_s": min(r["whole_s"] for r in runs), "setup_s": min(r["setup_s"] for r in runs)}


def per_s(run: dict) -> float:
    return run["examples"] / sum(run["seconds"])


def report(args, results: dict, runs: list[dict], peak: float, unit: str) -> None:
    lora = recipe_config_value(args, "model.lora_r")
    what = (f"LoRA r {lora} (alpha {recipe_config_value(args, 'model.lora_alpha')}, dropout "
            f"{recipe_config_value(args, 'model.lora_dropout')}, every linear map)" if args.mode == "lora"
            else f"full fine-tuning (lr {FULL_LR})")
    ours = results["chatrlhf"]
    print(f"\n{args.case}, smollm2-135m, {what}: {ours['count']} {unit} of {DATA.name} (seeded sample), "
          f"{len(ours['seconds'])} steps of {args.batch}, max length {args.max_length}, {args.threads} threads, "
          f"{args.precision}; both sides take chatrlhf's token ids and batches: "
          f"{ours['cut']} sequences cut (prompt from the left), none dropped")
    print(f"{'':13} {unit + '/s':>10} {'tokens/s':>9} {'peak MiB':>9} {'MFU':>6} {'setup s':>8} "
          f"{'whole s':>8} {'loss 1st':>9} {'loss last':>9}")
    for name, result in results.items():
        losses = result["losses"] or [float("nan")]
        print(f"{name:13} {result['per_s']:10.3f} {result['tokens_per_s']:9.0f} {result['peak_mib']:9.0f} "
              f"{result['gflops'] / peak:6.1%} {result['setup_s']:8.1f} {result['whole_s']:8.1f} "
              f"{losses[0]:9.4f} {losses[-1]:9.4f}")
    for name in ("trl-default", "trl-fastest"):
        print(f"chatrlhf/{name.replace('trl-', 'TRL ')} {unit}/s: {ours['per_s'] / results[name]['per_s']:.2f}x"
              + ("  <- the figure that counts" if name == "trl-fastest" else "")
              + f"; whole command: {results[name]['whole_s'] / ours['whole_s']:.2f}x")
    if args.repeats > 1:
        for name in ("trl-default", "trl-fastest"):
            print(f"each run's ratio against {name}: "
                  + ", ".join(f"{per_s(r['chatrlhf']) / per_s(r[name]):.2f}x" for r in runs))
    for name in ("trl-default", "trl-fastest"):
        print(f"{name} settings (the rest TRL's defaults): {json.dumps(results[name]['settings'])}")
        for note in results[name].get("notes", []):
            print(f"  {name}: {note}")
    print("  both TRL sides also: fp32 unless --precision bf16 (TRL's own default is bf16 autocast on CPU), "
          "use_cpu, sequential sampler over chatrlhf's batches, no warm-up steps, linear decay, "
          "logging every step (outside the timed step)")
    if ours["order_mismatch"]:
        print("  WARNING: chatrlhf's per-step tokens differ from the bench's replica of its batches: TRL did "
              "not get the same examples per step (update chatrlhf_order)")
    if "skipped" in ours["warm_up"]:
        print(f"  chatrlhf warm-up {ours['warm_up']}")
    off = f"both off: chatrlhf {ours['peak_mib']:.0f} MiB, TRL fastest {results['trl-fastest']['peak_mib']:.0f} MiB"
    if "chatrlhf-ckpt" in results:
        on = (f"both on: chatrlhf {results['chatrlhf-ckpt']['peak_mib']:.0f} MiB, TRL default "
              f"{results['trl-default']['peak_mib']:.0f} MiB")
    else:
        on = (f"both on: not measured, chatrlhf's {args.case} recipe has no train.gradient_checkpointing "
              f"(TRL default, on: {results['trl-default']['peak_mib']:.0f} MiB)")
    print(f"peak memory at equal gradient checkpointing: {off}; {on}")


def plot(path: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (title, sides) in zip(axes[0], curves.items()):
        for name, losses in sides.items():
            ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nloss curves written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--mode", choices=["lora", "full", "both"], default="lora",
                        help="the presets' LoRA, full fine-tuning, or both (one after the other)")
    parser.add_argument("--steps", type=int, default=8, help="steps of each side: steps x batch examples are "
                        "sampled and trained one epoch")
    parser.add_argument("--batch", type=int, help="per step; default DPO 4 pairs, SFT 8 examples")
    parser.add_argument("--max-length", type=int, help="default DPO 128, SFT 256 (the presets')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both sides (the presets train in fp32; TRL alone would autocast to bf16 on CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="run every side this many times, alternating, "
                        "and time each by each step's fastest run")
    parser.add_argument("--plot", metavar="FILE", help="write every side's loss per step to this PNG")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.batch = args.batch or CASES[args.case][2]
        args.max_length = args.max_length or CASES[args.case][3]
        print(json.dumps(side(args)))
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    peak = matmul_peak(dtype)
    batch, max_length = args.batch, args.max_length
    collected, curves = [], {}
    for case in CASES if args.case == "all" else [args.case]:
        for mode in ["lora", "full"] if args.mode == "both" else [args.mode]:
            args.case, args.mode = case, mode
            args.batch, args.max_length = batch or CASES[case][2], max_length or CASES[case][3]
            sides = [s for s in SIDES if s != "chatrlhf-ckpt" or has_checkpointing(case)]
            start = time.perf_counter()
            runs = [{name: in_child(args, name) for name in sides} for _ in range(args.repeats)]
            results = {name: fastest([run[name] for run in runs]) for name in sides}
            collected.append((argparse.Namespace(**vars(args)), results, runs, time.perf_counter() - start))
            curves[f"{case} ({mode})"] = {name: results[name]["losses"] for name in sides}
    peak = max(peak, matmul_peak(dtype))
    print(f"matmul peak ({args.threads} threads, {args.precision}, the higher of before and after): {peak:.1f} GFLOP/s")
    for case_args, results, runs, seconds in collected:
        report(case_args, results, runs, peak, CASES[case_args.case][4])
        print(f"({seconds / 60:.1f} min for this case's {len(results) * case_args.repeats} child runs)")
    if args.plot:
        plot(args.plot, curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
