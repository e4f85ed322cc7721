"""Reward-model losses: pure functions, tensors in, per-example losses out.

Everything a reward model learns from is a *group*: a prompt with K >= 1 replies. A comparison
pair is a group of K = 2 with ranks [0, 1] (or [0, 0] for a tie); a K-wise ranking is one group;
a scored sample for regression is a group of K = 1. Replies are scored once per group and all
C(K, 2) pairs are formed from those K rewards, so the cost grows with K, not K^2.

Ties use the Davidson (1970) extension of Bradley-Terry. With d = r_i - r_j and tie parameter
nu >= 0:
    P(i > j) = e^{d/2} / (e^{d/2} + e^{-d/2} + nu),   P(tie) = nu / (e^{d/2} + e^{-d/2} + nu).
With nu = 0 this is exactly Bradley-Terry, P(i > j) = sigmoid(d), and ties have probability 0.
Davidson was chosen over Rao-Kupper because a tie's likelihood peaks at d = 0 for any nu, so a
tie pulls the two rewards together, and nu = 0 gives back the plain pairwise loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise loss -log sigmoid(r_chosen - r_rejected - margin).

    Args:
        chosen_rewards, rejected_rewards: (N,) rewards of the preferred and the other reply.
        margin: optional (N,) non-negative margins from the data (Llama 2, arXiv 2307.09288,
            eq. 2): the chosen reward must beat the rejected one by at least this much.
    Returns:
        (N,) per-pair losses.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def davidson_log_probs(diff: torch.Tensor, nu: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(i beats j) and log P(tie) under the Davidson model, for d = r_i - r_j.

    Args:
        diff: (...) reward differences r_i - r_j.
        nu: tie parameter >= 0; nu = 0 is Bradley-Terry (log P(tie) = -inf). A 0-dim tensor
            nu > 0 (e.g. exp of a learned log nu, ``loss.tie_nu=learn``) gets gradients.
    """
    half = diff / 2
    terms = [half, -half]
    if torch.is_tensor(nu):
        log_nu = nu.log().to(diff.dtype)
        terms.append(log_nu.expand_as(diff))
    elif nu > 0:
        log_nu = math.log(nu)
        terms.append(torch.full_like(diff, log_nu))
    else:
        log_nu = -math.inf
    log_norm = torch.logsumexp(torch.stack(terms), dim=0)
    return half - log_norm, log_nu - log_norm


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, group_sizes: list[int],
                 margins: torch.Tensor | None = None, tie_nu: float | torch.Tensor = 0.0) -> torch.Tensor:
    """K-wise ranking loss of InstructGPT (arXiv 2203.02155, eq. 1), with margins and ties.

    For a group of K replies, every unordered pair {i, j} contributes -log P(observed outcome):
    -log P(i beats j) when rank_i < rank_j (0 is best), -log P(tie) when the ranks are equal
    (Davidson, see the module docstring). The group's loss is the mean over its C(K, 2) pairs,
    so every prompt weighs the same whatever its K.

    Args:
        rewards: (sum K,) one reward per reply, groups laid out one after another.
        ranks: (sum K,) rank of each reply within its group, 0 = best, equal = tie.
        group_sizes: K of each group, each >= 2.
        margins: optional (G,) margin per group, subtracted from d on every strict pair.
        tie_nu: Davidson tie parameter (a float, or a 0-dim tensor to learn it); must be > 0 if
            any group has a tie.
    Returns:
        (G,) per-group losses.
    """
    if min(group_sizes) < 2:
        raise ValueError(f"ranking_loss needs groups of at least 2 replies, got sizes {group_sizes}")
    # Pad groups into a (G, Kmax) grid so all pairs of all groups are one tensor operation.
    sizes = torch.tensor(group_sizes, device=rewards.device)
    k_max = int(sizes.max())
    valid = torch.arange(k_max, device=rewards.device)[None, :] < sizes[:, None]
    grid_rewards = rewards.new_zeros(valid.shape).masked_scatter(valid, rewards)
    grid_ranks = ranks.new_zeros(valid.shape).masked_scatter(valid, ranks)
    diff = grid_rewards[:, :, None] - grid_rewards[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    wins = both & (grid_ranks[:, :, None] < grid_ranks[:, None, :])
    upper = torch.ones(k_max, k_max, dtype=torch.bool, device=rewards.device).triu(1)
    ties = both & (grid_ranks[:, :, None] == grid_ranks[:, None, :]) & upper
    if margins is not None:
        diff = diff - margins[:, None, None] * wins
    log_win, log_tie = davidson_log_probs(diff, tie_nu)
    if bool(ties.any()) and tie_nu <= 0:
        raise ValueError("the data has ties: model them with tie_nu > 0 or drop them")
    zero = torch.zeros_like(diff)
    pair_losses = -torch.where(wins, log_win, zero) - torch.where(ties, log_tie, zero)
    num_pairs = sizes * (sizes - 1) / 2
    return pair_losses.sum(dim=(1, 2)) / num_pairs


def score_regression_loss(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Absolute-score regression, the legacy approach: (r - score)^2, shape (N,)."""
    return (rewards - scores) ** 2


def centering_loss(rewards: torch.Tensor, group_sizes: list[int], coefficient: float) -> torch.Tensor:
    """Reward centering (Eisenstein et al., arXiv 2312.09244, as TRL's ``center_rewards_coefficient``):
    coefficient * (r_i + r_j)^2 for a pair, keeping each pair's rewards summing near zero;
    rewards are only defined up to a constant by comparisons, and this fixes the constant
    without touching the margin r_i - r_j the ranking loss sees. For a group of K replies the
    term is the mean over its C(K, 2) pairs, each pair weighted as ``ranking_loss`` weighs it.

    Args:
        rewards: (sum K,) one reward per reply, groups laid out one after another.
        group_sizes: K of each group, each >= 2.
    Returns:
        (G,) per-group terms. E.g. a pair (2, -1) with coefficient 0.1: 0.1 * 1^2 = 0.1.
    """
    terms = []
    for group in rewards.split(list(group_sizes)):
        i, j = torch.triu_indices(len(group), len(group), 1, device=rewards.device)
        terms.append(((group[i] + group[j]) ** 2).mean())
    return coefficient * torch.stack(terms)


# ==== DPO family: preference losses on policy / reference log-probabilities ====================
#
# Each reply y has a log-ratio log pi(y|x) - log pi_ref(y|x) (summed over the reply's tokens) and an
# *implicit reward* u = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, arXiv 2305.18290, eq. 5). The
# losses below take the four (or 2 x sum K) log-probabilities and return per-example losses; the
# recipe (recipes/dpo.py) computes the log-probabilities, metrics.py the accuracies.


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO (arXiv 2305.18290, eq. 7), and conservative DPO with ``label_smoothing > 0``.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
    eps = 0 is DPO. eps > 0 is cDPO (Mitchell, "A note on DPO with noisy preferences", 2023; the
    form used by TRL): the label is taken to be flipped with probability eps, so the loss has a
    finite minimiser instead of pushing h to infinity.

    Args:
        policy_chosen_logps, policy_rejected_logps: (N,) summed reply log-probs under the policy.
        reference_chosen_logps, reference_rejected_logps: (N,) the same under the reference.
        beta: KL strength (larger keeps the policy closer to the reference).
        label_smoothing: eps in [0, 0.5).
    Returns:
        (N,) per-pair losses.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected in [0, 0.5), found {label_smoothing}")
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al., arXiv 2310.12036, eq. 17): loss = (h - 1 / (2 * beta))^2, h as in dpo_loss.

    A squared loss regresses h to a finite target 1 / (2 tau) (tau = beta), so the policy is not
    driven to deterministic preferences the way the sigmoid loss can drive it. TRL feeds IPO the
    per-token *mean* log-probabilities; pass those if you want its behaviour (dpo.average_logps).

    Args: as dpo_loss, (N,) each. Returns: (N,) per-pair losses.
    """
    if beta <= 0:
        raise ValueError(f"beta: expected > 0, found {beta}")
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def plackett_luce_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, ranks: torch.Tensor,
                       group_sizes: list[int], beta: float = 0.1) -> torch.Tensor:
    """K-wise DPO under the Plackett-Luce model (arXiv 2305.18290, appendix A.3, eq. 18).

    With implicit rewards u_i = beta * (log pi(y_i) - log pi_ref(y_i)) and the replies in rank
    order tau(1), ..., tau(K) (best first), the negative log-likelihood of the whole ranking is
        loss = -sum_{k=1..K} [ u_tau(k) - log sum_{j=k..K} exp(u_tau(j)) ],
    one term per position, each choosing the best of the replies not yet placed. The ranking is
    used as one ordering, not flattened into C(K, 2) pairs. With K = 2 it is exactly sigmoid DPO.

    Ties (equal ranks) use Breslow's (1974) approximation, the standard one for tied events in a
    Cox partial likelihood, which has the same form: every reply i contributes
    u_i - log sum_{j: rank_j >= rank_i} exp(u_j), i.e. tied replies share one set of competitors
    (themselves included). Without ties this is the formula above; a tied pair [0, 0] gives
    -log sigmoid(d) - log sigmoid(-d), smallest at d = 0, so a tie pulls the two rewards together.

    Args:
        policy_logps, reference_logps: (sum K,) summed reply log-probs, groups one after another.
        ranks: (sum K,) rank of each reply in its group, 0 = best, equal = tie.
        group_sizes: K of each group, each >= 2.
        beta: KL strength.
    Returns:
        (G,) per-group losses (a sum over positions: the ranking's full log-likelihood).
    """
    if min(group_sizes) < 2:
        raise ValueError(f"plackett_luce_loss needs groups of at least 2 replies, got sizes {group_sizes}")
    rewards = beta * (policy_logps - reference_logps)
    sizes = torch.tensor(group_sizes, device=rewards.device)
    valid = torch.arange(int(sizes.max()), device=rewards.device)[None, :] < sizes[:, None]
    grid_rewards = rewards.new_zeros(valid.shape).masked_scatter(valid, rewards)
    grid_ranks = ranks.new_zeros(valid.shape).masked_scatter(valid, ranks)
    # competitors[g, i, j]: reply j is still unplaced when reply i is chosen (rank_j >= rank_i).
    competitors = valid[:, None, :] & (grid_ranks[:, None, :] >= grid_ranks[:, :, None])
    others = grid_rewards[:, None, :].expand_as(competitors).masked_fill(~competitors, -math.inf)
    terms = grid_rewards - torch.logsumexp(others, dim=-1)
    return -torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


# ==== PPO: per-token KL, GAE, whitening, clipped losses, the adaptive KL coefficient =============
#
# Shapes follow the rollout of recipes/ppo.py: (B, N) per reply token, B replies of up to N tokens,
# left-aligned after the prompt, with a ``mask`` that is True on the reply's tokens up to and
# including its end-of-sequence token (what comes after is padding and counts for nothing).
# Sources: PPO (Schulman et al., arXiv 1707.06347), GAE (Schulman et al., arXiv 1506.02438),
# RLHF with a per-token KL penalty and an adaptive coefficient (Ziegler et al., arXiv 1909.08593),
# the "37 implementation details" of PPO (Huang et al., 2022) for value clipping and whitening.


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (all of them, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; masked-out positions become 0.

    The variance is the population one (divide by the count): with one token it gives 0 rather
    than a division by zero. ``shift_mean=False`` only rescales (the mean is added back), which
    is how rewards are whitened without moving their level.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_penalty(logps: torch.Tensor, reference_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi.

    With log r = log pi_ref(y_t) - log pi(y_t) (J. Schulman, "Approximating KL divergence", 2020):
        k1 = -log r                 unbiased, can be negative (the InstructGPT / Ziegler penalty);
        k2 = (log r)^2 / 2          biased, non-negative, low variance;
        k3 = (r - 1) - log r        unbiased, non-negative, low variance.
    Args:
        logps, reference_logps: (B, N) log-probabilities of the sampled tokens.
    Returns:
        (B, N) per-token estimates; sum them over a reply for the sequence KL.
    """
    log_ratio = reference_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'k2' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2):
    r_t = -kl_coef * kl_t on every reply token, plus the reward model's score on the last one.

    Args:
        scores: (B,) one score per reply.
        kl: (B, N) per-token KL estimates (``kl_penalty``).
        mask: (B, N) True on reply tokens; each row must have at least one.
    Returns:
        (B, N) rewards, 0 after the end of each reply.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last True of each row
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438, eq. 16).

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 past the end of the reply (the episode ends with it).
    Args:
        rewards, values: (B, N); mask: (B, N), contiguous True from position 0.
    Returns:
        advantages (B, N) and returns = advantages + values (B, N), both 0 where mask is False.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * m


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate of PPO (arXiv 1707.06347, eq. 7), per token, as a loss to minimise:

        max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),   rho = exp(logp - old_logp).
    Args:
        logps: (B, N) under the policy being trained; old_logps, advantages: (B, N) from the rollout.
    Returns:
        (per-token losses (B, N), per-token bool (B, N): True where the clipped term was taken).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_range: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (Huang et al. 2022, detail 9; OpenAI baselines ppo2), per token:

        0.5 * max((V - R)^2, (V_clip - R)^2),   V_clip = old_V + clip(V - old_V, -eps, eps).
    ``clip_range=None`` gives the plain 0.5 * (V - R)^2.
    Returns:
        (per-token losses (B, N), per-token bool (B, N): True where the clipped term was larger).
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` (..., V) along the last axis: logsumexp(l) - sum p l."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2), kept near a target.

        e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)
    where KL is the measured mean sequence KL and n_steps the replies (or steps) the measurement
    covers. ``target=None`` keeps beta fixed.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0 or (target is not None and target <= 0) or horizon <= 0:
            raise ValueError(f"KL controller: expected init >= 0, target > 0 or None, horizon > 0; "
                             f"found {init}, {target}, {horizon}")
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


class RunningMoments:
    """Running mean and standard deviation of every score seen (Chan et al.'s parallel update),
    used to normalise rewards across rollouts, as TRL and OpenRLHF do."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values: torch.Tensor) -> None:
        n, mean, var = values.numel(), values.float().mean().item(), values.float().var(unbiased=False).item()
        if not self.count:
            self.mean, self.var, self.count = mean, var, n
            return
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


# ==== Critic-free RL: group advantages, the clipped policy-gradient loss, token weighting =========
#
# A rollout is G prompts with K replies each, the K replies of a group consecutive: rewards (G * K,)
# and per-token tensors (G * K, N) with the ``mask`` of the PPO section. The group is the baseline
# (no critic). Sources: GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3 and section 4.1.2), Dr. GRPO
# (Liu et al., arXiv 2503.20783, section 3.1), RLOO (Ahmadian et al., arXiv 2402.14740, eq. 7),
# REINFORCE++ (Hu, arXiv 2501.03262, sections 3.1-3.3). recipes/grpo.py composes them.


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage, one per reply (DeepSeekMath, arXiv 2402.03300, section 4.1.2):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      scale=True  (GRPO)
        A_i =  r_i - mean(r_group)                               scale=False (Dr. GRPO, arXiv
                                                                 2503.20783: the std favours groups
                                                                 that are nearly all right or wrong)
    The std is the sample one (divide by K - 1), as TRL's GRPOTrainer; a group whose K rewards are
    all equal gets A = 0 (no signal). Example, K = 2, rewards [1, 3]: mean 2, std sqrt(2), so
    A = [-1, 1] / (sqrt(2) + eps) ~ [-0.7071, 0.7071]; with scale=False, [-1, 1].

    Args:
        rewards: (G * K,) one reward per reply, the K replies of each group consecutive.
        group_size: K >= 2.
    Returns:
        (G * K,) advantages.
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)
    return advantages.flatten()


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO, Ahmadian et al., arXiv 2402.14740, eq. 7; Kool et al. 2019):
    each reply's baseline is the mean reward of the group's other K - 1 replies,

        A_i = r_i - (sum_j r_j - r_i) / (K - 1)  =  K / (K - 1) * (r_i - mean(r_group)).
    Example, K = 4, rewards [1, 2, 3, 6]: A = [1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2] = [-8/3, -4/3, 0, 4].

    Args:
        rewards: (G * K,) the K replies of each group consecutive; group_size: K >= 2.
    Returns:
        (G * K,) advantages (unbiased: the baseline does not depend on the reply it scores).
    """
    grouped = rewards.view(-1, group_size)
    return ((grouped * group_size - grouped.sum(-1, keepdim=True)) / (group_size - 1)).flatten()


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                            kl_coef: float) -> torch.Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262, sections 3.1-3.3): per-token rewards with the KL penalty
    in them, r_t = -kl_coef * kl_t plus the score on the reply's last token (``token_rewards``, the
    PPO form), the return-to-go as the advantage (gamma = 1, no critic),

        A_t = sum_{s >= t} r_s,
    then normalised over every reply token of the whole batch (not per group): (A - mean) / std.

    Args:
        scores: (B,) one score per reply; kl: (B, N) per-token KL estimates (``kl_penalty``, k1
            in the paper); mask: (B, N) reply tokens, contiguous from position 0.
    Returns:
        (B, N) advantages, 0 where mask is False.
    """
    rewards = token_rewards(scores, kl, mask, kl_coef)
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(returns, mask)


def clipped_pg_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float = 0.2, reference_logps: torch.Tensor | None = None,
                    kl_coef: float = 0.0, kl_estimator: str = "k3") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token GRPO objective as a loss to minimise (arXiv 2402.03300, eq. 3):

        l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)) + kl_coef * KL_t,
        rho_t = exp(logp_t - old_logp_t),
    with KL_t = ``kl_penalty(logps, reference_logps, kl_estimator)`` (k3 in GRPO, eq. 4; k1 possible),
    whose gradient flows through ``logps``. ``kl_coef = 0`` or no ``reference_logps`` drops the
    term. With old_logps = logps.detach() (one update per rollout) rho = 1 and the gradient is
    plain REINFORCE's, -A_t * grad logp_t.

    Args:
        logps: (B, N) under the policy being trained; old_logps: (B, N) at sampling time;
        advantages: (B, N), or (B,) one per reply (broadcast over its tokens).
    Returns:
        (per-token losses (B, N), per-token bool (B, N): True where the clipped term was taken).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    losses, clipped = ppo_policy_loss(logps, old_logps, advantages.expand_as(logps), clip_range)
    if kl_coef and reference_logps is not None:
        losses = losses + kl_coef * kl_penalty(logps, reference_logps, kl_estimator)
    return losses, clipped


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                         max_tokens: int | None = None, num_sequences: int | None = None,
                         num_tokens: int | None = None) -> torch.Tensor:
    """One loss from per-token losses: how much each token weighs.

        "sequence_mean": mean over each reply's tokens, then over the replies (GRPO, arXiv
                         2402.03300 eq. 3: a token of a short reply weighs more);
        "token_mean":    sum over every token / number of tokens (DAPO, arXiv 2503.14476;
                         OpenRLHF; every token weighs the same);
        "constant":      sum over every token / (replies * max_tokens) (Dr. GRPO, arXiv 2503.20783:
                         no length normalisation at all; max_tokens = generation.max_new_tokens).
    ``num_sequences`` / ``num_tokens`` are the whole batch's when ``per_token`` is one micro-batch
    of it (default: this one's), so that the micro-batches' losses add up to the batch's.
    Example: replies of 1 and 3 tokens with losses [[3, -, -], [1, 1, 1]]: sequence_mean
    (3 + 1) / 2 = 2; token_mean 6 / 4 = 1.5; constant with max_tokens 4: 6 / 8 = 0.75.

    Args:
        per_token: (B, N) losses; mask: (B, N) bool, True on reply tokens.
    Returns:
        a 0-dim loss.
    """
    m = mask.to(per_token.dtype)
    num_sequences = num_sequences or per_token.shape[0]
    if mode == "sequence_mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / num_sequences
    if mode == "token_mean":
        return (per_token * m).sum() / (num_tokens or m.sum().clamp(min=1))
    if mode == "constant":
        if not max_tokens:
            raise ValueError("aggregate_token_loss: mode 'constant' needs max_tokens")
        return (per_token * m).sum() / (num_sequences * max_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}: expected 'sequence_mean', 'token_mean' or 'constant'")


def zero_signal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) True for each group whose K rewards are all equal: every group-baseline advantage is 0,
    so the group gives no policy gradient (only the KL term, if any)."""
    grouped = rewards.view(-1, group_size)
    return grouped.max(-1).values == grouped.min(-1).values
