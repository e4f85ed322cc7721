"""Causal-LM policies, shared by SFT, DPO, PPO and the LLM judge.

    model, tokenizer = load_policy("smollm2-135m", lora={"r": 8})
    encoded = encode_prompt_response(tokenizer, prompt, reply, max_length=256)
    batch = collate_lm([encoded, ...], tokenizer.pad_token_id)
    logps = sequence_logps(model, batch)           # (B,) sum of log p over the reply tokens

A prompt is plain text, an HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant:") or a chat. It is
turned into chat messages and rendered with the tokenizer's chat template when it has one, so an
instruct model reads what it was trained on; without a template the HH layout is used. The reply
carries the template's end-of-turn marker (or EOS), so a model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from chatrlhf import models
from chatrlhf.data.records import Prompt
from chatrlhf.dropout import use_fast_dropout
from chatrlhf.lora import use_fused_lora

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def load_policy(name_or_path: str, lora: dict | None = None, dtype=torch.float32,
                dropout: bool = False):
    """Load a causal LM (embedded short name, hub id, local folder, or a chatrlhf policy folder).

    Args:
        lora: None for full fine-tuning, or peft LoraConfig arguments (r, lora_alpha, ...).
            A folder saved with an ``adapter/`` subfolder is reloaded with its adapter.
        dropout: False sets the model's dropout to 0 (LoRA's own dropout is kept).
    Returns:
        (model, tokenizer); the tokenizer has a pad token (EOS when it had none). The model's
        dropout layers draw their coins faster on CPU (``chatrlhf.dropout``), and its LoRA layers
        run fused there (``chatrlhf.lora``).
    """
    path = models.resolve(name_or_path)
    tokenizer = models.load_tokenizer(name_or_path)
    adapter = Path(path) / models.ADAPTER_DIR
    base_path = models.read_metadata(path).get("base_model", path) if adapter.exists() else path
    model = AutoModelForCausalLM.from_pretrained(models.resolve(base_path), dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not dropout:
        models.disable_dropout(model)
    if adapter.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=lora is not None)
    elif lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **lora))
    use_fast_dropout(model)
    use_fused_lora(model)
    return model, tokenizer


def chat_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages: HH dialogues are split into turns, plain text is one user turn."""
    if isinstance(prompt, list):
        return prompt
    if not prompt.startswith(HUMAN):
        return [{"role": "user", "content": prompt}]
    text = prompt[: -len(ASSISTANT)] if prompt.endswith(ASSISTANT) else prompt
    messages = []
    for chunk in text.split(HUMAN)[1:]:
        user, *assistant = chunk.split(ASSISTANT)
        messages.append({"role": "user", "content": user.strip()})
        for turn in assistant:
            messages.append({"role": "assistant", "content": turn.strip()})
    return messages


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the policy continues: the chat-templated conversation with a generation prompt."""
    messages = chat_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages) + ASSISTANT


def render_reply(tokenizer, prompt: Prompt, reply: str) -> str:
    """The reply as the template writes it after the prompt, end-of-turn marker included."""
    if getattr(tokenizer, "chat_template", None):
        messages = chat_messages(prompt)
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                              tokenize=False)
        if whole.startswith(head):
            return whole[len(head):]
    return " " + reply + (tokenizer.eos_token or "")


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_tokens: int  # the first prompt_tokens ids are the prompt and carry no loss
    cut: bool  # whether anything was cut to fit max_length


def encode_prompt(tokenizer, prompt: Prompt, max_length: int) -> tuple[list[int], bool]:
    """Prompt ids for generation, cut from the left (oldest turns first) to ``max_length``."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def encode_prompt_response(tokenizer, prompt: Prompt, reply: str, max_length: int,
                           max_reply_tokens: int | None = None) -> Encoded:
    """Prompt + reply ids under ``max_length``: the prompt is cut from the left; the reply keeps up
    to ``max_reply_tokens`` (default 3/4 of max_length) and is cut from the right beyond that,
    as for reward models (data/tokenize.py)."""
    return encode_group(tokenizer, prompt, [reply], max_length, max_reply_tokens)[0]


def encode_group(tokenizer, prompt: Prompt, replies: list[str], max_length: int,
                 max_reply_tokens: int | None = None) -> list[Encoded]:
    """Each reply after the same prompt, as ``encode_prompt_response`` encodes one, but the prompt
    cut alike for all of them (to what the longest kept reply leaves), so the group's sequences
    share it token for token and its forward runs once (``sharing.policy_logps``)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    budget = min(max_length - 1, max_reply_tokens or max_length * 3 // 4)
    reply_ids = [tokenizer(render_reply(tokenizer, prompt, r), add_special_tokens=False)["input_ids"] for r in replies]
    reply_keep = [min(len(ids), max(max_length - len(prompt_ids), budget)) for ids in reply_ids]
    prompt_keep = min(len(prompt_ids), max_length - max(reply_keep))
    return [Encoded(prompt_ids[len(prompt_ids) - prompt_keep:] + ids[:keep], prompt_keep,
                    keep < len(ids) or prompt_keep < len(prompt_ids)) for ids, keep in zip(reply_ids, reply_keep)]


def collate_lm(items: list[Encoded], pad_token_id: int) -> dict:
    """Right-padded (B, T) input_ids and attention_mask, and loss_mask marking the reply tokens."""
    width = max(len(e.input_ids) for e in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    loss_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, e in enumerate(items):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, :len(e.input_ids)] = 1
        loss_mask[row, e.prompt_tokens:len(e.input_ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | < t) for t >= 1, from logits (B, T, V): shape (B, T - 1).

    Written as gather minus logsumexp so the (B, T, V) log-softmax is never materialised.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:, None]
    return logits.gather(-1, targets)[..., 0] - logits.logsumexp(-1)


def sequence_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """(B,) sum (or mean, ``average=True``) of the reply tokens' log-probabilities."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["loss_mask"][:, 1:].to(logits.dtype)
    per_token = token_logps(logits, batch["input_ids"]) * mask
    total = per_token.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
