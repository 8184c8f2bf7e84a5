"""Raw frames through a VLM's frozen vision tower (SmolVLM2 family), on a tiny random SmolVLM and the demo's
JPEG frames: preprocessing equal to the HF image processor, extraction into the feature layout (validated,
resumable), and equal features and losses for `data.frames: raw` and extracted features; checkpoints of both
kinds reload and stream."""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

PIL = pytest.importorskip("PIL", reason="raw JPEG frames need Pillow (pip install -r requirements-frames.txt)")
from PIL import Image  # noqa: E402

import demo  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from backbones import FrameEncoder, build_frame_encoder, load_vlm, pooled_tokens  # noqa: E402
from checkpoint import CheckpointMeta, load_for_inference, load_model_tensors, save_checkpoint  # noqa: E402
from clips import DataError, load_split  # noqa: E402
from config import load_config  # noqa: E402
from conftest import FRAME_SIZE, ROOT, TINY_VISION, run_train, write_tiny_vlm  # noqa: E402
from data import BatchPlan, ClipBatchSampler, ClipDataset, collate, model_inputs  # noqa: E402
from data import main as data_main  # noqa: E402
from extract import extract_features  # noqa: E402
from frames import FramePreprocessing, FrameStore, RawFrameReader, require_pillow  # noqa: E402
from model import build_model, model_state_for_checkpoint, param_groups  # noqa: E402
from sequence import Renderer, load_tokenizer  # noqa: E402
from stream import StreamingRunner, Thresholds, assemble_videos, raw_video_features, video_features  # noqa: E402


@pytest.fixture(scope="module")
def raw_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw_demo")
    demo.make_demo(out, seed=0, num_videos=3, raw_frames=True, frame_size=FRAME_SIZE)
    return out


@pytest.fixture(scope="module")
def tiny_vlm(raw_demo, tmp_path_factory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), raw_demo / "model")


def vlm_cfg(raw_demo: Path, tiny_vlm: Path, *overrides: str):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={raw_demo}", f"model.path={tiny_vlm}", "model.init=pretrained", "model.trainable=lora",
        "model.lora_rank=4", "model.lora_alpha=8", "data.num_workers=0", "data.feature_dim=64",
        "model.vision_batch_frames=7", "train.eval_every=0", "train.log_every=1", "optim.warmup_steps=1",
        "train.micro_batch=2", *overrides,
    ])


