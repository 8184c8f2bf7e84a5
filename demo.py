"""Demo dataset: a small, learnable, deterministic dataset in the exact input format of docs/data_format.md.

    python data.py make-demo --out data/demo --seed 0 --videos 60     # the CLI lives in data.py

`make_demo(out_dir, seed, num_videos)` writes

    out_dir/train.json, val.json, test.json   lists of clip objects (docs/data_format.md), split by video
    out_dir/features/<video_uid>.arrow        ProAssist layout: row k = absolute frame k,
                                              columns `cls` (1 x 64) and `2x2` (4 x 64), float16
    out_dir/model/                            tokenizer trained here + config.json of a tiny Llama
                                              (no weights: the demo trains from scratch)

The task is learnable from what the model has seen so far:

* Each frame's feature is a fixed prototype of the current (task, phase) plus small Gaussian noise, where
  the phase is "idle" (before step 1), one of the task's steps, or "done" (after the last step).
* The first frame of step i carries `S{i-1} complete` + `S{i} start` (two DST_UPDATE turns) and an
  assistant line built from the step name; the first "done" frame carries the last `complete` and a
  closing line.
* In some steps the user "struggles" for 1-2 frames: a distinct pattern is added to the features, and the
  first frame that shows it carries a tip about the current step.
* Occasionally the user asks a question (input); the answer, derived from the true state, follows at the
  same frame.

Every turn caused by something first visible at frame k gets time t = (k + 1) / fps, which the event-frame
rule `k(t) = floor(t * fps + 1e-6) - 1` attaches back to frame k. Long videos are cut into consecutive
clips at frames where a step is in progress, so clips with clip_idx > 0 start mid-step with a non-trivial
initial state.

Determinism: every random draw comes from numpy generators keyed by (seed, stream, index); files are
written in a fixed order with fixed formatting, so the same seed gives byte-identical files. The
tokenizer is trained on an enumeration of every text the generator can produce, so it does not depend on
the seed at all.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from clips import STATES
from frames import require_pillow
from metrics import DEMO_DATASET

# ---------------------------------------------------------------------------------------------------------
# Format constants (the clip fields of docs/data_format.md)
# ---------------------------------------------------------------------------------------------------------

DATASET_NAME = DEMO_DATASET  # metrics scores it with the default window
FPS = 2
FEATURE_DIM = 64
NUM_PATCHES = 4  # the `2x2` column; I = 5 uses cls + these four
NUM_TOKENS_PER_IMG = 1
MAX_SEQ_LEN = 1024  # clips are at most ~110 frames: even at I = 5 a clip renders to well under this
SPLITS = ("train", "val", "test")
FEATURES_DIR = "features"
FRAMES_DIR = "frames"  # --raw-frames: base64 JPEG rows, the raw-frame layout
MODEL_DIR = "model"

# Same sentence as ProAssist's data (and the sample clip).
SYSTEM_PROMPT = (
    "You are a helpful and proactive assistant. "
    "Always be ready to assist and provide useful information ahead of time."
)

# ---------------------------------------------------------------------------------------------------------
# Generator constants
# ---------------------------------------------------------------------------------------------------------

DEFAULT_TRAIN_VIDEOS = 60
EVAL_VIDEOS_PER_TRAIN_VIDEO = 1 / 6  # val and test each get this fraction of the train count ...
MIN_EVAL_VIDEOS = 2  # ... but never fewer than this

# Frame counts, inclusive ranges. Steps last 4-12 s at 2 fps, so a typical video (~100 frames) is long
# enough that about half of the videos are cut into two clips.
IDLE_FRAMES = (2, 6)
STEP_FRAMES = (8, 24)
DONE_FRAMES = (3, 6)

# Mid-step tips: a step of at least TIP_MIN_STEP_FRAMES frames gets a struggle episode with this
# probability; the episode lasts 1-2 frames and keeps TIP_MARGIN_FRAMES away from the step's boundaries,
# so it never touches a step-start frame.
TIP_PROBABILITY = 0.35
TIP_MIN_STEP_FRAMES = 8
TIP_MARGIN_FRAMES = 2
STRUGGLE_FRAMES = (1, 2)

QUESTIONS_PER_VIDEO = (0, 2)

# Features: prototypes are standard-normal vectors (norm ~ sqrt(64) = 8, pairwise cosine ~ +-0.125, so
# nearest-prototype classification is trivial), entries of order 1 (safe in fp16, no normalisation
# needed by the projector). Per-entry noise NOISE_STD; the struggle pattern is a separate random vector
# scaled by STRUGGLE_STRENGTH, large enough to see, small enough that the step's prototype stays nearest.
NOISE_STD = 0.3
STRUGGLE_STRENGTH = 0.75

# Clip cutting: videos longer than CLIP_TARGET_FRAMES are cut into ceil(n / CLIP_TARGET_FRAMES) clips of
# about equal length; each cut moves at most BOUNDARY_SEARCH_FRAMES to land inside a step.
CLIP_TARGET_FRAMES = 90
BOUNDARY_SEARCH_FRAMES = 8

# Random streams: each stream gets its own generator keyed by (seed, stream, ...), so adding draws to
# one part of the generator never shifts the others (e.g. val videos do not change with the train size).
PROTOTYPE_STREAM = 0
TASK_ORDER_STREAM = 1
VIDEO_STREAM = 2
FRAME_STREAM = 3  # pixel noise of the raw frames: a stream of its own, so the feature files do not change

# Raw frames (--raw-frames): each frame shows its phase's prototype as an 8x8 grid of colour cells (channel c
# = the first 64 values of cls, 2x2[0], 2x2[1]), each cell FRAME_SIZE / 8 pixels wide, plus the struggle
# pattern and per-pixel noise: the same information as the features, visible to a vision tower.
FRAME_GRID = 8
PIXEL_MID, PIXEL_SCALE = 128, 40  # prototype value v -> pixel 128 + 40 v (prototype entries are ~N(0, 1))
JPEG_QUALITY = 95
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# ---------------------------------------------------------------------------------------------------------
# Tokenizer and tiny-model constants
# ---------------------------------------------------------------------------------------------------------

# Llama's order: <unk> 0, <s> 1, </s> 2. The project's own tokens (<image>, [USER], [DST], [ASST]) are
# deliberately absent: the data loader adds them.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
# An upper bound: with min_frequency 1 the trainer merges until every word of the corpus is one token
# (679 tokens), then stops. Whole-word tokens keep the demo's sequences short.
TOKENIZER_VOCAB_SIZE = 768
TOKENIZER_MIN_FREQUENCY = 1

MODEL_HIDDEN_SIZE = 128
MODEL_INTERMEDIATE_SIZE = 384
MODEL_NUM_LAYERS = 3
MODEL_NUM_HEADS = 4
MODEL_NUM_KV_HEADS = 2
MODEL_MAX_POSITIONS = 2048  # >= MAX_SEQ_LEN, leaves room for whole-video streaming evaluation

# ---------------------------------------------------------------------------------------------------------
# Tasks and texts
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    slug: str  # goes into video_uid
    goal: str  # inferred_goal
    steps: tuple[str, ...]  # step names: S1, S2, ...


TASKS = (
    Task("make_tea", "Make a cup of tea", (
        "Fill the kettle with water", "Boil the water", "Put a tea bag in the cup",
        "Pour the hot water into the cup", "Let the tea steep", "Remove the tea bag")),
    Task("assemble_shelf", "Assemble a wooden shelf", (
        "Lay out the panels", "Attach the side panels", "Insert the shelves",
        "Screw in the back panel", "Stand the shelf upright")),
    Task("repot_plant", "Repot a house plant", (
        "Prepare the new pot", "Add fresh soil to the pot", "Take the plant out of the old pot",
        "Loosen the roots", "Place the plant in the new pot", "Fill the gaps with soil", "Water the plant")),
    Task("change_bike_tire", "Change a bike tire", (
        "Remove the wheel", "Take off the old tire", "Fit the new tube", "Mount the new tire",
        "Inflate the tire", "Put the wheel back on")),
    Task("make_sandwich", "Make a cheese sandwich", (
        "Lay out two slices of bread", "Spread the butter", "Add the cheese", "Add the lettuce",
        "Close and cut the sandwich")),
    Task("wash_dishes", "Wash the dishes", (
        "Fill the sink with warm water", "Scrub the dishes", "Rinse the dishes", "Dry the dishes")),
)

# Assistant templates; {step} is the lower-cased step name. Which one is used is drawn per event, so the
# text is not fully predictable, as in real data.
FIRST_STEP_TEMPLATES = ("Let's get started. First, {step}.", "Let's begin: {step}.")
NEXT_STEP_TEMPLATES = ("Now, {step}.", "Next step: {step}.", "Good job. Next, {step}.")
FINISHED_TEMPLATES = ("All done! Great work.", "That's it, the task is complete.")
TIP_TEMPLATES = ("Tip: take your time to {step}.", "Careful now, {step} slowly.")

QUESTIONS = {
    "next": "What should I do next?",
    "left": "How many steps are left?",
    "current": "What step am I on?",
}
QUESTION_KINDS = tuple(QUESTIONS)

def answer_question(kind: str, task: Task, current_step: int) -> str:
    """The answer to a user question asked while step `current_step` (1-based) is in progress."""
    num_steps = len(task.steps)
    current = task.steps[current_step - 1].lower()
    if kind == "next":
        if current_step < num_steps:
            return f"Finish the current step, then {task.steps[current_step].lower()}."
        return "Finish the current step, then you are done."
    if kind == "left":
        steps_left = num_steps - current_step + 1  # the current step is not completed yet
        if steps_left == 1:
            return "Only this last step is left."
        return f"{steps_left} steps are left, including this one."
    if kind == "current":
        return f"You are on step {current_step} of {num_steps}: {current}."
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def step_id(step: int) -> str:
    return f"S{step}"


# ---------------------------------------------------------------------------------------------------------
# Feature prototypes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prototypes:
    """Feature prototypes drawn once from the seed.

    Phase p of task t (0 = idle, 1..n = step, n + 1 = done) has row `offsets[t] + p` of `cls` (P, D) and of
    `patches` (P, NUM_PATCHES, D). The struggle pattern is added on top of the current phase's prototype.
    """

    cls: np.ndarray  # (P, D) float64
    patches: np.ndarray  # (P, NUM_PATCHES, D) float64
    struggle_cls: np.ndarray  # (D,)
    struggle_patches: np.ndarray  # (NUM_PATCHES, D)
    offsets: tuple[int, ...]  # first row of each task

    def row(self, task_index: int, phase: int) -> int:
        return self.offsets[task_index] + phase


def make_prototypes(seed: int) -> Prototypes:
    """The prototypes `make_demo(seed=seed)` uses (public so that tests can classify frames)."""
    rng = np.random.default_rng([seed, PROTOTYPE_STREAM])
    phases_per_task = [len(task.steps) + 2 for task in TASKS]  # idle + steps + done
    offsets = tuple(int(x) for x in np.cumsum([0] + phases_per_task[:-1]))
    num_rows = sum(phases_per_task)
    # Plain standard-normal draws (no QR / normalisation): no BLAS call, so no platform-dependent rounding.
    return Prototypes(
        cls=rng.standard_normal((num_rows, FEATURE_DIM)),
        patches=rng.standard_normal((num_rows, NUM_PATCHES, FEATURE_DIM)),
        struggle_cls=STRUGGLE_STRENGTH * rng.standard_normal(FEATURE_DIM),
        struggle_patches=STRUGGLE_STRENGTH * rng.standard_normal((NUM_PATCHES, FEATURE_DIM)),
        offsets=offsets,
    )


# ---------------------------------------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Event:
    """One conversation turn, attached to the frame where its cause first becomes visible."""

    frame: int
    turn: dict  # role, content, labels; `time` is added from `frame` when the clip is written


@dataclass
class VideoPlan:
    video_uid: str
    task_index: int
    phases: np.ndarray  # (N,) int: 0 idle, i = step i, n + 1 done
    struggle: np.ndarray  # (N,) bool: the struggle pattern is visible in this frame
    step_frames: list[tuple[int, int]]  # [first, end) frames of each step
    events: list[Event]  # sorted by frame; turns of one frame in conversation order

    @property
    def task(self) -> Task:
        return TASKS[self.task_index]

    @property
    def num_frames(self) -> int:
        return len(self.phases)


def event_time(frame: int) -> float:
    """The time of a turn caused by something first visible at `frame`: the event-frame rule attaches it to `frame`."""
    return (frame + 1) / FPS


def plan_video(rng: np.random.Generator, video_uid: str, task_index: int) -> VideoPlan:
    """Draw one video's timeline: phases per frame, struggle frames and the turns they cause."""
    task = TASKS[task_index]
    num_steps = len(task.steps)
    num_idle = int(rng.integers(IDLE_FRAMES[0], IDLE_FRAMES[1] + 1))
    durations = [int(d) for d in rng.integers(STEP_FRAMES[0], STEP_FRAMES[1] + 1, size=num_steps)]
    num_done = int(rng.integers(DONE_FRAMES[0], DONE_FRAMES[1] + 1))

    step_frames = []
    step_start = num_idle
    for duration in durations:
        step_frames.append((step_start, step_start + duration))
        step_start += duration
    done_frame = step_start  # the first frame after the last step
    num_frames = done_frame + num_done
    phases = np.zeros(num_frames, dtype=np.int64)
    for step, (first, end) in enumerate(step_frames, start=1):
        phases[first:end] = step
    phases[done_frame:] = num_steps + 1

    events: list[Event] = []

    def dst_update(frame: int, step: int, transition: str) -> None:
        events.append(Event(frame, {
            "role": "DST_UPDATE",
            "content": [{"id": step_id(step), "transition": transition}],
            "labels": f"initiative|dst_update,dst_{transition}",
        }))

    def say(frame: int, text: str, labels: str) -> None:
        events.append(Event(frame, {"role": "assistant", "content": text, "labels": labels}))

    # Step boundaries: the previous step completes and the next starts at the new phase's first frame.
    for step, (first, _) in enumerate(step_frames, start=1):
        if step > 1:
            dst_update(first, step - 1, "complete")
        dst_update(first, step, "start")
        templates = FIRST_STEP_TEMPLATES if step == 1 else NEXT_STEP_TEMPLATES
        template = templates[int(rng.integers(len(templates)))]
        say(first, template.format(step=task.steps[step - 1].lower()), "initiative|step_start")
    dst_update(done_frame, num_steps, "complete")
    say(done_frame, FINISHED_TEMPLATES[int(rng.integers(len(FINISHED_TEMPLATES)))], "initiative|finished")

    # Struggle episodes and their tips, at the first frame showing the pattern.
    struggle = np.zeros(num_frames, dtype=bool)
    for step, (first, end) in enumerate(step_frames, start=1):
        if end - first < TIP_MIN_STEP_FRAMES or rng.random() >= TIP_PROBABILITY:
            continue
        length = int(rng.integers(STRUGGLE_FRAMES[0], STRUGGLE_FRAMES[1] + 1))
        onset = int(rng.integers(first + TIP_MARGIN_FRAMES, end - TIP_MARGIN_FRAMES - length + 1))
        struggle[onset:onset + length] = True
        template = TIP_TEMPLATES[int(rng.integers(len(TIP_TEMPLATES)))]
        say(onset, template.format(step=task.steps[step - 1].lower()), "initiative|tip")

    # User questions on frames where nothing else happens, so that each answer is the frame's only reply.
    busy = {event.frame for event in events} | {int(k) for k in np.flatnonzero(struggle)}
    candidates = [k for k in range(step_frames[0][0], done_frame) if k not in busy]
    num_questions = int(rng.integers(QUESTIONS_PER_VIDEO[0], QUESTIONS_PER_VIDEO[1] + 1))
    for frame in sorted(int(k) for k in rng.choice(candidates, size=num_questions, replace=False)):
        kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
        events.append(Event(frame, {"role": "user", "content": QUESTIONS[kind], "labels": "user|question"}))
        say(frame, answer_question(kind, task, int(phases[frame])), "responsive|answer")

    # Stable sort: turns of one frame keep their insertion order (DST updates, then user, then assistant).
    events.sort(key=lambda event: event.frame)
    return VideoPlan(video_uid, task_index, phases, struggle, step_frames, events)


