"""Tests for losses.py: hand-computed loss values, the global normalisation (1 x 4 == 4 x 1, 2 ranks ==
1 rank with twice the accumulation, also under real DDP), zero-count safety, no host sync, and the
histogram-based decision-head scores."""
from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat modules live in the repo root

from config import LossConfig  # noqa: E402
from losses import COUNT_KEYS, compute_loss, count_targets, ddp_loss_scale, global_target_counts, head_histograms, head_scores, loss_sums, normalize_losses  # noqa: E402
from losses import head_logit_labels  # noqa: E402
from sequence import IGNORE  # noqa: E402

FEATURE_DIM, VOCAB = 6, 5


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_batch(asst, dst, speak, update) -> dict[str, torch.Tensor]:
    """A (1, T) batch from four label lists."""
    names = ("asst_targets", "dst_targets", "speak_labels", "dst_labels")
    return {name: torch.tensor([values]) for name, values in zip(names, (asst, dst, speak, update))}


def total(parts_list: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: sum(parts[name] for parts in parts_list) for name in parts_list[0]}


# ---------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------

# Rows 0..2 of the text logits belong to positions 0..2 (position 3 has no text target).
TEXT_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]
# Head rows: position 3 has a DST label but no speak label, position 0 the reverse.
SPEAK_LOGITS = [0.0, 2.0, -1.0, 0.5]
DST_LOGITS = [3.0, -0.5, 1.0, -2.0]


def hand_batch(speak=(1, 0, 0, IGNORE), update=(IGNORE, 1, 1, 0)):
    batch = make_batch(
        asst=[2, IGNORE, 0, IGNORE, IGNORE],
        dst=[IGNORE, 1, IGNORE, IGNORE, IGNORE],
        speak=list(speak) + [IGNORE],
        update=list(update) + [IGNORE],
    )
    outputs = {
        "text_logits": torch.tensor(TEXT_LOGITS, dtype=torch.float64, requires_grad=True),
        "speak_logits": torch.tensor(SPEAK_LOGITS, dtype=torch.float64, requires_grad=True),
        "dst_logits": torch.tensor(DST_LOGITS, dtype=torch.float64, requires_grad=True),
    }
    return outputs, batch


def ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_count_targets():
    _, batch = hand_batch()
    counts = count_targets(batch)
    assert counts.dtype == torch.int64 and counts.shape == (len(COUNT_KEYS),)
    assert dict(zip(COUNT_KEYS, counts.tolist())) == {
        "asst": 2, "dst": 1, "speak_pos": 1, "speak_neg": 2, "dst_pos": 2, "dst_neg": 1,
    }


def test_hand_computed_components_and_weights():
    outputs, batch = hand_batch()
    cfg = LossConfig(w_asst=1.5, w_dst=0.5, w_speak=2.0, w_update=3.0)
    loss, parts = compute_loss(outputs, batch, count_targets(batch), cfg)

    asst_ce = (ce(TEXT_LOGITS[0], 2) + ce(TEXT_LOGITS[2], 0)) / 2
    dst_ce = math.log(3.0)
    speak_pos = softplus(-0.0)  # label 1: -log(sigmoid(x)) = softplus(-x)
    speak_neg = (softplus(2.0) + softplus(-1.0)) / 2  # label 0: -log(1 - sigmoid(x)) = softplus(x)
    speak_bce = (speak_pos + speak_neg) / 2
    dst_pos = (softplus(0.5) + softplus(-1.0)) / 2  # row 0 (logit 3.0) has no DST label: excluded
    dst_neg = softplus(-2.0)
    dst_bce = (dst_pos + dst_neg) / 2
    expected = {"asst_ce": asst_ce, "dst_ce": dst_ce, "speak_bce": speak_bce, "dst_bce": dst_bce}
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-12), name
    weighted = 1.5 * asst_ce + 0.5 * dst_ce + 2.0 * speak_bce + 3.0 * dst_bce
    assert loss.item() == pytest.approx(weighted, rel=1e-12)
    assert parts["loss"].item() == pytest.approx(weighted, rel=1e-12)
    assert loss.requires_grad and not any(value.requires_grad for value in parts.values())


def test_divides_by_global_counts():
    outputs, batch = hand_batch()
    cfg = LossConfig()
    _, local = compute_loss(outputs, batch, count_targets(batch), cfg)
    _, half = compute_loss(outputs, batch, 2 * count_targets(batch), cfg)
    for name in local:
        assert half[name].item() == pytest.approx(local[name].item() / 2, rel=1e-12), name


