"""Validation during training: losses at rho = 1 (every frame labelled) and each decision head's precision,
recall, F1 and AUROC, from sums and counts all-reduced over ranks, so the figures do not depend on the number of
ranks or the micro-batch (docs/training.md#validation-during-training).

    val = evaluate_loss(model, val_set, cfg, precision, rank, world_size)   # every rank calls it, same collectives
"""
from __future__ import annotations

import numpy as np
import torch

import losses
from clips import DataError
from config import Config
from data import ClipDataset, collate, model_inputs, to_device
from distributed import all_reduce, min_over_ranks
from model import Precision
from sharding import even_batches, is_sharded, reshard

HIST_BINS = 1000  # probability bins for the validation AUROC (all-reducible histograms)


def validation_subset(lengths: list[int], max_clips: int, seed: int) -> list[int]:
    """The validation clips: all of them, or (train.eval_max_clips) a fixed, seeded, length-stratified subset:
    the clips sorted by length are cut into `max_clips` equal strata and one clip is drawn from each. It
    depends only on the data and the seed, never on the number of ranks or the micro-batch."""
    if not max_clips or max_clips >= len(lengths):
        return list(range(len(lengths)))
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    rng = np.random.default_rng([seed, 2])
    return sorted(int(rng.choice(stratum)) for stratum in np.array_split(by_length, max_clips))


@torch.no_grad()
def evaluate_loss(model, dataset: ClipDataset, cfg: Config, precision: Precision, rank: int, world_size: int) -> dict:
    """Globally normalised validation losses (every frame labelled) and per-head P/R/F1 at 0.5 and AUROC.

    Every rank takes its share of the same subset; sums and counts are all-reduced, so the result does not
    depend on the number of ranks or the micro-batch. A clip whose frames cannot be read on any rank gives
    {"data_error": message or None (another rank's)} on every rank instead, after the same collectives.
    `model` is the unwrapped model (no DDP wrapper: validation needs no gradient sync), or a sharded one."""
    device = next(model.parameters()).device
    model.eval()
    subset = validation_subset(dataset.lengths, cfg.train.eval_max_clips, cfg.train.seed)
    mine = sorted(subset[rank::world_size], key=lambda i: dataset.lengths[i])  # similar lengths per batch
    mb = cfg.train.micro_batch
    batches = [mine[i:i + mb] for i in range(0, len(mine), mb)]
    pad_id, multiple = dataset.renderer.pad_id, cfg.data.pad_to_multiple
    # Pass 1: target counts from the labels alone (no features read), so the losses are global means.
    counts = torch.zeros(len(losses.COUNT_KEYS), dtype=torch.float64, device=device)
    for indices in batches:
        labels_only = collate([dataset.item(i, with_features=False) for i in indices], pad_id, multiple)
        counts += losses.count_targets(to_device(labels_only, device))
    all_reduce(counts, world_size)
    # Pass 2: loss sums and head histograms, then one all-reduce that also carries a failed read.
    sums = torch.zeros(len(losses.PART_KEYS) + 1 + 4 * HIST_BINS, dtype=torch.float64, device=device)
    parts_sum, failed, hists = sums[:len(losses.PART_KEYS)], sums[len(losses.PART_KEYS)], sums[-4 * HIST_BINS:]
    # A sharded model's forward is a collective: every rank runs as many as the rank with the most batches
    # (padding with its first clips, results dropped), and a failed read is agreed on before each forward.
    sharded, error = is_sharded(model), None
    for indices, real in (even_batches(batches, subset[:mb], device) if sharded else [(b, True) for b in batches]):
        try:
            batch = to_device(collate([dataset.item(i) for i in indices], pad_id, multiple), device)
        except DataError as err:
            error = str(err)
        if (min_over_ranks(int(error is None), device) == 0) if sharded else error is not None:
            failed.fill_(1)
            break
        with precision.autocast(device.type):
            outputs = model(**model_inputs(batch))
        if not real:
            continue
        _, parts = losses.compute_loss(outputs, batch, counts, cfg.loss)
        parts_sum += losses.stack_parts(parts)
        for head, labels in zip(("speak", "dst"), losses.head_logit_labels(batch, outputs["speak_logits"].shape[0])):
            offset = 0 if head == "speak" else 2 * HIST_BINS
            hists[offset:offset + 2 * HIST_BINS] += losses.head_histograms(
                outputs[f"{head}_logits"], labels, HIST_BINS).reshape(-1)
    # Every rank runs the same collectives, also one that had no validation batch or failed to read one.
    all_reduce(sums, world_size)
    if sharded:
        reshard(model)
    model.train()
    if float(failed) > 0:
        return {"data_error": error}
    result = dict(zip(losses.PART_KEYS, parts_sum.tolist()))
    result.update({f"n_{k}": int(v) for k, v in zip(losses.COUNT_KEYS, counts.tolist())})
    result["clips"] = len(subset)
    for i, head in enumerate(("speak", "dst")):  # "dst" here is the DST-update head
        result[head] = losses.head_scores(hists[2 * i * HIST_BINS:2 * (i + 1) * HIST_BINS].view(2, HIST_BINS), 0.5)
    return result
