"""The four training losses, their global normalisation, and the decision-head validation statistics.

Losses (docs/training.md#losses): token-mean cross-entropy for the assistant text (`asst_ce`) and the DST text
(`dst_ce`); class-balanced BCE for the speak head (`speak_bce`) and the DST-update head (`dst_bce`);
`loss = w_asst*asst_ce + w_dst*dst_ce + w_speak*speak_bce + w_update*dst_bce`.

Global normalisation (torchtitan style). Every mean is over all micro-batches of an optimizer step on
all ranks, so the gradient does not depend on how the step was split. Each micro-batch contributes its
SUM of per-target losses divided by the GLOBAL target count; summing the contributions over micro-batches
and ranks gives the global mean. The training loop must therefore follow these three rules:

1. Count first: fetch the step's micro-batches, then `global_counts = global_target_counts(micro_batches)`
   (sums `count_targets` over this rank's micro-batches and all-reduces the sum over ranks).
2. Normalise by the global counts: `loss, parts = compute_loss(outputs, batch, global_counts, cfg.loss)`
   for every micro-batch, and backpropagate every micro-batch's loss (no division by grad_accum).
3. Undo DDP's averaging: DDP AVERAGES gradients over ranks (divides their sum by world_size), but the
   global mean needs their SUM, so backpropagate `loss * world_size` (`loss * ddp_loss_scale()`).

    micro_batches = [to_device(next(batches)) for _ in range(cfg.train.grad_accum)]
    global_counts = global_target_counts(micro_batches)            # (6,) int64, identical on all ranks
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with (nullcontext() if sync else model.no_sync()):
            loss, parts = compute_loss(model(batch), batch, global_counts, cfg.loss)
            scaler.scale(loss * ddp_loss_scale()).backward()      # world_size: undo DDP's mean

`parts` are detached and additive like the loss: summing them over this rank's micro-batches gives this
rank's share of the step's global means, and an all-reduce SUM of those shares gives the global means to
log. Nothing here calls `.item()` or needs a tensor value on the host (no device sync in the hot path).

Validation uses the same pieces without the two-pass counting: accumulate `loss_sums(...)` and
`count_targets(...)` over the validation batches, all-reduce both, then `normalize_losses(sums, counts,
cfg)`. The decision heads are scored from `head_histograms` (all-reduce SUM) with `head_scores`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import LossConfig
from sequence import IGNORE

# Order of the entries of the count vector and of the loss-sum vector.
COUNT_KEYS = ("asst", "dst", "speak_pos", "speak_neg", "dst_pos", "dst_neg")
# The loss and its four components, in the order the loop accumulates, all-reduces and logs them.
PART_KEYS = ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce")


# ---------------------------------------------------------------------------------------------------
# Counting and selecting targets
# ---------------------------------------------------------------------------------------------------


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised target counts of one micro-batch, in `COUNT_KEYS` order.

    Returns a (6,) int64 tensor on the batch's device: assistant-text targets, DST-text targets, and the
    positive and negative labels of each head. int64 keeps the counts exact through the all-reduce.
    Computed on the device with no host sync.
    """
    asst_targets, dst_targets = batch["asst_targets"], batch["dst_targets"]  # (B, T)
    speak_labels, dst_labels = batch["speak_labels"], batch["dst_labels"]  # (B, T)
    return torch.stack(
        [
            (asst_targets != IGNORE).sum(),
            (dst_targets != IGNORE).sum(),
            (speak_labels == 1).sum(),
            (speak_labels == 0).sum(),
            (dst_labels == 1).sum(),
            (dst_labels == 0).sum(),
        ]
    )