def render_features(plan: VideoPlan, prototypes: Prototypes, rng: np.random.Generator):
    """Per-frame features: prototype of the frame's phase (+ struggle pattern) + noise, as float16.

    Returns `cls` (N, 1, D) and `patches` (N, NUM_PATCHES, D).
    """
    rows = np.array([prototypes.row(plan.task_index, int(p)) for p in plan.phases])
    struggle = plan.struggle.astype(np.float64)
    cls = prototypes.cls[rows] + struggle[:, None] * prototypes.struggle_cls
    patches = prototypes.patches[rows] + struggle[:, None, None] * prototypes.struggle_patches
    cls = cls + NOISE_STD * rng.standard_normal(cls.shape)
    patches = patches + NOISE_STD * rng.standard_normal(patches.shape)
    return cls[:, None, :].astype(np.float16), patches.astype(np.float16)


def clip_boundaries(plan: VideoPlan) -> list[tuple[int, int]]:
    """Cut the video into consecutive clips [start, end) of about equal length.

    Each cut c lies inside a step (frames c - 1 and c show the same step, so that step is in progress at
    the clip start) and no turn is attached to frame c - 1: the event-frame rule's clamp would let such a turn belong
    to both clips, and real data builders avoid that too.
    """
    num_clips = math.ceil(plan.num_frames / CLIP_TARGET_FRAMES)
    event_frames = {event.frame for event in plan.events}
    num_steps = len(plan.task.steps)

    def is_clean_cut(c: int) -> bool:
        in_step = 1 <= plan.phases[c] <= num_steps and plan.phases[c - 1] == plan.phases[c]
        return bool(in_step) and (c - 1) not in event_frames

    cuts = [0]
    for j in range(1, num_clips):
        target = round(plan.num_frames * j / num_clips)
        offsets = sorted(range(-BOUNDARY_SEARCH_FRAMES, BOUNDARY_SEARCH_FRAMES + 1), key=lambda o: (abs(o), o))
        cut = next((target + o for o in offsets if is_clean_cut(target + o)), None)
        if cut is None:
            raise RuntimeError(f"{plan.video_uid}: no clean clip boundary within {BOUNDARY_SEARCH_FRAMES} "
                               f"frames of frame {target}; widen BOUNDARY_SEARCH_FRAMES")
        cuts.append(cut)
    cuts.append(plan.num_frames)
    clips = list(zip(cuts[:-1], cuts[1:]))
    for start, end in clips:
        if not any(start <= event.frame < end for event in plan.events):
            raise RuntimeError(f"{plan.video_uid}: clip [{start}, {end}) has no turn; change the clip lengths")
    return clips