def test_absent_class_uses_the_other_alone_and_both_absent_is_zero():
    outputs, batch = hand_batch(speak=(0, 0, 0, 0), update=(IGNORE, IGNORE, IGNORE, IGNORE))
    loss, parts = compute_loss(outputs, batch, count_targets(batch), LossConfig())
    negatives_only = (softplus(0.0) + softplus(2.0) + softplus(-1.0) + softplus(0.5)) / 4  # not halved
    assert parts["speak_bce"].item() == pytest.approx(negatives_only, rel=1e-12)
    assert parts["dst_bce"].item() == 0.0
    loss.backward()
    # Both DST classes absent: zero loss, but the DST logits are still in the graph (DDP needs every
    # parameter to receive a gradient) and get a zero gradient.
    assert outputs["dst_logits"].grad is not None
    assert torch.equal(outputs["dst_logits"].grad, torch.zeros(4, dtype=torch.float64))


def test_focal_alpha_and_pos_weight():
    outputs, batch = hand_batch()
    gamma, alpha, pos_weight = 2.0, 0.25, 3.0
    cfg = LossConfig(focal_gamma=gamma, focal_alpha=alpha, pos_weight=pos_weight)
    _, parts = compute_loss(outputs, batch, count_targets(batch), cfg)

    def positive(x):  # -log(p) * (1 - p)^gamma, weighted by alpha and pos_weight
        p = sigmoid(x)
        return pos_weight * alpha * -math.log(p) * (1 - p) ** gamma

    def negative(x):  # -log(1 - p) * p^gamma, weighted by 1 - alpha
        p = sigmoid(x)
        return (1 - alpha) * -math.log(1 - p) * p**gamma

    speak_bce = (positive(0.0) + (negative(2.0) + negative(-1.0)) / 2) / 2
    dst_bce = ((positive(-0.5) + positive(1.0)) / 2 + negative(-2.0)) / 2
    assert parts["speak_bce"].item() == pytest.approx(speak_bce, rel=1e-10)
    assert parts["dst_bce"].item() == pytest.approx(dst_bce, rel=1e-10)


def test_pos_weight_alone_scales_positive_terms():
    outputs, batch = hand_batch()
    _, plain = compute_loss(outputs, batch, count_targets(batch), LossConfig())
    _, weighted = compute_loss(outputs, batch, count_targets(batch), LossConfig(pos_weight=4.0))
    speak_pos, speak_neg = softplus(-0.0), (softplus(2.0) + softplus(-1.0)) / 2
    assert plain["speak_bce"].item() == pytest.approx((speak_pos + speak_neg) / 2, rel=1e-12)
    assert weighted["speak_bce"].item() == pytest.approx((4.0 * speak_pos + speak_neg) / 2, rel=1e-12)


def test_bce_is_stable_for_extreme_logits():
    batch = make_batch(asst=[IGNORE] * 2, dst=[IGNORE] * 2, speak=[1, 0], update=[0, 1])
    outputs = {
        "text_logits": torch.zeros(0, VOCAB, requires_grad=True),
        "speak_logits": torch.tensor([-200.0, 200.0], requires_grad=True),  # confidently wrong
        "dst_logits": torch.tensor([-200.0, 200.0], requires_grad=True),  # confidently right
    }
    loss, parts = compute_loss(outputs, batch, count_targets(batch), LossConfig(focal_gamma=2.0))
    assert parts["speak_bce"].item() == pytest.approx(200.0)
    assert parts["dst_bce"].item() == 0.0
    loss.backward()
    assert torch.isfinite(outputs["speak_logits"].grad).all() and torch.isfinite(outputs["dst_logits"].grad).all()


def test_zero_counts_give_zero_not_nan():
    batch = make_batch(asst=[IGNORE] * 3, dst=[IGNORE] * 3, speak=[IGNORE] * 3, update=[IGNORE] * 3)
    model = TinyModel()
    batch["features"] = torch.randn(1, 3, FEATURE_DIM, dtype=torch.float64)
    loss, parts = compute_loss(model(batch), batch, count_targets(batch), LossConfig())
    assert all(value.item() == 0.0 for value in parts.values())
    loss.backward()
    for param in model.parameters():
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param))


def test_logits_that_do_not_match_the_batch_fail_loudly():
    outputs, batch = hand_batch()
    outputs["text_logits"] = outputs["text_logits"][:2]
    with pytest.raises(RuntimeError, match="one row per target position"):
        compute_loss(outputs, batch, count_targets(batch), LossConfig())


