"""Chat-templated text read back into messages, so a reward model can score a policy's rollout in
its own format.

OpenRLHF sends its remote reward model each rollout as one string: the policy's chat-templated
prompt followed by the sampled reply, decoded with the special tokens (``openrlhf/utils/agent.py``,
``SingleTurnAgentExecutor``: ``query = decode(prompt_ids + reply_ids, skip_special_tokens=False)``),
and the templated prompt beside it. ``split_query`` cuts the query after its prompt, reads the
prompt's markup back into messages and takes the end-of-turn and EOS tokens off the reply:

    >>> split_query("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>",
    ...             "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n")
    Split(prompt=[{'role': 'user', 'content': 'Hi'}], reply='Hello!', format='ChatML')

Known markup: ChatML (``<|im_start|>role\\n...<|im_end|>``: SmolLM, Qwen, OpenHermes), Llama 3
(``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``), Gemma
(``<start_of_turn>user\\n...<end_of_turn>``, "model" read as "assistant"), Mistral
(``[INST] ... [/INST] ...</s>``; a system prompt its template merged into a user turn stays there)
and the HH-RLHF text (``\\n\\nHuman: ... \\n\\nAssistant:``), which stays text: the HH reader
trains on it as text, so its reward equals ``chatrlhf reward score``'s on the same data. Anything
else raises ``UnknownMarkup``: scoring it as plain text would hand the reward model another
template's tokens as words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Tokens that may open a templated prompt (BOS), or pad a decoded batch on the left.
LEADING_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<pad>", "[PAD]", "<|pad|>",
                  "<|endoftext|>", "<|finetune_right_pad_id|>")
# Tokens that may close a sampled reply: each format's end of turn, EOS tokens and padding.
TRAILING_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                   "<end_of_turn>", "<eos>", "</s>", "<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
ROLE = re.compile(r"[A-Za-z_][\w-]{0,31}")


class UnknownMarkup(ValueError):
    """A prompt or query in no markup ``split_query`` can read back."""


@dataclass
class Split:
    prompt: str | list[dict]  # chat messages, or the HH text as the HH reader keeps it
    reply: str
    format: str


@dataclass(frozen=True)
class Turns:
    """Markup that writes each message as ``start + role + role_end + content + end``."""

    name: str
    start: str
    role_end: str
    end: str
    assistant: str = "assistant"  # the role name the template writes for the assistant
    trim: bool = False  # the template trims contents (Llama 3, Gemma): the reply is trimmed too

    def parse(self, text: str) -> tuple[list[dict], str]:
        """A prompt -> (its messages, the text already in the open assistant turn)."""
        head, *chunks = text.split(self.start)
        if _lstrip_tokens(head, LEADING_TOKENS).strip() or not chunks:
            raise UnknownMarkup(f"{self.name} prompt with text before its first turn: {head[:40]!r}")
        messages = []
        for i, chunk in enumerate(chunks):
            role, found, rest = chunk.partition(self.role_end)
            if not found or not ROLE.fullmatch(role):
                raise UnknownMarkup(f"{self.name} turn {i} has no role header: {chunk[:40]!r}")
            if i == len(chunks) - 1:
                if role != self.assistant or self.end in rest:
                    raise UnknownMarkup(f"{self.name} prompt does not end with an open {self.assistant!r} "
                                        "turn (the generation prompt)")
                return messages, rest
            content, found, after = rest.partition(self.end)
            if not found or after.strip():
                raise UnknownMarkup(f"{self.name} turn {i} ({role}) is not closed by {self.end}")
            messages.append({"role": "assistant" if role == self.assistant else role,
                             "content": content.strip() if self.trim else content})
        raise AssertionError("unreachable")

    def open_turn(self) -> str:
        return self.start + self.assistant + self.role_end


class Mistral:
    """``<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`` (v0.1 to v0.3 and Mixtral; a
    ``[SYSTEM_PROMPT]`` block, as later templates write it, becomes the system message)."""

    name, trim = "Mistral", True

    @staticmethod
    def parse(text: str) -> tuple[list[dict], str]:
        body = _lstrip_tokens(text, LEADING_TOKENS).lstrip()
        messages = []
        if body.startswith("[SYSTEM_PROMPT]"):
            system, found, body = body[len("[SYSTEM_PROMPT]"):].partition("[/SYSTEM_PROMPT]")
            if not found:
                raise UnknownMarkup("Mistral [SYSTEM_PROMPT] is not closed")
            messages.append({"role": "system", "content": system.strip()})
        head, *chunks = body.split("[INST]")
        if head.strip() or not chunks:
            raise UnknownMarkup(f"Mistral prompt with text before its first [INST]: {head[:40]!r}")
        for i, chunk in enumerate(chunks):
            user, found, answer = chunk.partition("[/INST]")
            if not found:
                raise UnknownMarkup(f"Mistral turn {i} has no [/INST]")
            messages.append({"role": "user", "content": user.strip()})
            if i == len(chunks) - 1:
                return messages, answer
            messages.append({"role": "assistant", "content": _rstrip_tokens(answer, ("</s>",)).strip()})
        raise AssertionError("unreachable")

    @staticmethod
    def open_turn() -> str:
        return "[/INST]"


class HH:
    """Anthropic HH-RLHF text: kept as text, split after its last "\\n\\nAssistant:"."""

    name, trim, MARK = "HH", False, "\n\nAssistant:"

    @classmethod
    def parse(cls, text: str) -> tuple[str, str]:
        body = _lstrip_tokens(text, LEADING_TOKENS)
        cut = body.rfind(cls.MARK)
        if cut < 0 or body[cut + len(cls.MARK):].strip() or "Human:" not in body[:cut]:
            raise UnknownMarkup("HH prompt does not end with \\n\\nAssistant:")
        return body[:cut + len(cls.MARK)], body[cut + len(cls.MARK):]

    @classmethod
    def open_turn(cls) -> str:
        return cls.MARK


CHATML = Turns("ChatML", "<|im_start|>", "\n", "<|im_end|>")
LLAMA3 = Turns("Llama 3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", trim=True)
GEMMA = Turns("Gemma", "<start_of_turn>", "\n", "<end_of_turn>", assistant="model", trim=True)
# Each format with the marker that gives it away; the one found first in a text is its format.
FORMATS = [(CHATML, "<|im_start|>"), (LLAMA3, "<|start_header_id|>"), (GEMMA, "<start_of_turn>"),
           (Mistral, "[INST]"), (HH, "Human:")]
NAMES = ", ".join(f.name for f, _ in FORMATS)


def detect(text: str):
    """The format whose marker comes first in ``text``, or None."""
    found = [(text.find(marker), fmt) for fmt, marker in FORMATS if marker in text]
    return min(found, key=lambda pair: pair[0])[1] if found else None


def split_query(query: str, prompt: str | None = None, extra_tokens: tuple[str, ...] = ()) -> Split:
    """A rollout -> (prompt, reply) in the form a reward model reads.

    Args:
        query: the prompt followed by the reply, as decoded with special tokens; left padding
            and trailing end-of-turn / EOS / padding tokens are allowed.
        prompt: the chat-templated prompt the query starts with (OpenRLHF's ``prompts[i]``);
            differences in whitespace only are tolerated (SentencePiece decoding may move
            spaces). None: the query is split at its last open assistant turn, which a reply
            that itself writes a turn header would confuse.
        extra_tokens: more tokens to take off the reply's end (the reward tokenizer's own).
    Returns:
        ``Split``: the prompt as messages (HH: its text), the reply, the format's name.
    Raises:
        UnknownMarkup: the query does not start with its prompt, or the markup is not known.
    """
    query = _lstrip_tokens(query, LEADING_TOKENS)
    if prompt is not None:
        prompt = _lstrip_tokens(prompt, LEADING_TOKENS)
        end = _prefix_end(query, prompt)
        if end is None:
            raise UnknownMarkup("the query does not start with its prompt (prompts[i])")
        rest = query[end:]
    else:
        fmt = detect(query)
        cut = query.rfind(fmt.open_turn()) if fmt else -1
        if cut < 0:
            raise UnknownMarkup(f"no chat markup found; known: {NAMES}")
        prompt, rest = query[:cut + len(fmt.open_turn())], query[cut + len(fmt.open_turn()):]
    fmt = detect(prompt)
    if fmt is None:
        raise UnknownMarkup(f"the prompt is in no known chat markup ({NAMES}): {prompt[:60]!r}")
    messages, prefill = fmt.parse(prompt)
    reply = _rstrip_tokens(prefill + rest, TRAILING_TOKENS + tuple(extra_tokens))
    if fmt is HH:
        reply = reply[1:] if reply.startswith(" ") else reply  # the one separating space, as the HH reader
    elif fmt.trim:
        reply = reply.strip()
    return Split(messages, reply, fmt.name)


def _prefix_end(text: str, prefix: str) -> int | None:
    """Where ``prefix`` ends in ``text`` if ``text`` starts with it, whitespace aside."""
    if text.startswith(prefix):
        return len(prefix)
    i = 0
    for char in prefix:
        if char.isspace():
            continue
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text) or text[i] != char:
            return None
        i += 1
    if prefix[-1:].isspace():  # the prompt's closing newline(s) belong to it, not to the reply
        while i < len(text) and text[i].isspace():
            i += 1
    return i


def _lstrip_tokens(text: str, tokens: tuple[str, ...]) -> str:
    while True:
        stripped = text.lstrip()
        token = next((t for t in tokens if t and stripped.startswith(t)), None)
        if token is None:
            return text
        text = stripped[len(token):]


def _rstrip_tokens(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` without the tokens (and the whitespace after them) at its end; whitespace
    before the first of them is the reply's own and stays."""
    while True:
        stripped = text.rstrip()
        token = next((t for t in tokens if t and stripped.endswith(t)), None)
        if token is None:
            return text
        text = stripped[:-len(token)]