def state_before(plan: VideoPlan, frame: int) -> dict[str, str]:
    """The true dialogue state after every update attached to frames < `frame`."""
    state = {step_id(step): "not_started" for step in range(1, len(plan.task.steps) + 1)}
    for event in plan.events:
        if event.frame >= frame:
            break
        if event.turn["role"] == "DST_UPDATE":
            for update in event.turn["content"]:
                state[update["id"]] = "in_progress" if update["transition"] == "start" else "completed"
    return state


def clip_records(plan: VideoPlan, seed: int, frames_dir: str = FEATURES_DIR) -> list[dict]:
    """The clip objects of one video, in the clip format of docs/data_format.md; `frames_file` points into `frames_dir`."""
    task = plan.task
    dst = [
        {"type": "step", "id": step_id(step), "name": name,
         "start_ts": event_time(first), "end_ts": event_time(end)}
        for step, (name, (first, end)) in enumerate(zip(task.steps, plan.step_frames), start=1)
    ]
    knowledge = "\n".join([task.goal] + [f"{i}. {name}." for i, name in enumerate(task.steps, start=1)])
    records = []
    for clip_idx, (start, end) in enumerate(clip_boundaries(plan)):
        conversation = [{"role": "system", "content": SYSTEM_PROMPT, "labels": "system|generic"}]
        for event in plan.events:
            if start <= event.frame < end:
                turn = {"role": event.turn["role"], "content": event.turn["content"],
                        "time": event_time(event.frame), "labels": event.turn["labels"]}
                conversation.append(turn)
        records.append({
            "video_uid": plan.video_uid,
            "clip_idx": clip_idx,
            "dataset": DATASET_NAME,
            "frames_file": f"{frames_dir}/{plan.video_uid}.arrow",
            "start_frame_idx": start,
            "end_frame_idx": end,
            "fps": FPS,
            "num_tokens_per_img": NUM_TOKENS_PER_IMG,
            "max_seq_len": MAX_SEQ_LEN,
            "dst": dst,
            "conversation": conversation,
            "initial_dst_state": state_before(plan, start),
            # Extra fields, as real data has them: the loader must ignore them.
            "inferred_goal": task.goal,
            "inferred_knowledge": knowledge,
            "metadata": {"generator": "demo", "seed": seed, "task": task.slug, "video_frames": plan.num_frames},
        })
    return records


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------