def test_no_host_sync():
    """On the meta device tensors have no values: anything that would need one on the host (`.item()`,
    `bool(tensor)`, boolean indexing with its data-dependent size) raises, so this catches every
    host sync that a CUDA run would pay."""
    outputs, batch = hand_batch()
    meta_batch = {name: value.to("meta") for name, value in batch.items()}
    meta_outputs = {name: value.detach().to("meta").requires_grad_() for name, value in outputs.items()}
    counts = count_targets(meta_batch)
    cfg = LossConfig(focal_gamma=2.0, focal_alpha=0.25, pos_weight=2.0)
    loss, parts = compute_loss(meta_outputs, meta_batch, counts, cfg)
    assert counts.is_meta and loss.is_meta and all(value.is_meta for value in parts.values())
    loss.backward()
    assert meta_outputs["text_logits"].grad.is_meta
    # The check itself works: a sync does raise on meta tensors.
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta_batch["asst_targets"][meta_batch["asst_targets"] != IGNORE]


# ---------------------------------------------------------------------------------------------------
# Global normalisation: invariance to the split of a step
# ---------------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """Text and head logits from per-position features, following the model's output contract."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lm_head = nn.Linear(FEATURE_DIM, VOCAB, dtype=torch.float64)
        self.speak_head = nn.Linear(FEATURE_DIM, 1, dtype=torch.float64)
        self.dst_head = nn.Linear(FEATURE_DIM, 1, dtype=torch.float64)

    def forward(self, batch):
        features = batch["features"]  # (B, T, F)
        text_mask = (batch["asst_targets"] != IGNORE) | (batch["dst_targets"] != IGNORE)  # (B, T)
        head_mask = (batch["speak_labels"] != IGNORE) | (batch["dst_labels"] != IGNORE)  # (B, T)
        head_features = features[head_mask]  # (n_head, F)
        return {
            "text_logits": self.lm_head(features[text_mask]),  # (n_text, V)
            "speak_logits": self.speak_head(head_features).squeeze(-1),  # (n_head,)
            "dst_logits": self.dst_head(head_features).squeeze(-1),  # (n_head,)
        }


def make_clip(length: int, p_asst: float, p_dst: float, p_head: float, p_speak: float, generator) -> dict:
    """One clip (T = length) with random features and labels at random densities."""

    def draw(p):
        return torch.rand(length, generator=generator) < p

    def targets(p):
        return torch.where(draw(p), torch.randint(VOCAB, (length,), generator=generator), IGNORE)

    head = draw(p_head)
    speak = torch.where(head, draw(p_speak).long(), IGNORE)
    update = torch.where(head & draw(0.8), draw(0.4).long(), IGNORE)  # some rows labelled for speak only
    return {
        "features": torch.randn(length, FEATURE_DIM, generator=generator, dtype=torch.float64),
        "asst_targets": targets(p_asst),
        "dst_targets": targets(p_dst),
        "speak_labels": speak,
        "dst_labels": update,
    }