@pytest.fixture(scope="module")
def extracted(raw_demo, tiny_vlm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extracted")
    extract_features(vlm_cfg(raw_demo, tiny_vlm), out, num_workers=0, progress=False)
    return out


def features_overrides(extracted: Path) -> list[str]:
    return ["data.frames=features", f"data.features_path={extracted}/{{dataset}}/{{video_uid}}.arrow"]


def jpeg_cell(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and pooling


@pytest.mark.parametrize("height, width, video_size", [(48, 40, None), (30, 52, None), (48, 40, 32)])
def test_preprocessing_equals_the_hf_image_processor(tmp_path, height, width, video_size):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    conf = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "resample": 1,
            "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25], "rescale_factor": 1 / 255}
    if video_size:  # SmolVLM2 resizes video frames to video_sampling.video_size first, as its video processor does
        conf["video_sampling"] = {"fps": 1, "video_size": {"longest_edge": video_size}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(conf))
    prep = FramePreprocessing.from_model_dir(tmp_path)
    assert prep.resize_longest_edge == (video_size or 64) and prep.image_size == 32

    rng = np.random.default_rng(0)
    cells = [jpeg_cell(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(3)]
    from frames import decode_frames
    pixels = decode_frames(cells, prep, "test", 0)  # (3, 32, 32, 3) uint8
    encoder = FrameEncoder(load_tiny_tower(), torch.nn.Identity(), prep.pixel_table(), 1)
    ours = encoder.normalise(torch.from_numpy(pixels)).numpy()  # (3, 3, 32, 32)

    processor = SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": prep.resize_longest_edge}, max_image_size={"longest_edge": 32},
        resample=1, image_mean=conf["image_mean"], image_std=conf["image_std"], rescale_factor=1 / 255,
    )
    images = [Image.open(io.BytesIO(base64.b64decode(c))) for c in cells]
    theirs = processor(images=[[im] for im in images], return_tensors="np")["pixel_values"][:, 0]  # (3, 3, 32, 32)
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def load_tiny_tower():
    from transformers import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

    return SmolVLMVisionTransformer(SmolVLMVisionConfig(**TINY_VISION))


def test_pooled_tokens_are_means_over_the_token_grid():
    tokens = torch.randn(2, 16, 3)  # a 4x4 grid, row-major
    pooled = pooled_tokens(tokens)  # (2, 14, 3)
    grid = tokens.view(2, 4, 4, 3)
    assert torch.allclose(pooled[:, 0], tokens.mean(1))
    top_right = grid[:, 0:2, 2:4].reshape(2, 4, 3).mean(1)  # 2x2 cell (row 0, col 1)
    assert torch.allclose(pooled[:, 2], top_right)
    # 3x3 over 4 tokens: adaptive windows [0,2), [1,3), [2,4)
    assert torch.allclose(pooled[:, 5 + 4], grid[:, 1:3, 1:3].reshape(2, 4, 3).mean(1))  # centre cell
    with pytest.raises(ValueError, match="square grid"):
        pooled_tokens(torch.randn(1, 12, 3))


def test_frame_encoder_runs_the_vlm_tower_and_connector(raw_demo, tiny_vlm):
    """The encoder's tokens are the VLM's own image features (vision encoder + connector) of the same pixels."""
    vlm = load_vlm(tiny_vlm).eval()
    prep = FramePreprocessing.from_model_dir(tiny_vlm)
    encoder = FrameEncoder(vlm.model.vision_model, vlm.model.connector, prep.pixel_table(), 5, batch_frames=3)
    store = FrameStore(1, 64)
    clip = load_split(vlm_cfg(raw_demo, tiny_vlm), "train")[0][0]
    pixels = torch.from_numpy(RawFrameReader(store, prep).pixels(clip)[:7])
    with torch.no_grad():
        reference = vlm.model.get_image_features(encoder.normalise(pixels)[:, None]).pooler_output  # 7 x (16, 64)
    expected = pooled_tokens(torch.stack(list(reference)))[:, :5]  # cls + 2x2
    got = encoder(pixels).view(7, 5, 64)
    assert torch.allclose(got, expected.half().float())  # rounded to float16, like the feature files
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.vision_model.training
    with pytest.raises(ValueError, match="uint8"):
        encoder(pixels.float())


def test_the_default_configs_tower_is_the_untouched_vlms(raw_demo, tiny_vlm):
    """The default attention (the project's causal kernel) is the text decoder's: the vision tower stays
    bidirectional. The encoder built from the default config equals the untouched VLM loaded with
    transformers' own sdpa, through the same pooling, to fp32 precision."""
    from transformers import AutoModelForImageTextToText

    cfg = vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw")
    assert cfg.model.attn_implementation == "causal_sdpa"
    encoder = build_frame_encoder(cfg)
    untouched = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="sdpa").eval()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8))
    with torch.no_grad():
        reference = untouched.model.get_image_features(encoder.normalise(pixels)[:, None]).pooler_output
    expected = pooled_tokens(torch.stack(list(reference)))  # (5, 14, 64)
    torch.testing.assert_close(encoder.pooled(pixels), expected, rtol=1e-5, atol=1e-6)


def test_extract_features_is_the_same_under_every_text_attention(raw_demo, tiny_vlm, extracted, tmp_path):
    """Feature files written under the default config equal those under model.attn_implementation=eager
    (transformers' reference kernels everywhere), up to one float16 rounding step."""
    extract_features(vlm_cfg(raw_demo, tiny_vlm, "model.attn_implementation=eager"), tmp_path, num_workers=0,
                     progress=False)
    for default_file in sorted((extracted / "demo").glob("*.arrow")):
        default = pa.ipc.open_file(str(default_file)).read_all()
        eager = pa.ipc.open_file(str(tmp_path / "demo" / default_file.name)).read_all()
        for name in ("cls", "2x2", "3x3"):
            a = np.asarray(default.column(name).combine_chunks().flatten().flatten(), dtype=np.float32)
            b = np.asarray(eager.column(name).combine_chunks().flatten().flatten(), dtype=np.float32)
            assert np.abs(a - b).max() <= 2e-3 * np.abs(b).max(), (default_file.name, name)