def global_target_counts(micro_batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Target counts summed over this rank's micro-batches of one optimizer step and over all ranks.

    Call it once per optimizer step, before the first forward pass, with the batches already on the
    training device (NCCL all-reduces CUDA tensors only). Without an initialised process group it is
    the local sum. Returns a (6,) int64 tensor in `COUNT_KEYS` order, identical on every rank.
    """
    counts = torch.stack([count_targets(batch) for batch in micro_batches]).sum(dim=0)  # (6,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def ddp_loss_scale() -> int:
    """Factor to multiply the loss by before `backward()`: the world size (1 without a process group).

    DDP AVERAGES gradients over ranks, i.e. divides their sum by world_size, while each rank's loss is
    already its share of the global mean, so the gradient of the global mean is the plain SUM.
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _select(values: torch.Tensor, mask: torch.Tensor, num_selected: int) -> torch.Tensor:
    """`values[mask]` (row-major order) for a mask known to hold `num_selected` True entries.

    Boolean indexing has a data-dependent output size, so on CUDA it copies the count to the host (a
    device sync). The model already paid that sync and `num_selected` comes from its output's shape,
    so `nonzero_static` selects the same entries without another one. A model whose outputs do not
    match the mask fails loudly: `_assert_async` checks the count on the device without waiting for it.
    """
    mask = mask.flatten()
    torch._assert_async(
        mask.sum() == num_selected,
        "losses: the model's logits do not have one row per target position of the batch",
    )
    index = torch.nonzero_static(mask, size=num_selected).squeeze(1)  # (num_selected,)
    return values.flatten()[index]


def text_targets(batch: dict[str, torch.Tensor], num_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assistant and DST next-token targets aligned with the rows of `text_logits`, each (num_text,),
    IGNORE where a row has no target of that kind."""
    asst_targets, dst_targets = batch["asst_targets"], batch["dst_targets"]  # (B, T)
    text_mask = (asst_targets != IGNORE) | (dst_targets != IGNORE)  # (B, T)
    return _select(asst_targets, text_mask, num_text), _select(dst_targets, text_mask, num_text)


def head_logit_labels(batch: dict[str, torch.Tensor], num_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Speak and DST-update labels aligned with `speak_logits` / `dst_logits`, each (num_head,).

    The heads are evaluated where EITHER head has a label, so one head's label can still be
    IGNORE at a row: every consumer must mask per head.
    """
    speak_labels, dst_labels = batch["speak_labels"], batch["dst_labels"]  # (B, T)
    head_mask = (speak_labels != IGNORE) | (dst_labels != IGNORE)  # (B, T)
    return _select(speak_labels, head_mask, num_head), _select(dst_labels, head_mask, num_head)


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Losses in fp32 even if a caller hands over half-precision logits; fp64 (tests) stays fp64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Rows of hidden states per chunk of the fused LM head + cross-entropy. The transient per chunk is its fp32
# logits (rows x V x 4 bytes; 512 x 128k = 256 MiB) plus their half-precision gradient in the backward pass.
CE_CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk over the rows.

    Forward keeps only the (n,) losses; backward recomputes each chunk's logits, turns them into
    d(ce)/d(logits) = softmax - onehot in place, and multiplies back. No (n, V) tensor exists beyond one chunk
    in either pass (a plain `lm_head(hidden)` followed by cross-entropy keeps the fp32 logits and their
    log-softmax alive from the forward to the backward pass).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk_rows):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.compute_dtype, ctx.chunk_rows = compute_dtype, chunk_rows
        w = weight.to(compute_dtype)  # (V, H); a no-op when the weight is stored in the compute dtype
        b = None if bias is None else bias.to(compute_dtype)
        ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (n,)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                stop = start + chunk_rows
                logits = F.linear(hidden[start:stop].to(compute_dtype), w, b).float()  # (c, V)
                target = targets[start:stop]
                picked = logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)  # (c,)
                ce[start:stop] = torch.where(target != IGNORE, logits.logsumexp(-1) - picked, 0.0)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, bias, targets = ctx.saved_tensors
        dtype, chunk_rows = ctx.compute_dtype, ctx.chunk_rows
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                stop = start + chunk_rows
                h = hidden[start:stop].to(dtype)  # (c, H)
                target = targets[start:stop]
                valid = target != IGNORE
                logits = F.linear(h, w, b).float()  # (c, V)
                probs = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()  # softmax, in place
                rows = torch.arange(len(target), device=target.device)
                probs[rows, target.clamp_min(0)] -= valid.to(probs.dtype)  # softmax - onehot
                scale = torch.where(valid, grad_ce[start:stop], 0.0)  # (c,)
                grad_logits = probs.mul_(scale.unsqueeze(1)).to(dtype)  # (c, V)
                if need_hidden:
                    grad_hidden[start:stop] = (grad_logits @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight.add_(grad_logits.t() @ h)  # (V, H), accumulated in fp32
                if need_bias:
                    grad_bias.add_(grad_logits.sum(0))
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(n,) fp32 cross-entropy of each row of `hidden` (n, H) under the LM head `weight` (V, H) [+ `bias`]
    against `targets` (n,) (IGNORE rows give 0), without keeping any (n, V) logits for backward.

    The matmuls run in the autocast dtype when autocast is on (as `lm_head(hidden)` would under autocast),
    otherwise in the promoted dtype of hidden and weight; logits, log-sum-exp and the loss are fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, compute_dtype, chunk_rows or CE_CHUNK_ROWS)


