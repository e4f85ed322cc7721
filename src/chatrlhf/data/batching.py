"""Records -> groups -> length-bucketed batches of padded tensors for reward models.

A *group* is a prompt with its K replies and their human ranks (0 = best): a pair is K = 2, a
ranking is one group, a scored sample is K = 1 with its score. Each reply is tokenised and
scored once per group; all pairs are formed from those scores in the loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from chatrlhf.data.records import Pair, Ranking, ScoredSample
from chatrlhf.data.tokenize import PairTemplate, encode_batch


@dataclass
class Group:
    prompt: object
    replies: list[str]
    ranks: list[int]
    margin: float | None = None
    scores: list[float] | None = None
    record_index: int = 0
    source: str = ""  # the data.train / data.dev source it came from (mixtures)
    weight: float = 1.0  # its weight in the loss (loss.length_balance), mean 1 per source
    # Filled by tokenize_groups: one token-id list (and segment-id list) per reply.
    input_ids: list[list[int]] = field(default_factory=list)
    token_type_ids: list[list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def to_groups(records: list, objective: str = "comparisons") -> list[Group]:
    """Canonical records -> groups for an objective ("comparisons" or "regression").

    For comparisons, scored samples of the same prompt become one ranking by score (equal
    scores are ties). For regression only scored samples are accepted.
    """
    groups = []
    scored = []
    for index, record in enumerate(records):
        if isinstance(record, Pair):
            if objective == "regression":
                raise ValueError("objective 'regression' needs scored samples; this data has comparison pairs")
            ranks = [0, 0] if record.tie else [0, 1]
            groups.append(Group(record.prompt, [record.chosen, record.rejected], ranks, record.margin,
                                record_index=index))
        elif isinstance(record, Ranking):
            if objective == "regression":
                raise ValueError("objective 'regression' needs scored samples; this data has rankings")
            groups.append(Group(record.prompt, list(record.replies), list(record.ranks), record_index=index))
        elif isinstance(record, ScoredSample):
            scored.append((index, record))
        else:
            raise TypeError(f"record {index}: not a canonical record: {type(record).__name__}")
    if objective == "regression":
        return [Group(r.prompt, [r.reply], [0], scores=[r.score], record_index=i) for i, r in scored]
    return groups + _rank_by_score(scored)


def _rank_by_score(scored: list) -> list[Group]:
    from chatrlhf.data.records import prompt_key

    by_prompt: dict[str, list] = {}
    for index, record in scored:
        by_prompt.setdefault(prompt_key(record.prompt), []).append((index, record))
    groups = []
    for members in by_prompt.values():
        if len(members) < 2:
            continue
        distinct = sorted({r.score for _, r in members}, reverse=True)
        groups.append(Group(members[0][1].prompt, [r.reply for _, r in members],
                            [distinct.index(r.score) for _, r in members],
                            scores=[r.score for _, r in members], record_index=members[0][0]))
    return groups


def tokenize_groups(groups: list[Group], tokenizer, max_length: int,
                    max_reply_tokens: int | None = None, same_prompt: bool = False) -> int:
    """Tokenise every reply of every group in place; returns how many replies were cut.

    ``same_prompt``: a group's replies keep the same prompt tokens when it is cut (training and
    evaluation: the replies are compared on the same context); otherwise each reply is encoded
    on its own, so its reward does not depend on the group it came with (scoring).
    """
    template = PairTemplate(tokenizer)
    prompts = [g.prompt for g in groups for _ in g.replies]
    replies = [reply for g in groups for reply in g.replies]
    ids = [i for i, g in enumerate(groups) for _ in g.replies] if same_prompt else None
    encoded = iter(encode_batch(tokenizer, prompts, replies, max_length, max_reply_tokens, template, ids))
    cut = 0
    for group in groups:
        items = [next(encoded) for _ in group.replies]
        group.input_ids = [e.input_ids for e in items]
        group.token_type_ids = [e.token_type_ids for e in items] if template.type_a is not None else None
        cut += sum(e.cut for e in items)
    return cut


def bucketed_batches(groups: list[Group], batch_size: int, seed: int, epoch: int,
                     bucket_batches: int = 50) -> list[list[int]]:
    """Indices of groups per batch: shuffled, then sorted by their longest reply within windows
    of ``bucket_batches`` batches so each batch has similar lengths (little padding), then the
    batches shuffled. Deterministic in (seed, epoch), which is what makes resume exact.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(groups)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: max(map(len, groups[i].input_ids)))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(groups: list[Group], pad_token_id: int) -> dict:
    """Pad the replies of a batch of groups into tensors (right padding).

    Returns input_ids / attention_mask (and token_type_ids) of shape (sum K, T), ranks (sum K,),
    group_sizes (list), margins (G,) or None, scores (sum K,) or None, weights (G,).
    """
    import torch  # here: the rest of chatrlhf.data, grouping included, runs without torch

    sequences = [ids for g in groups for ids in g.input_ids]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if groups[0].token_type_ids is not None:
        token_type_ids = torch.zeros_like(input_ids)
        for row, types in enumerate(t for g in groups for t in g.token_type_ids):
            token_type_ids[row, :len(types)] = torch.tensor(types)
        batch["token_type_ids"] = token_type_ids
    batch["ranks"] = torch.tensor([k for g in groups for k in g.ranks])
    batch["group_sizes"] = [len(g.replies) for g in groups]
    has_margin = any(g.margin is not None for g in groups)
    batch["margins"] = torch.tensor([g.margin or 0.0 for g in groups]) if has_margin else None
    has_scores = all(g.scores is not None for g in groups)
    batch["scores"] = torch.tensor([s for g in groups for s in g.scores]) if has_scores else None
    batch["weights"] = torch.tensor([g.weight for g in groups], dtype=torch.float32)
    return batch