def collate(clips: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest clip: zero features, ignored labels."""
    length = max(clip["features"].shape[0] for clip in clips)
    batch = {}
    for name in clips[0]:
        fill = 0.0 if name == "features" else IGNORE
        rows = [
            torch.cat([clip[name], clip[name].new_full((length - clip[name].shape[0], *clip[name].shape[1:]), fill)])
            for clip in clips
        ]
        batch[name] = torch.stack(rows)
    return batch


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    """Four clips with very uneven target counts, so that per-micro-batch means differ from global ones:
    a long text-heavy clip, a clip with no DST text and no speak positives, and two in between."""
    generator = torch.Generator().manual_seed(1234)
    settings = [  # (length, p_asst, p_dst, p_head, p_speak)
        (40, 0.7, 0.3, 0.5, 0.5),
        (9, 0.1, 0.0, 0.9, 0.0),
        (17, 0.2, 0.5, 0.3, 0.8),
        (25, 0.4, 0.1, 0.6, 0.3),
    ]
    clips = [make_clip(*setting, generator) for setting in settings]
    assert (clips[1]["dst_targets"] == IGNORE).all() and not (clips[1]["speak_labels"] == 1).any()
    return clips


def run_step(model: nn.Module, micro_batches: list[dict], global_counts: torch.Tensor, scale: int = 1):
    """One rank's accumulation: backward every micro-batch's (scaled) loss; returns the summed parts
    and the parameter gradients."""
    model.zero_grad(set_to_none=True)
    parts_list = []
    for batch in micro_batches:
        loss, parts = compute_loss(model(batch), batch, global_counts, CFG)
        (loss * scale).backward()
        parts_list.append(parts)
    return total(parts_list), [param.grad.clone() for param in model.parameters()]


CFG = LossConfig(w_asst=1.0, w_dst=0.7, w_speak=1.3, w_update=0.9, focal_gamma=1.5, focal_alpha=0.3, pos_weight=2.0)


def assert_same(parts_a, grads_a, parts_b, grads_b):
    for name in parts_a:
        torch.testing.assert_close(parts_a[name], parts_b[name], rtol=1e-12, atol=1e-12, msg=name)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-12)


def test_four_micro_batches_of_one_equal_one_micro_batch_of_four(clips):
    model = TinyModel()
    one_by_four = [collate([clip]) for clip in clips]
    four_by_one = [collate(clips)]
    parts_a, grads_a = run_step(model, one_by_four, global_target_counts(one_by_four))
    parts_b, grads_b = run_step(model, four_by_one, global_target_counts(four_by_one))
    assert_same(parts_a, grads_a, parts_b, grads_b)

    # The test can fail: averaging per-micro-batch means (the naive recipe) gives another loss.
    naive = sum(compute_loss(model(b), b, count_targets(b), CFG)[1]["loss"] for b in one_by_four) / 4
    assert abs(naive - parts_b["loss"]) > 1e-2


def test_two_ranks_equal_one_rank_with_double_accumulation(clips):
    """Simulated DDP: each rank normalises by the all-reduced counts and scales by world_size; DDP
    averages the gradients."""
    assert ddp_loss_scale() == 1  # no process group
    world_size = 2
    model = TinyModel()
    single = [collate([clip]) for clip in clips]
    parts_single, grads_single = run_step(model, single, global_target_counts(single))

    rank_batches = [single[:2], single[2:]]
    global_counts = sum(global_target_counts(batches) for batches in rank_batches)  # the all-reduce
    results = [
        run_step(copy.deepcopy(model), batches, global_counts, scale=world_size)
        for batches in rank_batches
    ]
    averaged_grads = [sum(grads) / world_size for grads in zip(*(grads for _, grads in results))]
    # Logged parts are unscaled: the all-reduce SUM of the ranks' shares is the global value.
    summed_parts = total([parts for parts, _ in results])
    assert_same(summed_parts, averaged_grads, parts_single, grads_single)

    # Forgetting the world_size factor halves the gradients.
    unscaled = [run_step(copy.deepcopy(model), batches, global_counts)[1] for batches in rank_batches]
    unscaled_grads = [sum(grads) / world_size for grads in zip(*unscaled)]
    torch.testing.assert_close(unscaled_grads[0], grads_single[0] / world_size)


def _ddp_worker(rank: int, world_size: int, init_file: str, clips: list[dict], out_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        assert ddp_loss_scale() == world_size
        model = nn.parallel.DistributedDataParallel(TinyModel())
        batches = [collate([clip]) for clip in clips[2 * rank : 2 * rank + 2]]
        global_counts = global_target_counts(batches)  # real all-reduce
        parts, grads = run_step(model, batches, global_counts, scale=ddp_loss_scale())
        if rank == 0:
            torch.save({"counts": global_counts, "grads": grads}, out_file)
        dist.barrier()  # tearing gloo down while the other rank still talks to it can abort the process
    finally:
        dist.destroy_process_group()
    # End without interpreter finalization: a gloo thread releasing the last collective's tensors during
    # finalization aborts the process (see train.exit_process, which this mirrors).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_real_ddp_matches_single_process(clips, tmp_path):
    """Two gloo processes under DistributedDataParallel (which averages gradients over ranks)."""
    world_size = 2
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), clips, str(out_file)), nprocs=world_size)
    result = torch.load(out_file, weights_only=True)

    single = [collate([clip]) for clip in clips]
    global_counts = global_target_counts(single)
    _, grads = run_step(TinyModel(), single, global_counts)
    assert torch.equal(result["counts"], global_counts)
    for grad_ddp, grad_single in zip(result["grads"], grads):
        torch.testing.assert_close(grad_ddp, grad_single, rtol=1e-12, atol=1e-12)


def test_validation_sums_give_exact_global_means(clips):
    """Accumulating `loss_sums` and counts (the validation path) equals the one-batch means."""
    model = TinyModel()
    batches = [collate([clip]) for clip in clips]
    with torch.no_grad():
        sums = sum(loss_sums(model(batch), batch, CFG) for batch in batches)
        counts = sum(count_targets(batch) for batch in batches)
        accumulated = normalize_losses(sums, counts, CFG)
        everything = collate(clips)
        _, reference = compute_loss(model(everything), everything, count_targets(everything), CFG)
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Decision-head statistics
# ---------------------------------------------------------------------------------------------------


def exact_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUROC over all (positive, negative) pairs, ties counted half."""
    pos, neg = probs[labels == 1].double(), probs[labels == 0].double()
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def scored_logits():
    generator = torch.Generator().manual_seed(7)
    n = 4000
    labels = (torch.rand(n, generator=generator) < 0.3).long()
    logits = torch.randn(n, generator=generator) * 2.0 + 1.5 * labels  # informative but imperfect
    # Logits on and around the threshold: p == 0.5 exactly must count as predicted negative.
    logits[:6] = torch.tensor([0.0, 0.0, 1e-9, -1e-9, 1e-3, -1e-3])
    labels[:6] = torch.tensor([1, 0, 1, 0, 1, 0])
    labels[6:300] = IGNORE  # unlabelled rows are skipped
    return logits, labels


def test_histogram_precision_recall_f1_exact_at_half(scored_logits):
    logits, labels = scored_logits
    hist = head_histograms(logits, labels)
    assert hist.shape == (2, 1000) and hist.dtype == torch.int64
    scores = head_scores(hist, threshold=0.5)

    probs = torch.sigmoid(logits.float())
    valid = labels != IGNORE
    predicted = probs > 0.5  # the evaluator's decision rule
    true_pos = int((predicted & (labels == 1)).sum())
    false_pos = int((predicted & (labels == 0)).sum())
    num_pos, num_neg = int((labels == 1).sum()), int((labels == 0).sum())
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / num_pos
    assert scores["num_pos"] == num_pos and scores["num_neg"] == num_neg
    assert int(hist.sum()) == int(valid.sum())
    assert scores["precision"] == pytest.approx(precision, abs=1e-15)
    assert scores["recall"] == pytest.approx(recall, abs=1e-15)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-15)