# ---------------------------------------------------------------------------------------------------------
# Demo raw frames, extraction, validation


def test_make_demo_raw_frames_carry_the_task(raw_demo):
    """Each raw frame shows its phase's prototype: the 8x8 cell means of a decoded frame are nearest to the
    prototype of the frame's true phase (the task stays learnable from pixels)."""
    clips = json.loads((raw_demo / "train.json").read_text())
    assert all(c["frames_file"].startswith("frames/") for c in clips)
    uid = clips[0]["video_uid"]  # the first training video: index 0 of the train split
    task_index = [t.slug for t in demo.TASKS].index(clips[0]["metadata"]["task"])
    plan = demo.plan_video(np.random.default_rng([0, demo.VIDEO_STREAM, demo.SPLIT_CODES["train"], 0]), uid, task_index)
    table = pa.ipc.open_file(str(raw_demo / "frames" / f"{uid}.arrow")).read_all()
    assert table.column_names == ["frame"] and table.num_rows == plan.num_frames
    assert pa.ipc.open_file(str(raw_demo / "features" / f"{uid}.arrow")).read_all().num_rows == plan.num_frames

    prototypes = demo.make_prototypes(0)
    rows = [prototypes.row(task_index, p) for p in range(len(plan.task.steps) + 2)]
    references = np.stack([np.stack([prototypes.cls[r], *prototypes.patches[r, :2]])[:, :64] for r in rows])  # (P, 3, 64)
    nearest = []
    for value in table.column("frame").to_pylist():
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(value))), dtype=np.float64)  # (32, 32, 3)
        cells = image.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(3, 64)
        values = (cells - demo.PIXEL_MID) / demo.PIXEL_SCALE
        nearest.append(int(np.argmin(((references - values) ** 2).sum(axis=(1, 2)))))
    assert nearest == plan.phases.tolist()


def test_extract_features_writes_the_feature_layout_validates_and_resumes(raw_demo, tiny_vlm, extracted, capsys):
    cfg = vlm_cfg(raw_demo, tiny_vlm)
    clips = {c.video_uid: c for split in ("train", "val", "test") for c in load_split(cfg, split)[0]}
    files = sorted((extracted / "demo").glob("*.arrow"))
    assert {f.stem for f in files} == set(clips) and not list(extracted.rglob("*.tmp"))
    table = pa.ipc.open_file(str(files[0])).read_all()
    assert table.column_names == ["cls", "2x2", "3x3"]
    assert str(table.schema.field("cls").type) == "fixed_size_list<item: fixed_size_list<item: halffloat>[64]>[1]"
    raw_rows = pa.ipc.open_file(str(raw_demo / "frames" / files[0].name)).read_all().num_rows
    assert table.num_rows == max(c.end for c in clips.values() if c.video_uid == files[0].stem) == raw_rows

    for I in (1, 5, 10):  # the output passes validation for every token budget (I = 10 only overflows the demo's 1024)
        code = data_main(["validate", str(ROOT / "configs" / "demo.yaml"), f"data.root={raw_demo}",
                          f"model.path={tiny_vlm}", "data.feature_dim=64", f"data.num_tokens_per_frame={I}",
                          "data.max_seq_len=2048", *features_overrides(extracted)])
        assert code == 0, capsys.readouterr().out
    assert "0 error(s)" in capsys.readouterr().out

    # Resume: complete files are skipped; a missing one is redone, byte for byte the same.
    before = files[0].read_bytes()
    files[0].unlink()
    summary = extract_features(cfg, extracted, num_workers=0, progress=False)
    assert summary["extracted"] == 1 and summary["skipped"] == len(files) - 1
    assert files[0].read_bytes() == before
    assert summary["features_path"] == f"{extracted}/{{dataset}}/{{video_uid}}.arrow" and summary["feature_dim"] == 64


