"""Evaluation metrics for the streaming evaluator (docs/evaluation.md).

Pure functions over plain Python data, so that evaluate.py and the tests call the same code:

* speaking: ProAssist's time-windowed bipartite matching of generated against reference
  utterances (`match_speaking`), and the `speak` block of metrics.json (`summarize_speaking`, or
  both at once with `speaking_metrics`);
* text quality of the good matches: `nlg.nlg_metrics` (BLEU, CIDEr-D, METEOR, ROUGE-L);
* dialogue state tracking (`dst_metrics`) and per-frame decision quality (`decision_metrics`);
* the sentence embedders the matching uses live in nlg.py (`nlg.load_embedder`).

Conventions: frames are 0-based indices over the whole video (the evaluator converts absolute
frame numbers); counts are summed over videos before any division (micro-averaging); a ratio whose
denominator is zero is 0.0, as in ProAssist.

From evaluate.py, matching once and reusing the matches for the text metrics:

    embed = nlg.load_embedder("minilm")
    window, known = window_for_dataset("assembly101")
    matches = match_speaking(videos, embed, window)
    speak = summarize_speaking(matches, fps=2)
    text = nlg.nlg_metrics(good_match_pairs(matches))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.stats import rankdata

# embed(texts) -> (len(texts), d) array; rows need not be normalised.
Embed = Callable[[list[str]], np.ndarray]

# ---------------------------------------------------------------------------------------------
# Matching windows
# ---------------------------------------------------------------------------------------------

DEFAULT_WINDOW = (-4, 8)

# (l, r) in frames of the 2 fps frame index: a generated utterance at frame i may match a reference
# at frame j when l <= j - i <= r (ProAssist's get_match_time_window, in seconds, times 2 fps).
# The order matters: names are matched by substring in this order, as ProAssist does, so that
# "ego4d_narration" gets the narration window rather than the ego4d one.
DATASET_WINDOWS = {
    "narration": (-5, 5),
    "ego4d": (-8, 17),
    "epickitchens": (-3, 6),
    "holoassist": (-3, 5),
    "egoexolearn": (-4, 7),
    "assembly101": (-4, 8),
    "wtag": (-6, 12),
}


# The synthetic demo's dataset name (python data.py make-demo): scored with the default window by design, so a
# known name. Matched exactly, not as a substring like the real datasets above.
DEMO_DATASET = "demo"


def window_for_dataset(name: str) -> tuple[tuple[int, int], bool]:
    """Return ((l, r), known) for a dataset name; frames of the 2 fps frame index.

    An unknown name gets DEFAULT_WINDOW with known=False; the caller logs the warning (a silent
    default would make metrics of a new dataset look comparable when they are not).
    """
    if name == DEMO_DATASET:
        return DEFAULT_WINDOW, True
    lowered = name.lower()
    for dataset, window in DATASET_WINDOWS.items():
        if dataset in lowered:
            return window, True
    return DEFAULT_WINDOW, False


# ---------------------------------------------------------------------------------------------
# Speaking: ProAssist's bipartite matching
# ---------------------------------------------------------------------------------------------

GOOD_MATCH_THRESHOLD = 0.5  # a match is good when its semantic score is > 0.5
DISTANCE_COST_WEIGHT = 0.3  # distance cost at the window edge, as in ProAssist's evaluator
DISTANCE_COST_POWER = 1.5
# Added to every finite cost so that an exact-zero cost (exact text at the exact frame) stays an
# edge of the sparse graph. Every full matching has one edge per generated talk, so shifting all
# costs by the same constant leaves the optimum unchanged.
ZERO_COST_SHIFT = 1e-6


@dataclass(frozen=True)
class TalkMatch:
    """A generated utterance assigned to a reference utterance."""

    gen_frame: int
    ref_frame: int
    gen_text: str
    ref_text: str
    score: float  # semantic score |cos(e(gen), e(ref))|

    @property
    def good(self) -> bool:
        return self.score > GOOD_MATCH_THRESHOLD


@dataclass(frozen=True)
class VideoMatch:
    """The outcome of the matching on one video."""

    matches: list[TalkMatch]
    redundant_frames: list[int]  # generated talk assigned to a silent frame
    missed_frames: list[int]  # reference talk that no generated talk was assigned to


def speaking_metrics(
    videos: Sequence[dict],
    embed: Embed,
    window: tuple[int, int] = DEFAULT_WINDOW,
    fps: float = 2,
    zero_cost_quirk: bool = False,
) -> dict:
    """The `speak` block of metrics.json (docs/evaluation.md#metricsjson) for a list of videos.

    Each video is {"num_frames": N, "pred": [(frame, text), ...], "ref": [(frame, text), ...]},
    optionally with its own "window" (videos of several datasets in one split).
    See match_speaking for the matching and summarize_speaking for the definitions.
    """
    return summarize_speaking(match_speaking(videos, embed, window, zero_cost_quirk), fps)


def match_speaking(
    videos: Sequence[dict],
    embed: Embed,
    window: tuple[int, int] = DEFAULT_WINDOW,
    zero_cost_quirk: bool = False,
) -> list[VideoMatch]:
    """Match generated talk to reference talk in each video, ProAssist's way (docs/evaluation.md#speaking-metrics).

    One talk per frame: several predictions (or references) at one frame are one turn, their
    texts joined with a space, as the sequence layout joins assistant turns (docs/sequence.md#layout). A text
    that is empty or blank is silence, as in ProAssist (whose no-talk marker is ""): the head
    fired but nothing was said, which decision_metrics scores, not this matching.

    Each generated talk i is a row; the columns are all N frames. Cost of (i, j) = match cost
    (1 - |cos| between the texts if frame j has reference talk, 1 if it is silent) + distance cost
    0.3 * (|i - j| / max(|l|, r)) ** 1.5, in float32; (i, j) is an edge only if l <= j - i <= r.
    scipy's min_weight_full_bipartite_matching assigns every row a distinct column.

    zero_cost_quirk=True reproduces ProAssist exactly: it builds the sparse matrix from the dense
    costs, so an exact-zero cost is not an edge and a perfect prediction is scored as redundant
    plus missed. By default ZERO_COST_SHIFT keeps those entries.

    A video's own "window" entry, if any, replaces `window` for that video. All texts that meet
    within a window are embedded in one call to `embed`.
    """
    talk_by_video = []
    for index, video in enumerate(videos):
        num_frames = _num_frames(video, index)
        video_window = _check_window(video.get("window", window))
        gen = _texts_by_frame(_field(video, "pred", index), num_frames, f"video {index} pred")
        ref = _texts_by_frame(_field(video, "ref", index), num_frames, f"video {index} ref")
        talk_by_video.append((num_frames, video_window, gen, ref))

    text_pairs = {
        (gen[i], ref[j])
        for num_frames, video_window, gen, ref in talk_by_video
        for i in gen
        for j in _window_columns(i, video_window, num_frames)
        if j in ref
    }
    abs_cosines = _abs_cosines(sorted(text_pairs), embed)
    return [
        _match_video(index, num_frames, gen, ref, abs_cosines, video_window, zero_cost_quirk)
        for index, (num_frames, video_window, gen, ref) in enumerate(talk_by_video)
    ]


def summarize_speaking(video_matches: Sequence[VideoMatch], fps: float = 2) -> dict:
    """The `speak` dict from matched videos; counts are summed over videos before dividing.

    precision = good / (matched + redundant), recall = good / (matched + missed),
    jaccard = good / (matched + missed + redundant), missing_rate = missed / (matched + missed),
    redundant_rate = redundant / (matched + redundant), semantic_score = mean score of the matches
    with score >= 0.5, time_diff = mean |i - j| / fps in seconds over the good matches.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    matches = [match for video in video_matches for match in video.matches]
    good_matches = [match for match in matches if match.good]
    num_matched, num_good = len(matches), len(good_matches)
    num_missed = sum(len(video.missed_frames) for video in video_matches)
    num_redundant = sum(len(video.redundant_frames) for video in video_matches)

    precision = _ratio(num_good, num_matched + num_redundant)
    recall = _ratio(num_good, num_matched + num_missed)
    # ProAssist averages the semantic score over score >= 0.5 but calls a match good only when
    # score > 0.5; kept as is so that the numbers compare.
    confident_scores = [match.score for match in matches if match.score >= GOOD_MATCH_THRESHOLD]
    time_diffs = [abs(match.gen_frame - match.ref_frame) / fps for match in good_matches]
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "jaccard": _ratio(num_good, num_matched + num_missed + num_redundant),
        "missing_rate": _ratio(num_missed, num_matched + num_missed),
        "redundant_rate": _ratio(num_redundant, num_matched + num_redundant),
        "semantic_score": _mean(confident_scores),
        "time_diff": _mean(time_diffs),
        "num_good": num_good,
        "num_matched": num_matched,
        "num_missed": num_missed,
        "num_redundant": num_redundant,
    }


def good_match_pairs(video_matches: Sequence[VideoMatch]) -> list[tuple[str, str]]:
    """(generated, reference) texts of the good matches, the input of nlg_metrics."""
    return [
        (match.gen_text, match.ref_text)
        for video in video_matches
        for match in video.matches
        if match.good
    ]


def _match_video(
    video_index: int,
    num_frames: int,
    gen: dict[int, str],
    ref: dict[int, str],
    abs_cosines: dict[tuple[str, str], np.float32],
    window: tuple[int, int],
    zero_cost_quirk: bool,
) -> VideoMatch:
    if not gen:
        return VideoMatch(matches=[], redundant_frames=[], missed_frames=list(ref))

    left, right = window
    distance_scale = np.float32(
        DISTANCE_COST_WEIGHT / max(-left, right) ** DISTANCE_COST_POWER
    )
    gen_frames = list(gen)
    rows, columns, costs = [], [], []
    for row, i in enumerate(gen_frames):
        frames = _window_columns(i, window, num_frames)
        match_cost = np.ones(len(frames), dtype=np.float32)
        for k, j in enumerate(frames):
            if j in ref:
                match_cost[k] = np.float32(1) - abs_cosines[(gen[i], ref[j])]
        window_columns = np.array(frames)
        distance = np.abs(window_columns - i).astype(np.float32)
        distance_cost = distance ** np.float32(DISTANCE_COST_POWER) * distance_scale
        rows.append(np.full(len(window_columns), row))
        columns.append(window_columns)
        costs.append(match_cost + distance_cost)  # float32, as ProAssist's torch tensors
    rows, columns, costs = np.concatenate(rows), np.concatenate(columns), np.concatenate(costs)

    if zero_cost_quirk:
        # ProAssist calls csr_matrix(dense_costs): zeros are not stored, so they are not edges.
        # Its out-of-window entries are +inf, which scipy drops before matching. Keeping only
        # the finite nonzero in-window entries therefore builds the identical graph (same
        # entries, same order, hence the same solution) without a dense (G, N) matrix.
        keep = costs != 0
        data = costs[keep].astype(np.float64)
        rows, columns = rows[keep], columns[keep]
    else:
        data = costs.astype(np.float64) + ZERO_COST_SHIFT
    graph = csr_matrix((data, (rows, columns)), shape=(len(gen_frames), num_frames))

    # A full matching always exists by default: every generated talk has its own frame among its
    # columns (j - i = 0 is inside any window with l <= 0 <= r) and no two talks share a frame,
    # so the identity assignment is feasible. Only the quirk can remove that column, and only
    # when it has cost exactly 0; a Hall violation then needs a tiny video (e.g. one frame whose
    # prediction is exact). ProAssist raises there too, so we do the same, with a clear message.
    try:
        assigned_rows, assigned_columns = min_weight_full_bipartite_matching(graph)
    except ValueError as error:
        if not zero_cost_quirk:
            raise
        raise ValueError(
            f"video {video_index}: no full matching exists with zero_cost_quirk=True (exact "
            f"predictions lost their only feasible frames, {num_frames} frames in the video); "
            "ProAssist's evaluator fails here as well. Score it with zero_cost_quirk=False."
        ) from error

    matches, redundant_frames = [], []
    for row, j in zip(assigned_rows, assigned_columns):
        i, j = gen_frames[row], int(j)
        if j in ref:
            # ProAssist reports 1 - match cost: |cos| up to float32 rounding. Same numbers here.
            score = 1.0 - float(np.float32(1) - abs_cosines[(gen[i], ref[j])])
            matches.append(TalkMatch(i, j, gen[i], ref[j], score))
        else:
            redundant_frames.append(i)
    matched_ref_frames = {match.ref_frame for match in matches}
    missed_frames = [j for j in ref if j not in matched_ref_frames]
    return VideoMatch(matches, redundant_frames, missed_frames)


def _window_columns(i: int, window: tuple[int, int], num_frames: int) -> list[int]:
    left, right = window
    return list(range(max(0, i + left), min(num_frames, i + right + 1)))


def _abs_cosines(
    text_pairs: list[tuple[str, str]], embed: Embed
) -> dict[tuple[str, str], np.float32]:
    """|cos| between the embeddings of each (generated, reference) text pair, as float32."""
    if not text_pairs:
        return {}
    texts = sorted({text for pair in text_pairs for text in pair})
    vectors = np.asarray(embed(texts), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(
            f"embed returned shape {vectors.shape} for {len(texts)} texts; expected (n, d)"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector (a bag of words of a text without words) has no direction: cosine 0.
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    row_of = {text: row for row, text in enumerate(texts)}
    gen_rows = [row_of[gen_text] for gen_text, _ in text_pairs]
    ref_rows = [row_of[ref_text] for _, ref_text in text_pairs]
    cosines = np.einsum("nd,nd->n", unit[gen_rows], unit[ref_rows])
    return dict(zip(text_pairs, np.abs(cosines).astype(np.float32)))


def _texts_by_frame(entries: Sequence, num_frames: int, where: str) -> dict[int, str]:
    """{frame: text} of the talk, sorted by frame, texts at one frame joined with a space."""
    texts: dict[int, list[str]] = {}
    for frame, text in entries:
        frame = _check_frame(frame, num_frames, where)
        if not isinstance(text, str):
            raise TypeError(f"{where}: text at frame {frame} is {type(text).__name__}, not str")
        if text.strip():
            texts.setdefault(frame, []).append(text)
    return {frame: " ".join(parts) for frame, parts in sorted(texts.items())}


# ---------------------------------------------------------------------------------------------
# Dialogue state tracking and decision quality
# ---------------------------------------------------------------------------------------------


def dst_metrics(videos: Sequence[dict], window: tuple[int, int] = DEFAULT_WINDOW) -> dict:
    """The `dst` block of metrics.json (without the decision metrics), docs/evaluation.md#dst-metrics.

    Each video is {"num_frames": N, "pred": [(frame, step_id, transition), ...], "ref": [...],
    "pred_states": [[state per step] per frame], "ref_states": [...]} and optionally
    "num_invalid" (unparsable or illegal generated updates), "num_generated" (generated
    updates) and its own "window" (replacing `window` for that video). A transition is an item
    (step_id, transition) at a frame; items repeated at one frame count as many times as they
    appear.

    * precision/recall/F1: predicted items are matched one-to-one to equal reference items with
      l <= j - i <= r (i predicted frame, j reference frame), as many as possible and then with
      the least total |i - j|; counts summed over videos.
    * state_accuracy: mean over all frames of the fraction of steps whose predicted state equals
      the reference; joint_accuracy: fraction of frames where every step agrees. A video
      without steps has no state to track and adds no frames.
    * invalid_rate: sum of num_invalid / sum of num_generated.
    """
    num_pred = num_ref = num_matched = 0
    num_state_frames = num_joint_correct = 0
    state_accuracy_sum = 0.0
    num_invalid = num_generated = 0
    for index, video in enumerate(videos):
        num_frames = _num_frames(video, index)
        video_window = _check_window(video.get("window", window))
        pred_items = _transitions_by_item(video, "pred", index, num_frames)
        ref_items = _transitions_by_item(video, "ref", index, num_frames)
        num_pred += sum(len(frames) for frames in pred_items.values())
        num_ref += sum(len(frames) for frames in ref_items.values())
        for item in pred_items.keys() & ref_items.keys():
            num_matched += _count_window_matches(pred_items[item], ref_items[item], video_window)

        pred_states = _state_matrix(video, "pred_states", index, num_frames)
        ref_states = _state_matrix(video, "ref_states", index, num_frames)
        if pred_states.shape != ref_states.shape:
            raise ValueError(
                f"video {index}: pred_states has {pred_states.shape[1]} steps per frame but "
                f"ref_states has {ref_states.shape[1]}"
            )
        if ref_states.shape[1] > 0:
            agree = pred_states == ref_states  # (frames, steps)
            state_accuracy_sum += float(agree.mean(axis=1).sum())
            num_joint_correct += int(agree.all(axis=1).sum())
            num_state_frames += num_frames

        video_invalid = _count(video, "num_invalid", index)
        video_generated = _count(video, "num_generated", index)
        if video_invalid > video_generated:
            raise ValueError(
                f"video {index}: num_invalid {video_invalid} > num_generated {video_generated}"
            )
        num_invalid += video_invalid
        num_generated += video_generated

    precision = _ratio(num_matched, num_pred)
    recall = _ratio(num_matched, num_ref)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "state_accuracy": _ratio(state_accuracy_sum, num_state_frames),
        "joint_accuracy": _ratio(num_joint_correct, num_state_frames),
        "invalid_rate": _ratio(num_invalid, num_generated),
    }


def _count_window_matches(
    pred_frames: list[int], ref_frames: list[int], window: tuple[int, int]
) -> int:
    """Size of a one-to-one matching of equal items within the window, min total |i - j|.

    linear_sum_assignment rather than the sparse full matching of the speaking metric: here a
    predicted item with no reference in its window is ordinary, and a full matching would then
    not exist. The groups are tiny (a step starts and completes about once per video), so the
    dense problem costs nothing. An out-of-window pair costs more than all in-window pairs
    together, so the assignment first maximises the number of matches, then minimises distance.
    """
    left, right = window
    offsets = np.array(ref_frames)[None, :] - np.array(pred_frames)[:, None]  # (pred, ref): j - i
    allowed = (offsets >= left) & (offsets <= right)
    distance = np.abs(offsets).astype(np.float64)
    forbidden_cost = distance[allowed].sum() + 1.0
    rows, columns = linear_sum_assignment(np.where(allowed, distance, forbidden_cost))
    return int(allowed[rows, columns].sum())


def _transitions_by_item(
    video: dict, key: str, index: int, num_frames: int
) -> dict[tuple, list[int]]:
    """{(step_id, transition): [frame, ...]} of one video's predicted or reference events."""
    frames_by_item: dict[tuple, list[int]] = {}
    for frame, step_id, transition in _field(video, key, index):
        frame = _check_frame(frame, num_frames, f"video {index} {key}")
        frames_by_item.setdefault((step_id, transition), []).append(frame)
    return frames_by_item


def _state_matrix(video: dict, key: str, index: int, num_frames: int) -> np.ndarray:
    """(frames, steps) object array of step states, checked for one row per frame."""
    states, where = _field(video, key, index), f"video {index} {key}"
    if len(states) != num_frames:
        raise ValueError(f"{where}: {len(states)} rows for {num_frames} frames")
    widths = {len(row) for row in states}
    if len(widths) > 1:
        raise ValueError(f"{where}: rows have different numbers of steps {sorted(widths)}")
    num_steps = widths.pop() if widths else 0
    matrix = np.empty((num_frames, num_steps), dtype=object)
    for frame, row in enumerate(states):
        matrix[frame, :] = list(row)
    return matrix


def decision_metrics(probs: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """Precision, recall, F1 (decision p > threshold, as the evaluator decides) and AUROC.

    AUROC is the Mann-Whitney rank statistic with tied probabilities given their average rank
    (a tie counts one half); None when only one class is present.
    """
    probs = np.asarray(probs, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if probs.shape != labels.shape:
        raise ValueError(f"{probs.size} probabilities but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()))}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite")
    positive = labels == 1
    predicted = probs > threshold
    true_positives = int((predicted & positive).sum())
    precision = _ratio(true_positives, int(predicted.sum()))
    recall = _ratio(true_positives, int(positive.sum()))

    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    auroc = None
    if num_positive and num_negative:
        ranks = rankdata(probs)  # ties get their average rank
        rank_sum = ranks[positive].sum() - num_positive * (num_positive + 1) / 2
        auroc = float(rank_sum / (num_positive * num_negative))
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "auroc": auroc,
    }


# ---------------------------------------------------------------------------------------------
# Input checks and arithmetic shared by the metrics above
# ---------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0/0 (nothing to count) defined as 0.0, as ProAssist does."""
    return float(numerator / denominator) if denominator else 0.0


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _check_window(window: Sequence[int]) -> tuple[int, int]:
    is_integer = [isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window]
    if len(window) != 2 or not all(is_integer):
        raise TypeError(f"window must be two integers (frames), got {window!r}")
    left, right = window
    if not left <= 0 <= right or left == right:
        raise ValueError(f"window (l, r) must have l <= 0 <= r and l < r, got {window!r}")
    return int(left), int(right)


def _field(video: dict, key: str, index: int):
    if key not in video:
        raise KeyError(f"video {index} has no {key!r} field")
    return video[key]


def _num_frames(video: dict, index: int) -> int:
    return _non_negative_int(_field(video, "num_frames", index), f"video {index} num_frames")


def _count(video: dict, key: str, index: int) -> int:
    return _non_negative_int(video.get(key, 0), f"video {index} {key}")


def _non_negative_int(value, where: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_frame(frame, num_frames: int, where: str) -> int:
    if not isinstance(frame, (int, np.integer)) or isinstance(frame, bool):
        raise TypeError(f"{where}: frame {frame!r} is not an integer")
    if not 0 <= frame < num_frames:
        raise ValueError(f"{where}: frame {frame} is outside the video's frames [0, {num_frames})")
    return int(frame)
