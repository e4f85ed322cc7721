"""(prompt, reply) -> token ids for reward models, under a max length.

When a sequence is too long the prompt is cut from the left (oldest turns first) because the
reply is what was judged; the reply keeps up to ``max_reply_tokens`` and is cut from the right
only beyond that. Replies of one group (``groups``) keep the same prompt tokens, the fewest any of
them keeps, so they are compared on the same context (and a decoder can run that prompt once for
all of them, see sharing.py). Special tokens follow the tokenizer's own pair template
(``[CLS] p [SEP] r [SEP]`` for BERT), so ``tokenizer(prompt_text, reply_text)`` in plain
transformers gives the same ids whenever nothing was cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.data.records import Prompt


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    prompt_tokens: int  # prompt tokens kept (with the special tokens before the reply)
    cut: bool  # whether anything was cut to fit max_length


def render(tokenizer, prompt: Prompt, reply: str) -> tuple[str, str]:
    """The prompt and reply as the two texts the model reads.

    A chat prompt uses the tokenizer's chat template when it has one (the reply is the rest of
    the rendered conversation after the generation prompt), else the HH-RLHF layout.
    """
    if isinstance(prompt, str):
        return prompt, reply if reply[:1].isspace() or not prompt else " " + reply
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reply}], tokenize=False
        )
        if whole.startswith(head):
            return head, whole[len(head):]
        return head, reply
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
    return turns + "\n\nAssistant:", " " + reply


class PairTemplate:
    """The special tokens a tokenizer puts around a (prompt, reply) pair, read off a probe."""

    def __init__(self, tokenizer):
        probe = tokenizer("a", "b")
        encoding = probe.encodings[0]
        sequence_ids = encoding.sequence_ids
        ids, types = probe["input_ids"], probe.get("token_type_ids")
        first_b = sequence_ids.index(1)
        last_a = max(i for i, s in enumerate(sequence_ids) if s == 0)
        first_a = sequence_ids.index(0)
        last_b = max(i for i, s in enumerate(sequence_ids) if s == 1)
        self.prefix, self.middle, self.suffix = ids[:first_a], ids[last_a + 1:first_b], ids[last_b + 1:]
        self.type_a = types[first_a] if types else None
        self.type_b = types[first_b] if types else None
        self.specials = len(self.prefix) + len(self.middle) + len(self.suffix)


def encode_batch(tokenizer, prompts: list[Prompt], replies: list[str], max_length: int,
                 max_reply_tokens: int | None = None, template: PairTemplate | None = None,
                 groups: list[int] | None = None) -> list[Encoded]:
    """Tokenise (prompt, reply) pairs; see the module docstring for the truncation rule.

    Args:
        max_length: total tokens including special tokens.
        max_reply_tokens: the reply's budget; defaults to 3/4 of what max_length leaves.
        groups: a group id per item; items of one group keep the same prompt tokens. None:
            each item keeps as much of its prompt as fits beside its own reply.
    """
    template = template or PairTemplate(tokenizer)
    room = max_length - template.specials
    if room < 2:
        raise ValueError(f"max_length {max_length} leaves no room beside {template.specials} special tokens")
    reply_budget = min(room - 1, max_reply_tokens or room * 3 // 4)
    texts = [render(tokenizer, p, r) for p, r in zip(prompts, replies)]
    # verbose=False: texts longer than the model's limit are expected here, they are cut below.
    prompt_ids = tokenizer([a for a, _ in texts], add_special_tokens=False, verbose=False)["input_ids"]
    reply_ids = tokenizer([b for _, b in texts], add_special_tokens=False, verbose=False)["input_ids"]
    b_keeps = [min(len(b), max(room - len(a), reply_budget)) for a, b in zip(prompt_ids, reply_ids)]
    a_keeps = [min(len(a), room - b_keep) for a, b_keep in zip(prompt_ids, b_keeps)]
    if groups is not None:
        fewest: dict[int, int] = {}
        for group, a_keep in zip(groups, a_keeps):
            fewest[group] = min(a_keep, fewest.get(group, a_keep))
        a_keeps = [fewest[group] for group in groups]
    out = []
    for a, b, a_keep, b_keep in zip(prompt_ids, reply_ids, a_keeps, b_keeps):
        cut = a_keep < len(a) or b_keep < len(b)
        ids = template.prefix + a[len(a) - a_keep:] + template.middle + b[:b_keep] + template.suffix
        head = len(template.prefix) + a_keep + len(template.middle)
        types = None
        if template.type_a is not None:
            types = [template.type_a] * head + [template.type_b] * (len(ids) - head)
        out.append(Encoded(ids, types, head, cut))
    return out