def test_extract_features_cli(raw_demo, tiny_vlm, tmp_path, capsys):
    code = data_main(["extract-features", str(ROOT / "configs" / "demo.yaml"), f"data.root={raw_demo}",
                      f"model.path={tiny_vlm}", "data.test=", "data.val=", "--out", str(tmp_path), "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "data.features_path=" in out and "data.feature_dim=64" in out
    assert len(list((tmp_path / "demo").glob("*.arrow"))) == 3  # the three training videos only


# ---------------------------------------------------------------------------------------------------------
# Training on raw frames and on extracted features: the same numbers


def loss_steps(cfg, tokenizer, steps: int = 3) -> tuple[list[float], torch.nn.Module, ClipDataset]:
    """Train `steps` AdamW steps the way train.py does (global target counts, clipping), on fixed batches."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tokenizer).train()
    dataset = ClipDataset(cfg, "train", tokenizer)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    results = []
    for step in range(steps):
        picks = [(2 * step) % len(dataset), (2 * step + 1) % len(dataset)]
        batch = collate([dataset.item(i, 0, 0.5) for i in picks], dataset.renderer.pad_id)
        counts = losses.count_targets(batch)
        outputs = model(**model_inputs(batch))
        loss, _ = losses.compute_loss(outputs, batch, counts, cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        results.append(float(loss.detach()))
    return results, model, dataset


def test_raw_frames_and_extracted_features_give_equal_features_and_losses(raw_demo, tiny_vlm, extracted):
    raw_cfg = vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw", "data.num_tokens_per_frame=5")
    feat_cfg = vlm_cfg(raw_demo, tiny_vlm, "data.num_tokens_per_frame=5", *features_overrides(extracted))
    tokenizer = load_tokenizer(tiny_vlm)
    raw_losses, raw_model, raw_set = loss_steps(raw_cfg, tokenizer)
    feat_losses, feat_model, feat_set = loss_steps(feat_cfg, tokenizer)
    for i in range(len(raw_set)):  # every clip: the online tower gives exactly the extracted file's rows
        online = raw_model.vision(torch.from_numpy(raw_set.item(i)["frame_pixels"])).numpy()
        np.testing.assert_array_equal(online, feat_set.item(i)["frame_features"])
    assert raw_losses == feat_losses, (raw_losses, feat_losses)
    assert raw_losses[-1] < raw_losses[0]
    assert raw_model.vision is not None and feat_model.vision is None


def test_raw_frames_need_raw_files_and_good_jpegs(raw_demo, tiny_vlm, extracted, tmp_path):
    tokenizer = load_tokenizer(tiny_vlm)
    with pytest.raises(DataError, match="data.frames=raw reads raw frames"):
        ClipDataset(vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw", *features_overrides(extracted)[1:]), "train", tokenizer)
    with pytest.raises(DataError, match="holds raw frames"):  # the features path refuses raw files, as before
        ClipDataset(vlm_cfg(raw_demo, tiny_vlm), "train", tokenizer)
    with pytest.raises(ValueError, match="data.feature_dim=64"):
        build_model(vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw", "data.feature_dim=1152"), tokenizer)

    # A corrupt JPEG in the middle of a clip: validation names the file, clip and frame.
    cfg = vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw")
    clip = load_split(cfg, "train")[0][0]
    cells = pa.ipc.open_file(str(clip.frames_path)).read_all().column("frame").to_pylist()
    cells[clip.start + 3] = base64.b64encode(b"not a jpeg").decode()
    bad = tmp_path / "bad.arrow"
    with pa.ipc.new_file(str(bad), pa.schema([("frame", pa.string())])) as writer:
        writer.write_table(pa.table({"frame": cells}))
    reader = RawFrameReader(FrameStore(1, 64), FramePreprocessing.from_model_dir(tiny_vlm))
    clip.frames_path = bad
    reader.check(clip)  # the first frame is fine
    with pytest.raises(DataError, match=rf"bad.arrow \(clip 0 {clip.video_uid}\): frame {clip.start + 3} is not a base64 JPEG"):
        reader.verify(clip)


def first_new_clip(cfg, tokenizer, plan: BatchPlan, steps: int) -> tuple[int, int]:
    """(step, clip) of the first clip the sampler hands out that no earlier step used, at step >= 1."""
    dataset = ClipDataset(cfg, "train", tokenizer, announce=False)
    samplers = [iter(ClipBatchSampler(dataset.lengths, plan, rank, cfg.train.seed, cfg.data.length_grouping))
                for rank in range(plan.world_size)]
    seen = set()
    for step in range(steps):
        clips = {key.clip for sampler in samplers for _ in range(plan.grad_accum) for key in next(sampler)}
        if step >= 1 and clips - seen:
            return step, min(clips - seen)
        seen |= clips
    raise AssertionError("every clip of the first steps was already used by step 0")


def test_a_corrupt_frame_mid_run_stops_every_rank_with_the_last_complete_step(tiny_vlm, tmp_path):
    """A JPEG broken in the middle of a clip passes the start-up check (first frames only) and fails when its step
    comes, on one of 2 gloo ranks: both ranks stop after the last complete step, which is saved, the failing rank
    names the file, clip and frame, the exit status is 65; with the frame repaired, the same command resumes."""
    root = tmp_path / "data"
    demo.make_demo(root, seed=1, num_videos=5, raw_frames=True, frame_size=FRAME_SIZE)
    cfg = vlm_cfg(root, tiny_vlm, "data.frames=raw", "train.micro_batch=1", "data.length_grouping=false")
    step, index = first_new_clip(cfg, load_tokenizer(tiny_vlm), BatchPlan(1, 1, 2), steps=6)
    clip = ClipDataset(cfg, "train", load_tokenizer(tiny_vlm), announce=False).clips[index]
    table = pa.ipc.open_file(str(clip.frames_path)).read_all()
    cells = table.column("frame").to_pylist()
    frame = (clip.start + clip.end) // 2
    good = cells[frame]
    cells[frame] = base64.b64encode(b"not a jpeg").decode()

    def write_frames(column: list[str]) -> None:
        with pa.ipc.new_file(str(clip.frames_path), table.schema) as writer:
            writer.write_table(pa.table({"frame": column}, schema=table.schema))

    write_frames(cells)
    run_dir = tmp_path / "run"
    overrides = [f"data.root={root}", f"model.path={tiny_vlm}", "model.init=pretrained", "model.trainable=lora",
                 "model.lora_rank=4", "model.lora_alpha=8", "data.num_workers=0", "data.feature_dim=64",
                 "data.frames=raw", "data.length_grouping=false", "train.micro_batch=1", "train.eval_every=0",
                 "train.log_every=1", "train.save_every=100", "train.max_steps=6", f"run.dir={run_dir}"]
    stopped = run_train(overrides, nproc=2, check=False)
    assert stopped.returncode != 0 and "exitcode" in stopped.stderr and ": 65" in stopped.stderr, stopped.stderr[-3000:]
    assert f"{clip.frames_path} (clip {index} {clip.video_uid}): frame {frame} is not a base64 JPEG" in stopped.stderr
    assert f"stopped after step {step}: a frame could not be read" in stopped.stdout
    assert sorted(p.name for p in run_dir.glob("step_*")) == [f"step_{step}"]
    assert json.loads((run_dir / f"step_{step}" / "trainer_state.json").read_text())["step"] == step
    # The one traceback is the launcher's own report of the workers' status (torchrun prints one for any non-zero
    # exit); the workers end in the lines above.
    assert stopped.stderr.count("Traceback") == 1 and "ChildFailedError" in stopped.stderr

    cells[frame] = good
    write_frames(cells)
    resumed = run_train(overrides, nproc=2)
    assert f"resumed from {run_dir / f'step_{step}'}" in resumed.stdout and (run_dir / "step_6").is_dir()


def test_pillow_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ModuleNotFoundError, match="requirements-frames.txt"):
        require_pillow()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of both kinds reload and stream


def stream_one_video(model, tokenizer, cfg, feats_fn) -> list:
    clips, _ = load_split(cfg, "test")
    video = assemble_videos(clips)[0]
    runner = StreamingRunner(model, Renderer(tokenizer, cfg.data.num_tokens_per_frame), cfg, torch.device("cpu"))
    records = runner.run(video, feats_fn(video), Thresholds(0.5, 0.5))
    assert [r.frame for r in records] == list(range(video.start, video.end))
    return records


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_raw_frames_checkpoint_reloads_and_streams(raw_demo, tiny_vlm, tmp_path, trainable):
    cfg = vlm_cfg(raw_demo, tiny_vlm, "data.frames=raw", f"model.trainable={trainable}", f"run.dir={tmp_path}")
    tokenizer = load_tokenizer(tiny_vlm)
    _, model, dataset = loss_steps(cfg, tokenizer, steps=2)
    tensors = model_state_for_checkpoint(model, cfg)
    assert tensors and not any(name.startswith("vision.") for name in tensors)  # the tower comes from model.path
    rng = ({"torch": torch.get_rng_state()}, {"python": [3, [0] * 625, None], "numpy": np.random.get_state(legacy=False)})
    rng[1]["numpy"]["state"]["key"] = rng[1]["numpy"]["state"]["key"].tolist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    meta = CheckpointMeta({"step": 2}, tokenizer, model.backbone.config, [rng])
    ckpt = save_checkpoint(tmp_path, 2, tensors, optimizer, cfg, meta, keep_last=2)
    assert set(load_model_tensors(ckpt)) == set(tensors)

    reloaded, tokenizer2, cfg2 = load_for_inference(ckpt)
    model.eval()
    batch = collate([dataset.item(0), dataset.item(1)], dataset.renderer.pad_id)
    inputs = model_inputs(batch, all_frames=True)
    with torch.no_grad():
        expected, got = model(**inputs), reloaded(**inputs)
    for key in ("text_ce", "speak_logits", "dst_logits"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    reader = RawFrameReader(FrameStore(1, 64), FramePreprocessing.from_model_dir(tiny_vlm))
    stream_one_video(reloaded, tokenizer2, cfg2,
                     lambda video: raw_video_features(video.clips, reader, reloaded.vision, torch.device("cpu")))


def test_extracted_features_checkpoint_trains_with_train_py_reloads_and_streams(raw_demo, tiny_vlm, extracted, tmp_path):
    cfg = vlm_cfg(raw_demo, tiny_vlm, *features_overrides(extracted), f"run.dir={tmp_path}", "train.max_steps=3",
                  "train.save_every=3")
    result = train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    model, tokenizer, cfg2 = load_for_inference(result["checkpoint"])
    assert model.vision is None
    store = FrameStore(cfg2.data.num_tokens_per_frame, cfg2.data.feature_dim)
    stream_one_video(model, tokenizer, cfg2, lambda video: video_features(video, store, cfg2.data.num_tokens_per_frame))


def test_train_py_trains_on_raw_frames(raw_demo, tiny_vlm, extracted, tmp_path):
    """The real training loop on raw frames logs the same losses as on the extracted features."""
    runs = {}
    for name, overrides in (("raw", ["data.frames=raw"]), ("features", features_overrides(extracted))):
        run_dir = tmp_path / name
        cfg = vlm_cfg(raw_demo, tiny_vlm, *overrides, f"run.dir={run_dir}", "train.max_steps=3", "train.save_every=3")
        runs[name] = train.train(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name]["losses"] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(runs["raw"]["losses"]) == 3 and runs["raw"]["losses"] == runs["features"]["losses"]
    model, tokenizer, cfg = load_for_inference(runs["raw"]["checkpoint"])
    reader = RawFrameReader(FrameStore(1, 64), FramePreprocessing.from_model_dir(tiny_vlm))
    stream_one_video(model, tokenizer, cfg, lambda video: raw_video_features(video.clips, reader, model.vision, "cpu"))
