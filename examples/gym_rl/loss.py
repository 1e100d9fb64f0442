"""GRPO: group-relative advantages and the PPO-clip policy-gradient loss, token-level.

Log-probs here are aligned with the tokens: column t is log p(token t | tokens < t),
so column 0 (never generated) is unused and masked out.
"""
import torch


def grpo_advantages(rewards, groups, normalize_std=True, eps=1e-6):
    """(r - mean of its group) [/ std of its group]; a group with equal rewards gets zeros."""
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        members = groups == g
        r = rewards[members]
        centred = r - r.mean()
        if normalize_std and r.numel() > 1:
            centred = centred / (r.std() + eps)
        adv[members] = centred
    return adv


def token_log_probs(model, input_ids, attention_mask, temperature=1.0):
    """log p(token t | tokens < t) under `model`, [B, T] (column 0 is 0), in fp32.

    The logits are divided by the sampling temperature, as gym-serve's
    `processed` log-probs are, and log-softmax is taken as gather - logsumexp
    so no [B, T, V] log-prob tensor is kept besides the logits.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = picked - torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_mult_prob_error(train_lp, generation_lp, mask):
    """NeMo RL's health signal: mean over generated tokens of exp(|trainer - generator|); 1.0 is perfect."""
    return float(masked_mean(torch.exp((train_lp - generation_lp).abs()) * mask, mask))


def clipped_pg_loss(lp, behaviour_lp, advantages, mask, eps_low, eps_high, tis_cap=None, old_train_lp=None,
                    total_tokens=None):
    """PPO-clip loss of one micro-batch, summed over its tokens / `total_tokens` (the batch's mask count).

    Without `tis_cap` the importance ratio is exp(lp - behaviour_lp): against
    the log-probs gym-serve sampled with. With `tis_cap` (truncated importance
    sampling) the ratio is taken against the trainer's own pre-update log-probs
    `old_train_lp`, and each token is weighted by min(exp(old_train_lp -
    behaviour_lp), tis_cap), which corrects for the generator's numerics
    differing from the trainer's without letting one token's weight explode.
    """
    reference = behaviour_lp if tis_cap is None else old_train_lp
    ratio = torch.exp(lp - reference)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if tis_cap is not None:
        weight = torch.exp(old_train_lp - behaviour_lp).clamp(max=tis_cap).detach()
        per_token = per_token * weight
    denom = mask.sum() if total_tokens is None else total_tokens
    clipped = ((ratio - 1).abs() > torch.where(adv > 0, eps_high, eps_low)) & (mask > 0)
    return (per_token * mask).sum() / denom, int(clipped.sum())