def _cross_entropy_sums(text_logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Summed cross-entropy of `text_logits` (n, V) against each (n,) target vector (IGNORE skipped).

    One logsumexp serves both target streams; unlike two `F.cross_entropy` calls this never keeps a
    second (n, V) log-softmax for backward.
    """
    log_normaliser = torch.logsumexp(text_logits, dim=-1)  # (n,)
    sums = []
    for target in targets:
        valid = target != IGNORE  # (n,)
        target_logit = text_logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)  # (n,)
        sums.append(torch.where(valid, log_normaliser - target_logit, 0.0).sum())
    return sums


def _bce_sums(logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed per-element head loss over the positives and over the negatives; `labels` (n,) in {0, 1,
    IGNORE}. Plain BCE, optionally focal (gamma, alpha) and with pos_weight on positives."""
    positive, negative = labels == 1, labels == 0  # (n,)
    # binary_cross_entropy_with_logits is the log-sum-exp form: no overflow for large |logit|.
    bce = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")  # (n,)
    if cfg.focal_gamma > 0:
        # p_t = exp(-bce) is the probability given to the true class; 1 - p_t = -expm1(-bce) stays
        # accurate when p_t is close to 1 (the well-classified examples that focal loss down-weights).
        bce = bce * (-torch.expm1(-bce)) ** cfg.focal_gamma
    positive_weight = cfg.pos_weight
    negative_weight = 1.0
    if cfg.focal_alpha is not None:
        positive_weight *= cfg.focal_alpha
        negative_weight *= 1.0 - cfg.focal_alpha
    # torch.where (not multiplication by a 0/1 mask) so that a non-finite value at an unlabelled row
    # cannot turn the sum into NaN.
    positive_sum = positive_weight * torch.where(positive, bce, 0.0).sum()
    negative_sum = negative_weight * torch.where(negative, bce, 0.0).sum()
    return positive_sum, negative_sum


def loss_sums(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], loss_cfg: LossConfig) -> torch.Tensor:
    """Per-target loss SUMS of one micro-batch, (6,) in `COUNT_KEYS` order (matching `count_targets`):
    asst CE sum, DST CE sum, speak-head positive/negative sums, DST-head positive/negative sums.

    Sums add over micro-batches and ranks, so `normalize_losses(sums, counts)` of accumulated sums and
    counts gives exact global means (used for validation).
    """
    speak_logits = _at_least_fp32(outputs["speak_logits"])  # (n_head,)
    dst_logits = _at_least_fp32(outputs["dst_logits"])  # (n_head,)
    speak_labels, dst_labels = head_logit_labels(batch, speak_logits.shape[0])  # (n_head,) each
    if "text_ce" in outputs:  # the model fused the LM head with the cross-entropy (training)
        text_ce = outputs["text_ce"]  # (n_text,) fp32
        asst_targets, dst_targets = text_targets(batch, text_ce.shape[0])  # (n_text,) each
        asst_sum = torch.where(asst_targets != IGNORE, text_ce, 0.0).sum()
        dst_sum = torch.where(dst_targets != IGNORE, text_ce, 0.0).sum()
    else:
        text_logits = _at_least_fp32(outputs["text_logits"])  # (n_text, V)
        asst_targets, dst_targets = text_targets(batch, text_logits.shape[0])  # (n_text,) each
        asst_sum, dst_sum = _cross_entropy_sums(text_logits, [asst_targets, dst_targets])
    speak_pos_sum, speak_neg_sum = _bce_sums(speak_logits, speak_labels, loss_cfg)
    dst_pos_sum, dst_neg_sum = _bce_sums(dst_logits, dst_labels, loss_cfg)
    return torch.stack([asst_sum, dst_sum, speak_pos_sum, speak_neg_sum, dst_pos_sum, dst_neg_sum])


