"""Benchmark data at the user's real shapes, generated locally (no download):

* long videos at 2 fps (3 clips of ~1,000 frames each by default), cut into clips that render to ~3.5k tokens
  at I = 1 with the tokenizer written here, within a 4,096-token budget;
* 1152-d float16 frame features (SigLIP-so400m's size) in the ProAssist per-video layout (`cls`, nested lists);
* ProAssist-like events: a task of 12 steps, DST updates and a reply at every step boundary, a spoken tip or
  remark every ~5 s in between, and an occasional user question answered at the same frame;
* `model/`: a byte-level BPE tokenizer trained on the generated text and the config.json of a model of
  Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8 heads, vocab 128,256, tied embeddings), random weights.

    python bench/make_bench_data.py --out data/bench                 # then: configs/bench.yaml
    python bench/make_bench_data.py --out data/bench --videos 4 --clips-per-video 2

The texts are random word sequences: the data is for measuring speed and memory, not for learning.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FPS = 2
FEATURE_DIM = 1152
STEPS_PER_TASK = 12
SYSTEM_PROMPT = ("You are a helpful and proactive assistant. "
                 "Always be ready to assist and provide useful information ahead of time.")
# Llama-3.2-1B's architecture (random weights): what the benchmarks build with --shape llama1b too.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
)
WORDS = (
    "the a now next take pick place attach screw tighten loosen insert remove hold turn rotate align check "
    "slowly carefully gently firmly left right top bottom front back side edge corner panel wheel bolt nut "
    "screwdriver wrench cabin chassis window door arm base cover plate rod pin clip cable tube board part "
    "piece small large red blue green black white yellow first second third last again before after until "
    "it its into onto with without from to of on in under over and then so but make sure keep press push "
    "pull lift lower slide fit match both all each other this that one two three four five good great well "
    "done almost ready careful quick step task tool hand fingers table work finished looks nice"
).split()


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(low, high + 1)))
    return " ".join(words).capitalize() + "."


def make_video(rng: np.random.Generator, uid: str, num_frames: int, clip_frames: int) -> tuple[list[dict], dict]:
    """The clip objects of one video and its features (num_frames, 1, F) float16."""
    step_len = num_frames // (STEPS_PER_TASK + 1)
    steps = []
    for s in range(STEPS_PER_TASK):
        first = step_len // 2 + s * step_len
        steps.append({"type": "step", "id": f"S{s + 1}", "name": sentence(rng, 3, 6).rstrip("."),
                      "start_ts": (first + 1) / FPS, "end_ts": (first + step_len + 1) / FPS})
    events: dict[int, list[dict]] = {}  # frame -> turns (the turn at frame k has time (k + 1) / fps)

    def add(frame: int, turn: dict) -> None:
        events.setdefault(frame, []).append({**turn, "time": (frame + 1) / FPS})

    for s, step in enumerate(steps):
        frame = round(step["start_ts"] * FPS) - 1
        updates = ([{"id": f"S{s}", "transition": "complete"}] if s else []) + [{"id": step["id"], "transition": "start"}]
        add(frame, {"role": "DST_UPDATE", "content": updates})
        add(frame, {"role": "assistant", "content": sentence(rng, 14, 22)})
    last = round(steps[-1]["end_ts"] * FPS) - 1
    add(last, {"role": "DST_UPDATE", "content": [{"id": steps[-1]["id"], "transition": "complete"}]})
    add(last, {"role": "assistant", "content": sentence(rng, 8, 14)})
    frame = 3
    while frame < num_frames - 2:
        frame += int(rng.integers(6, 15))  # a remark every ~5 s on average
        if frame >= num_frames - 1 or frame in events:
            continue
        if rng.random() < 0.1:
            add(frame, {"role": "user", "content": sentence(rng, 5, 10)[:-1] + "?"})
        add(frame, {"role": "assistant", "content": sentence(rng, 12, 22)})

    # Clip boundaries near multiples of clip_frames, where no turn is attached to the frame before the cut.
    cuts = [0]
    for j in range(1, num_frames // clip_frames):
        cut = j * clip_frames
        while cut - 1 in events:
            cut += 1
        cuts.append(cut)
    cuts.append(num_frames)
    clips = []
    for clip_idx, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
        conversation = [{"role": "system", "content": SYSTEM_PROMPT}]
        for k in sorted(events):
            if start <= k < end:
                conversation.extend(events[k])
        clips.append({
            "video_uid": uid, "clip_idx": clip_idx, "dataset": "assembly101", "frames_file": f"features/{uid}.arrow",
            "start_frame_idx": start, "end_frame_idx": end, "fps": FPS, "num_tokens_per_img": 1,
            "max_seq_len": 4096, "dst": steps, "conversation": conversation,
        })
    features = rng.standard_normal((num_frames, 1, FEATURE_DIM)).astype(np.float16)
    return clips, features


def write_features(path: Path, cls: np.ndarray) -> None:
    """ProAssist layout: row k = frame k, column `cls` as a nested 1 x F list of float16."""
    n, cells, dim = cls.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * cells * dim + 1, dim, dtype=np.int32)),
                                     pa.array(cls.reshape(-1)))
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * cells + 1, cells, dtype=np.int32)), inner)
    table = pa.table({"cls": column})
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def write_model_dir(model_dir: Path, texts: list[str]) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sorted(texts), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(model_dir))
    LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=2).save_pretrained(str(model_dir))


def make_bench_data(out: Path, videos: int = 8, clips_per_video: int = 3, frames_per_clip: int = 1000,
                    seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "features").mkdir(exist_ok=True)
    splits = {"train": videos, "val": max(1, videos // 4), "test": max(1, videos // 4)}
    texts = [SYSTEM_PROMPT, "Task steps:", "Current state: not_started, in_progress, completed", "->start, ->complete"]
    summary = {}
    number = 0
    for split, count in splits.items():
        clips = []
        for _ in range(count):
            rng = np.random.default_rng([seed, number])
            uid = f"bench_{number:03d}"
            number += 1
            video_clips, features = make_video(rng, uid, clips_per_video * frames_per_clip, frames_per_clip)
            write_features(out / "features" / f"{uid}.arrow", features)
            clips.extend(video_clips)
            texts.extend(t["content"] for c in video_clips for t in c["conversation"] if isinstance(t["content"], str))
            texts.extend(step["name"] for step in video_clips[0]["dst"])
        (out / f"{split}.json").write_text(json.dumps(clips))
        summary[split] = {"videos": count, "clips": len(clips)}
    write_model_dir(out / "model", texts)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/bench", help="output directory (default data/bench)")
    parser.add_argument("--videos", type=int, default=8, help="training videos (val and test get a quarter each)")
    parser.add_argument("--clips-per-video", type=int, default=3, help="clips per video")
    parser.add_argument("--frames-per-clip", type=int, default=1000, help="frames per clip at 2 fps")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    args = parser.parse_args()
    summary = make_bench_data(Path(args.out), args.videos, args.clips_per_video, args.frames_per_clip, args.seed)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