def test_histogram_auroc_within_bin_resolution(scored_logits):
    logits, labels = scored_logits
    hist = head_histograms(logits, labels)
    auroc = head_scores(hist)["auroc"]
    exact = exact_auroc(torch.sigmoid(logits.float()), labels)
    negatives, positives = hist.double()
    # The only error source: pairs sharing a bin are counted as ties.
    bound = float((positives * negatives).sum() / (2 * positives.sum() * negatives.sum()))
    assert abs(auroc - exact) <= bound + 1e-12
    assert abs(auroc - exact) < 1e-3
    assert 0.6 < exact < 0.9  # a meaningful, non-degenerate test case


def test_histograms_merge_like_an_all_reduce(scored_logits):
    logits, labels = scored_logits
    first = head_histograms(logits[:1500], labels[:1500])
    second = head_histograms(logits[1500:], labels[1500:])
    assert torch.equal(first + second, head_histograms(logits, labels))


def test_histograms_from_model_outputs_and_head_labels(clips):
    """The head's labels are aligned with its logits via head_logit_labels, masked per head."""
    batch = collate(clips)
    outputs = TinyModel()(batch)
    speak_labels, dst_labels = head_logit_labels(batch, outputs["speak_logits"].shape[0])
    speak_hist = head_histograms(outputs["speak_logits"], speak_labels)
    dst_hist = head_histograms(outputs["dst_logits"], dst_labels)
    counts = dict(zip(COUNT_KEYS, count_targets(batch).tolist()))
    assert speak_hist.sum(dim=1).tolist() == [counts["speak_neg"], counts["speak_pos"]]
    assert dst_hist.sum(dim=1).tolist() == [counts["dst_neg"], counts["dst_pos"]]


def test_head_scores_degenerate_cases():
    only_negatives = head_histograms(torch.tensor([-1.0, 2.0]), torch.tensor([0, 0]))
    scores = head_scores(only_negatives)
    assert scores["auroc"] is None and scores["recall"] == 0.0 and scores["precision"] == 0.0
    assert scores["num_pos"] == 0 and scores["num_neg"] == 2
    perfect = head_scores(head_histograms(torch.tensor([-3.0, 3.0]), torch.tensor([0, 1])))
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "auroc": 1.0, "num_pos": 1, "num_neg": 1}
    with pytest.raises(ValueError, match="bin edge"):
        head_scores(only_negatives, threshold=0.12345)
    with pytest.raises(ValueError, match="even"):
        head_histograms(torch.zeros(2), torch.zeros(2, dtype=torch.long), bins=999)