def _nested_list_array(cells: np.ndarray) -> pa.Array:
    """(N, C, D) float16 -> list<list<float16>>: one C x D cell per row, as HF `datasets` writes them."""
    num_rows, num_cells, dim = cells.shape
    inner_offsets = pa.array(np.arange(0, num_rows * num_cells * dim + 1, dim, dtype=np.int32))
    inner = pa.ListArray.from_arrays(inner_offsets, pa.array(cells.reshape(-1)))
    outer_offsets = pa.array(np.arange(0, num_rows * num_cells + 1, num_cells, dtype=np.int32))
    return pa.ListArray.from_arrays(outer_offsets, inner)


def write_features(path: Path, cls: np.ndarray, patches: np.ndarray) -> None:
    """One Arrow IPC file per video: row k = absolute frame k (ProAssist layout, docs/data_format.md)."""
    cell_type = pa.list_(pa.list_(pa.float16()))
    schema = pa.schema([("cls", cell_type), ("2x2", cell_type)])
    table = pa.Table.from_arrays([_nested_list_array(cls), _nested_list_array(patches)], schema=schema)
    with pa.ipc.new_file(str(path), schema) as writer:
        writer.write_table(table)


def render_frame_images(plan: VideoPlan, prototypes: Prototypes, rng: np.random.Generator, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 images carrying each frame's prototype (+ struggle pattern) plus pixel noise."""
    if size < FRAME_GRID or size % FRAME_GRID:
        raise ValueError(f"frame size must be a positive multiple of {FRAME_GRID}, got {size}")
    rows = np.array([prototypes.row(plan.task_index, int(p)) for p in plan.phases])
    proto = np.stack([prototypes.cls[rows], prototypes.patches[rows, 0], prototypes.patches[rows, 1]], axis=1)  # (N, 3, D)
    struggle = np.stack([prototypes.struggle_cls, *prototypes.struggle_patches[:2]])  # (3, D)
    values = proto + plan.struggle[:, None, None] * struggle
    cells = FRAME_GRID * FRAME_GRID
    grid = values[:, :, :cells].reshape(len(rows), 3, FRAME_GRID, FRAME_GRID)  # (N, 3, 8, 8)
    cell = size // FRAME_GRID
    image = np.repeat(np.repeat(grid, cell, axis=2), cell, axis=3)  # (N, 3, size, size)
    image = image + NOISE_STD * rng.standard_normal(image.shape)
    pixels = np.clip(np.round(PIXEL_MID + PIXEL_SCALE * image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def write_raw_frames(path: Path, images: np.ndarray) -> None:
    """One Arrow IPC file per video in the raw-frame layout: column `frame`, base64 JPEG, row k = frame k."""
    Image = require_pillow()
    cells = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        cells.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    table = pa.table({"frame": pa.array(cells, type=pa.string())})
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def tokenizer_corpus() -> list[str]:
    """Every text the generator and the sequence builder can produce, in a fixed order.

    Enumerating them (instead of sampling videos) makes the tokenizer independent of the seed and covers
    the prompt scaffolding (docs/sequence.md#layout) that never appears in the clip files.
    """
    texts = [SYSTEM_PROMPT, "Task steps:", "Current state:", *QUESTIONS.values(), *FINISHED_TEMPLATES]
    for task in TASKS:
        num_steps = len(task.steps)
        texts.append(task.goal)
        for step, name in enumerate(task.steps, start=1):
            texts.append(f"{step_id(step)}: {name}")
            texts.extend(f"{step_id(step)}: {state}," for state in STATES)
            texts.append(f"{step_id(step - 1)}->complete, {step_id(step)}->start" if step > 1
                         else f"{step_id(step)}->start")
            templates = (FIRST_STEP_TEMPLATES if step == 1 else NEXT_STEP_TEMPLATES) + TIP_TEMPLATES
            texts.extend(template.format(step=name.lower()) for template in templates)
            texts.extend(answer_question(kind, task, step) for kind in QUESTION_KINDS)
        texts.append(f"{step_id(num_steps)}->complete")
    return texts


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text is encodable) trained on `tokenizer_corpus()`.

    pad is set equal to eos on purpose, as many real tokenizers ship: the data loader must detect it and add a
    distinct <pad>, or every EOS would be masked as padding and never trained.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=TOKENIZER_MIN_FREQUENCY,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        # The full byte alphabet keeps every byte encodable even if the corpus never shows it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input: the trainer's merges break count ties by pair, so the result depends only on the texts.
    tokenizer.train_from_iterator(sorted(tokenizer_corpus()), trainer=trainer)
    # Llama-style: the tokenizer prepends BOS itself, so "[BOS if the tokenizer uses one]" is exercised.
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        pad_token=EOS_TOKEN, model_max_length=MODEL_MAX_POSITIONS)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=MODEL_HIDDEN_SIZE,
        intermediate_size=MODEL_INTERMEDIATE_SIZE,
        num_hidden_layers=MODEL_NUM_LAYERS,
        num_attention_heads=MODEL_NUM_HEADS,
        num_key_value_heads=MODEL_NUM_KV_HEADS,
        max_position_embeddings=MODEL_MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def write_model_dir(model_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(str(model_dir))
    tiny_llama_config(tokenizer).save_pretrained(str(model_dir))
    return tokenizer


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def videos_per_split(num_videos: int | None) -> dict[str, int]:
    """Train count (default DEFAULT_TRAIN_VIDEOS); val and test scale with it, at least MIN_EVAL_VIDEOS."""
    num_train = DEFAULT_TRAIN_VIDEOS if num_videos is None else int(num_videos)
    if num_train < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    num_eval = max(MIN_EVAL_VIDEOS, round(num_train * EVAL_VIDEOS_PER_TRAIN_VIDEO))
    return {"train": num_train, "val": num_eval, "test": num_eval}


def make_demo(out_dir, seed: int = 0, num_videos: int | None = None, raw_frames: bool = False,
              frame_size: int = 32) -> dict:
    """Write the demo dataset (docs/data_format.md#the-demo-dataset) into `out_dir` and return a summary.

    `num_videos` is the number of train videos (val and test scale with it). Existing files with the same
    names are overwritten; nothing else in `out_dir` is touched. `raw_frames` also writes each video's frames
    as `frame_size` px JPEG rows under frames/ (Pillow needed; byte-identical for one Pillow version) and
    points the clips' frames_file there; the feature files are written either way.

    Returns {"out_dir", "seed", "fps", "feature_dim", "num_tokens_per_img", "max_seq_len", "model_dir",
    "features_dir", "vocab_size", "splits": {split: {"path", "videos", "clips", "frames"}}}.
    """
    out_dir = Path(out_dir)
    features_dir = out_dir / FEATURES_DIR
    model_dir = out_dir / MODEL_DIR
    features_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    frames_dir = out_dir / FRAMES_DIR
    if raw_frames:
        frames_dir.mkdir(parents=True, exist_ok=True)

    prototypes = make_prototypes(seed)
    counts = videos_per_split(num_videos)
    summary_splits = {}
    video_number = 0  # global, so a video_uid never repeats across splits
    for split in SPLITS:
        # Tasks cycle through a seeded order so that every split covers the tasks evenly.
        task_order = np.random.default_rng([seed, TASK_ORDER_STREAM, SPLIT_CODES[split]]).permutation(len(TASKS))
        clips, num_frames = [], 0
        for index in range(counts[split]):
            task_index = int(task_order[index % len(TASKS)])
            video_uid = f"{DATASET_NAME}_{TASKS[task_index].slug}_{video_number:03d}"
            video_number += 1
            rng = np.random.default_rng([seed, VIDEO_STREAM, SPLIT_CODES[split], index])
            plan = plan_video(rng, video_uid, task_index)
            cls, patches = render_features(plan, prototypes, rng)
            write_features(features_dir / f"{video_uid}.arrow", cls, patches)
            if raw_frames:
                pixel_rng = np.random.default_rng([seed, FRAME_STREAM, SPLIT_CODES[split], index])
                write_raw_frames(frames_dir / f"{video_uid}.arrow",
                                 render_frame_images(plan, prototypes, pixel_rng, frame_size))
            clips.extend(clip_records(plan, seed, FRAMES_DIR if raw_frames else FEATURES_DIR))
            num_frames += plan.num_frames
        split_path = out_dir / f"{split}.json"
        _write_json(split_path, clips)
        summary_splits[split] = {"path": str(split_path), "videos": counts[split], "clips": len(clips),
                                 "frames": num_frames}

    tokenizer = write_model_dir(model_dir)
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "fps": FPS,
        "feature_dim": FEATURE_DIM,
        "num_tokens_per_img": NUM_TOKENS_PER_IMG,
        "max_seq_len": MAX_SEQ_LEN,
        "model_dir": str(model_dir),
        "features_dir": str(features_dir),
        "frames_dir": str(frames_dir) if raw_frames else None,
        "vocab_size": len(tokenizer),
        "splits": summary_splits,
    }
