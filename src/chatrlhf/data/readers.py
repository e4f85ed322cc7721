"""One reader per source format, each turning one raw row (a dict) into canonical records.

A reader is a plain function ``reader(row, notes, **options) -> list[Record]``: it raises
``Invalid`` for a bad row and counts anything it leaves out on purpose in ``notes`` (e.g. unranked
replies), so that nothing is dropped silently. Readers never see a file: opening files, line
numbers and collecting errors is ``chatrlhf.data.load``'s job.

Sources (``READERS``): chatrlhf (own format), pairs (generic / TRL / OpenRLHF), hh (Anthropic
HH-RLHF), oasst (OpenAssistant trees), pandalm, dialsummeval, unieval, chatllama, shp.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import MISSING
from dataclasses import fields as dataclass_fields

from chatrlhf.data.records import KINDS, Pair, Ranking, Record, ScoredSample
from chatrlhf.data.validation import Invalid, describe, get, messages, number, text

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def read_chatrlhf(row: dict, notes: Counter) -> list[Record]:
    """The project's own format: one ``to_dict(record)`` per row, ``kind`` names the record type."""
    kind = get(row, "kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise Invalid("kind", f"one of {sorted(KINDS)}", describe(kind), "wrong type")
    record_type = KINDS[kind]
    values = {}
    for spec in dataclass_fields(record_type):
        # Table formats (Parquet) hold the columns of every kind; the other kinds' are null.
        if row.get(spec.name) is not None:
            values[spec.name] = row[spec.name]
    meta = values.get("meta", {})
    if isinstance(meta, str):  # Parquet stores meta as JSON text, see save()
        try:
            meta = json.loads(meta)
        except ValueError:
            raise Invalid("meta", "an object (or its JSON text)", describe(meta), "wrong type") from None
    if not isinstance(meta, dict):
        raise Invalid("meta", "an object", describe(meta), "wrong type")
    values["meta"] = meta
    if "tie" in values and not isinstance(values["tie"], bool):
        raise Invalid("tie", "true or false", describe(values["tie"]), "wrong type")
    try:
        return [record_type(**values)]
    except TypeError:
        required = [f.name for f in dataclass_fields(record_type) if f.name not in values
                    and f.default is MISSING and f.default_factory is MISSING]
        raise Invalid(required[0] if required else None, "a field of that name", "none",
                      "missing field") from None


def read_pairs(row: dict, notes: Counter) -> list[Record]:
    """Generic pairs (TRL, OpenRLHF): ``prompt``, ``chosen``, ``rejected``, optional ``margin``.

    Values are text or chats (lists of {role, content}). When ``chosen`` and ``rejected`` are chats,
    each reply is its last (assistant) message and everything before it, identical in both, is
    appended to the prompt; with no ``prompt`` field that shared history *is* the prompt.
    """
    chosen, rejected = get(row, "chosen"), get(row, "rejected")
    prompt = row.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen_chat, rejected_chat = messages(chosen, "chosen"), messages(rejected, "rejected")
        if chosen_chat[:-1] != rejected_chat[:-1]:
            raise Invalid("rejected", "the same messages as 'chosen' before the last one",
                          "a different conversation", "different conversations")
        for field, chat in (("chosen", chosen_chat), ("rejected", rejected_chat)):
            if chat[-1]["role"] != "assistant":
                raise Invalid(field, "a chat ending with an assistant message",
                              f"a last message with role {chat[-1]['role']!r}", "wrong type")
        history = chosen_chat[:-1]
        if prompt is None:
            if not history:
                raise Invalid("prompt", "a prompt, or chats with messages before the reply",
                              "none", "missing field")
            prompt = history
        elif history:
            prompt = (messages(prompt, "prompt") if isinstance(prompt, list)
                      else [{"role": "user", "content": prompt}]) + history
        chosen, rejected = chosen_chat[-1]["content"], rejected_chat[-1]["content"]
    else:
        chosen, rejected = text(row, "chosen", True), text(row, "rejected", True)
        if prompt is None:
            get(row, "prompt")  # raises "missing field"
    if isinstance(prompt, list):
        prompt = messages(prompt, "prompt")
    elif not isinstance(prompt, str):
        raise Invalid("prompt", "a string or a list of messages", describe(prompt), "wrong type")
    margin = number(row, "margin", optional=True)
    return [Pair(prompt, chosen, rejected, margin=margin)]


def read_hh(row: dict, notes: Counter) -> list[Record]:
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` are whole dialogues "\\n\\nHuman: ...".

    The prompt is the shared text up to and including the last shared "\\n\\nAssistant:", kept
    exactly as in the file (it ends with "\\n\\nAssistant:"). Each reply is the rest with the one
    separating space removed, so ``prompt + " " + reply`` gives back the file's dialogue.
    """
    chosen, rejected = text(row, "chosen"), text(row, "rejected")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise Invalid("chosen", f"dialogues sharing turns up to {ASSISTANT!r}",
                      describe(chosen), "not an HH dialogue")
    prompt = chosen[: cut + len(ASSISTANT)]
    replies = []
    for field, dialogue in (("chosen", chosen), ("rejected", rejected)):
        reply = dialogue[len(prompt):]
        reply = reply[1:] if reply.startswith(" ") else reply
        if HUMAN in reply:
            # The two dialogues differ before the last turn: the reply would swallow later
            # turns, so this is not the one-reply comparison the format promises.
            raise Invalid(field, "dialogues differing only in the last assistant reply",
                          "a reply followed by another Human turn", "not an HH dialogue")
        replies.append(reply)
    return [Pair(prompt, replies[0], replies[1])]


def read_oasst(row: dict, notes: Counter) -> list[Record]:
    """OpenAssistant message trees: each group of sibling assistant replies with >= 2 ranked.

    The prompt is the chat down to the parent (roles "prompter" -> "user", "assistant"). Ranks are
    renumbered 0, 1, ... in the file's order, since unranked or removed siblings leave gaps.
    Unranked replies in a group, groups with fewer than two ranked replies and ranked groups of
    user turns are counted in ``notes``; the walk goes on into every child.
    """
    root = get(row, "prompt")
    if not isinstance(root, dict):
        raise Invalid("prompt", "a message tree (an object)", describe(root), "wrong type")
    rankings: list[Record] = []
    stack = [(root, [], "prompt")]
    while stack:
        node, history, path = stack.pop()
        role = get(node, "role") if isinstance(node, dict) else None
        if role not in ("prompter", "assistant"):
            raise Invalid(f"{path}.role", "'prompter' or 'assistant'", describe(role), "wrong type")
        chat = history + [{"role": "user" if role == "prompter" else "assistant",
                           "content": text(node, "text", True)}]
        children = node.get("replies") or []
        if not isinstance(children, list):
            raise Invalid(f"{path}.replies", "a list", describe(children), "wrong type")
        for i, child in enumerate(children):
            stack.append((child, chat, f"{path}.replies[{i}]"))
        for i, child in enumerate(children):
            if not isinstance(child, dict):
                raise Invalid(f"{path}.replies[{i}]", "a message (an object)", describe(child), "wrong type")
        if len(children) < 2:
            continue  # a lone reply is a continuation, not a comparison: nothing left out
        ranked = [c for c in children if c.get("rank") is not None]
        if len(ranked) < len(children):
            notes["unranked replies left out"] += len(children) - len(ranked)
        if len(ranked) == 1:
            notes["replies ranked alone left out"] += 1
        if len(ranked) < 2:
            continue
        if role == "assistant":
            notes["ranked groups of user turns left out"] += 1
            continue
        for child in ranked:
            if isinstance(child["rank"], bool) or not isinstance(child["rank"], int):
                raise Invalid(f"{path}.replies[].rank", "an integer or null",
                              describe(child["rank"]), "wrong type")
        order = sorted({c["rank"] for c in ranked})
        rankings.append(Ranking(
            prompt=chat,
            replies=[text(c, "text", True) for c in ranked],
            ranks=[order.index(c["rank"]) for c in ranked],
            meta={"message_tree_id": row.get("message_tree_id"),
                  "message_ids": [c.get("message_id") for c in ranked]},
        ))
    return rankings


def read_pandalm(row: dict, notes: Counter) -> list[Record]:
    """PandaLM test set: two responses judged by three annotators ("0" tie, "1" / "2" better).

    The outcome is the strict majority of the votes present (2 of 3; both, if one is missing);
    without a majority, or when the majority says "0", the pair is a tie. ``meta["agreement"]`` is
    the fraction of present annotators that voted for the outcome. Prompt = instruction, plus
    "\\n\\n" + input when there is an input.
    """
    instruction = text(row, "instruction", True)  # may be blank when the input says it all
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise Invalid("input", "a string", describe(extra), "wrong type")
    prompt = instruction + (f"\n\n{extra}" if extra else "")
    responses = [text(row, "response1", True), text(row, "response2", True)]
    votes = []
    for field in ("annotator1", "annotator2", "annotator3"):
        vote = row.get(field)
        if vote is None:
            continue  # missing (NaN read as missing): the others vote
        if str(vote) not in ("0", "1", "2") or isinstance(vote, bool):
            raise Invalid(field, '"0" (tie), "1" or "2"', describe(vote), "wrong type")
        votes.append(int(vote))
    if not votes:
        raise Invalid("annotator1", "at least one annotator's vote", "none", "missing field")
    top, count = Counter(votes).most_common(1)[0]
    outcome = top if count * 2 > len(votes) else 0
    meta = {"idx": row.get("idx"), "cmp_key": row.get("cmp_key"), "votes": votes,
            "agreement": votes.count(outcome) / len(votes)}
    if outcome == 0:
        return [Pair(prompt, responses[0], responses[1], tie=True, meta=meta)]
    chosen = responses[outcome - 1]
    return [Pair(prompt, chosen, responses[2 - outcome], meta=meta)]


DIALSUMMEVAL_ASPECTS = ("consistency", "relevance", "fluency", "coherence")


def read_dialsummeval(row: dict, notes: Counter, aspects="all") -> list[Record]:
    """DialSummEval: a summary of a dialogue scored 1-5 by 3 raters on four aspects.

    ``aspects`` ("all", one name, or a comma-separated list) picks the aspects averaged into each
    rater's score; ``score`` is the mean over raters. The default averages all four, the closest
    to "how good is this summary" without preferring one aspect.
    """
    chosen_aspects = _names(aspects, DIALSUMMEVAL_ASPECTS)
    annotations = get(row, "annotations")
    if not isinstance(annotations, list) or not annotations:
        raise Invalid("annotations", "a non-empty list", describe(annotations), "wrong type")
    rater_scores = []
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise Invalid(f"annotations[{i}]", "an object", describe(annotation), "wrong type")
        values = [number(annotation, a) for a in chosen_aspects]
        rater_scores.append(sum(values) / len(values))
    return [ScoredSample(
        prompt=text(row, "dialogue"), reply=text(row, "summary", True),
        score=sum(rater_scores) / len(rater_scores), rater_scores=rater_scores,
        meta={"id": row.get("id"), "model_id": row.get("model_id"), "aspects": chosen_aspects},
    )]


def read_unieval(row: dict, notes: Counter, aspect="overall") -> list[Record]:
    """UniEval dialogue data (Topical-Chat): a response with averaged human ratings.

    The prompt is ``source``, the dialogue history; ``context`` is the knowledge fact the response
    may use, kept in ``meta`` (it is not what the user said). ``score`` = ``scores[aspect]``.
    """
    scores = get(row, "scores")
    if not isinstance(scores, dict):
        raise Invalid("scores", "an object of aspect scores", describe(scores), "wrong type")
    return [ScoredSample(
        prompt=text(row, "source"), reply=text(row, "system_output", True),
        score=number(scores, aspect),
        meta={"system_id": row.get("system_id"), "context": row.get("context"),
              "aspect": aspect},
    )]


def read_chatllama(row: dict, notes: Counter) -> list[Record]:
    """ChatLLaMA reward data: ``user_input``, ``completion``, ``score`` (null = not yet scored)."""
    prompt, reply = text(row, "user_input"), text(row, "completion", True)
    if get(row, "score") is None:
        notes["unscored samples left out"] += 1
        return []
    return [ScoredSample(prompt, reply, number(row, "score"))]


def read_shp(row: dict, notes: Counter) -> list[Record]:
    """Stanford SHP: ``history`` with two Reddit replies, ``labels`` = 1 when A is preferred.

    ``margin`` stays None: vote counts are not on the scale of a reward difference. The SHP paper's
    strength signal, the score ratio (chosen / rejected votes), is kept in ``meta``.
    """
    prompt = text(row, "history")
    replies = {"A": text(row, "human_ref_A", True), "B": text(row, "human_ref_B", True)}
    label = get(row, "labels")
    if label not in (0, 1) or isinstance(label, bool):
        raise Invalid("labels", "1 (A preferred) or 0 (B preferred)", describe(label), "wrong type")
    best, other = ("A", "B") if label == 1 else ("B", "A")
    score_best = number(row, f"score_{best}", optional=True)
    score_other = number(row, f"score_{other}", optional=True)
    ratio = score_best / score_other if score_best is not None and score_other else None
    meta = {"post_id": row.get("post_id"), "domain": row.get("domain"),
            "score_chosen": score_best, "score_rejected": score_other, "score_ratio": ratio}
    return [Pair(prompt, replies[best], replies[other], meta=meta)]


def _names(value, allowed: tuple[str, ...]) -> list[str]:
    """An option naming one or more of ``allowed``: "all", "a,b" or a list."""
    if value == "all":
        return list(allowed)
    names = value.split(",") if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown aspect(s) {unknown}; choose from {list(allowed)} or 'all'")
    return names


READERS = {
    "chatrlhf": read_chatrlhf,
    "pairs": read_pairs,
    "hh": read_hh,
    "oasst": read_oasst,
    "pandalm": read_pandalm,
    "dialsummeval": read_dialsummeval,
    "unieval": read_unieval,
    "chatllama": read_chatllama,
    "shp": read_shp,
}


def _is_hh(row: dict) -> bool:
    return "prompt" not in row and all(
        isinstance(row.get(f), str) and row[f].startswith(HUMAN) for f in ("chosen", "rejected"))


# What a first row looks like in each source; auto-detection needs exactly one match.
SIGNATURES = {
    "chatrlhf": lambda row: "kind" in row,
    "oasst": lambda row: "message_tree_id" in row or isinstance(row.get("prompt"), dict),
    "pandalm": lambda row: {"response1", "response2", "annotator1"} <= row.keys(),
    "dialsummeval": lambda row: {"dialogue", "summary", "annotations"} <= row.keys(),
    "unieval": lambda row: {"system_output", "scores"} <= row.keys(),
    "chatllama": lambda row: {"user_input", "completion"} <= row.keys(),
    "shp": lambda row: {"human_ref_A", "human_ref_B", "labels"} <= row.keys(),
    "hh": _is_hh,
    "pairs": lambda row: ({"chosen", "rejected"} <= row.keys() and "kind" not in row
                          and not _is_hh(row)),
}


def detect(row: dict, source: str) -> str:
    """The reader whose signature the first row matches; ValueError if none or several do."""
    matches = [name for name, matches in SIGNATURES.items() if matches(row)]
    if len(matches) == 1:
        return matches[0]
    found = f"fields {sorted(map(str, row))[:12]}"
    if matches:
        raise ValueError(f"{source}: the {found} fit several readers {matches}; "
                         f"choose one with --reader NAME")
    raise ValueError(f"{source}: cannot tell the format from the first record's {found}; "
                     f"choose one with --reader NAME ({', '.join(READERS)}), and map columns "
                     f"with --field canonical=column if needed")