def _class_balanced(pos_sum: torch.Tensor, neg_sum: torch.Tensor, n_pos: torch.Tensor, n_neg: torch.Tensor) -> torch.Tensor:
    """(mean over positives + mean over negatives) / 2, or the present class alone, or 0 if neither.

    A class absent from the step has count 0 and therefore sum 0 (every local count is <= the global
    count), so clamp_min(1) turns 0/0 into 0 and the halving only applies when both are present.
    Decided with tensor ops: the counts never leave the device.
    """
    both_present = (n_pos > 0) & (n_neg > 0)
    class_mean_sum = pos_sum / n_pos.clamp_min(1) + neg_sum / n_neg.clamp_min(1)
    return class_mean_sum * torch.where(both_present, 0.5, 1.0).to(class_mean_sum.dtype)


def normalize_losses(sums: torch.Tensor, counts: torch.Tensor, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Components and total loss from loss sums (6,) and target counts (6,), both in `COUNT_KEYS` order.

    Linear in `sums` for fixed `counts`: with the step's global counts, the values of the micro-batches
    of all ranks add up to the global means. A zero count gives a zero component, never NaN.
    """
    counts = counts.to(sums.dtype)
    asst_ce = sums[0] / counts[0].clamp_min(1)
    dst_ce = sums[1] / counts[1].clamp_min(1)
    speak_bce = _class_balanced(sums[2], sums[3], counts[2], counts[3])
    dst_bce = _class_balanced(sums[4], sums[5], counts[4], counts[5])
    loss = (
        loss_cfg.w_asst * asst_ce
        + loss_cfg.w_dst * dst_ce
        + loss_cfg.w_speak * speak_bce
        + loss_cfg.w_update * dst_bce
    )
    return {"asst_ce": asst_ce, "dst_ce": dst_ce, "speak_bce": speak_bce, "dst_bce": dst_bce, "loss": loss}


def compute_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    global_counts: torch.Tensor,
    loss_cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step's globally normalised loss.

    outputs: `text_logits` (n_text, V) at the rows where `asst_targets` or `dst_targets` is not -100,
        `speak_logits` and `dst_logits` (n_head,) at the rows where `speak_labels` or `dst_labels` is not
        -100, both in row-major boolean-indexing order over (B, T).
    batch: the collator's dict with `asst_targets`, `dst_targets`, `speak_labels`, `dst_labels` (B, T).
    global_counts: (6,) target counts summed over ALL micro-batches of the optimizer step and ALL ranks
        (`global_target_counts`), in `COUNT_KEYS` order.

    Every component is this micro-batch's loss SUM divided by the global count, so the values of all
    micro-batches and ranks add up to the step's global means, however the step was split.

    Returns `(loss, parts)`: `loss` is the scalar to backpropagate (multiplied by `world_size` under
    DDP, which averages gradients over ranks — see the module docstring); `parts` holds detached
    `asst_ce`, `dst_ce`, `speak_bce`, `dst_bce` and `loss`, additive in the same way. No host sync.
    """
    parts = normalize_losses(loss_sums(outputs, batch, loss_cfg), global_counts, loss_cfg)
    return parts["loss"], {name: value.detach() for name, value in parts.items()}


def stack_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(5,) float64 in PART_KEYS order: what the loop adds up over micro-batches and all-reduces."""
    return torch.stack([parts[k].double() for k in PART_KEYS])


# ---------------------------------------------------------------------------------------------------
# Decision-head validation statistics
# ---------------------------------------------------------------------------------------------------

# Bin resolution trade-off. A histogram of 2 x bins int64 counts is all that crosses ranks (16 KB at
# 1000 bins), independent of the number of frames, and it sums exactly under all-reduce. The price is
# AUROC resolution: a positive and a negative in the same bin count as a tie (half a correct pair), so
# the histogram AUROC differs from the exact one by at most sum_b(pos_b * neg_b) / (2 * P * N). With
# 1000 bins that is small unless many scores of both classes crowd into one bin, which happens for a
# saturated head (probabilities piled up within 1e-3 of 0 or 1); more bins narrow the gap at linear
# cost. Precision, recall and F1 are exact at any threshold that is a bin edge (0.5 always is).
DEFAULT_BINS = 1000


def head_histograms(logits: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Counts of negatives (row 0) and positives (row 1) per probability bin: (2, bins) int64.

    logits, labels: (n,) aligned (e.g. `speak_logits` and `head_logit_labels(batch, n)[0]`); rows whose label
    is not 0 or 1 (IGNORE) are skipped. Histograms of several batches or ranks add up.

    Bins are right-closed: bin b holds p = sigmoid(logit) in (b/bins, (b+1)/bins], bin 0 also p == 0.
    With an even number of bins 0.5 is an edge and "p > 0.5" (the evaluator's speak/update rule) is
    exactly "bin >= bins/2"; p == 0.5 falls below the threshold. p is the float32 sigmoid and the bin
    index is computed in float64, where p * bins is exact, so no rounding moves p across an edge.
    """
    if bins <= 0 or bins % 2:
        raise ValueError(f"head_histograms: bins must be a positive even number (0.5 must be a bin edge), got {bins}")
    probs = torch.sigmoid(logits.detach().float()).double()  # (n,)
    bin_index = (torch.ceil(probs * bins).long() - 1).clamp(0, bins - 1)  # (n,)
    valid = (labels == 0) | (labels == 1)  # (n,)
    flat_index = torch.where(valid, labels.long() * bins + bin_index, 0)  # (n,) row-major into (2, bins)
    hist = torch.zeros(2 * bins, dtype=torch.int64, device=logits.device)
    hist.scatter_add_(0, flat_index, valid.long())
    return hist.view(2, bins)


def head_scores(hist: torch.Tensor, threshold: float = 0.5) -> dict[str, Optional[float]]:
    """Precision, recall, F1 at `threshold` (predicted positive iff p > threshold) and AUROC of a
    (2, bins) histogram from `head_histograms` (summed over batches and ranks).

    Returns Python numbers: precision, recall, f1 (0.0 when undefined), auroc (None when one class is
    absent), num_pos, num_neg (ints). `threshold` must be a bin edge (a multiple of 1/bins). Host-side;
    call it once per evaluation, after the all-reduce.
    """
    bins = hist.shape[1]
    edge = round(threshold * bins)
    if abs(edge - threshold * bins) > 1e-6 or not 0 <= edge <= bins:
        raise ValueError(f"head_scores: threshold {threshold} is not a bin edge of a {bins}-bin histogram")
    negatives, positives = hist.detach().cpu().double()  # (bins,) each
    num_pos, num_neg = int(positives.sum()), int(negatives.sum())
    true_pos = float(positives[edge:].sum())
    false_pos = float(negatives[edge:].sum())
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos > 0 else 0.0
    recall = true_pos / num_pos if num_pos > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    auroc = None
    if num_pos > 0 and num_neg > 0:
        # P(score_pos > score_neg) + P(tie) / 2, with every pair in the same bin counted as a tie.
        negatives_below = torch.cumsum(negatives, 0) - negatives  # (bins,)
        correct_pairs = (positives * (negatives_below + 0.5 * negatives)).sum()
        auroc = float(correct_pairs) / (num_pos * num_neg)
    return {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc, "num_pos": num_pos, "num_neg": num_neg}
