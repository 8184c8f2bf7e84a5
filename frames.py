"""Frame storage: the `.arrow` files that hold a video's frame features (or raw frames), memory-mapped,
with only the rows of the clip being read touched.

    store = FrameStore.from_config(cfg)   # or FrameStore(num_tokens_per_frame=1, feature_dim=1152)
    store.check(clip)         # start-up: every row of the clip read once (nulls, non-finite values), no copies
    store.features(clip)      # (num_frames * I, F) float32, frame-major; cls first, then patches row-major
    store.raw_frames(clip)    # the clip's frames as JPEG bytes (raw-frame layout)

Three layouts are recognised from the columns and the row count (docs/data_format.md): the ProAssist
per-video layout (row k = absolute frame k; columns `cls`, `2x2`, `3x3`), a per-clip `cls` layout
(row i = frame start + i) and the raw-frame layout (column `frame`, base64 JPEG). Where a file fits both
the per-video and the per-clip reading, `data.frames_layout` says which it is. Columns may be flat or
nested lists of any list flavour, including extension types that plain pyarrow does not know.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clips import Clip, DataError
from config import Config

# Feature columns of the ProAssist layout, in the order their tokens are fed (cls first, patches row-major).
FEATURE_COLUMNS = {1: ("cls",), 5: ("cls", "2x2"), 10: ("cls", "3x3")}
CELLS_PER_COLUMN = {"cls": 1, "2x2": 4, "3x3": 9}
PATCH_COLUMNS = {"2x2", "3x3"}  # only the per-video layout has them
# The 14 pooled tokens per frame a VLM's tower gives (backbones.pooled_tokens: the all-token mean, the 2x2 grid,
# the 3x3 grid) as the columns of an extracted feature file.
POOLED_COLUMNS = {"cls": slice(0, 1), "2x2": slice(1, 5), "3x3": slice(5, 14)}


class FeatureDimError(DataError):
    """A feature column whose size is not data.feature_dim; `found` is the file's, for the hint in the fix."""

    def __init__(self, message: str, found: int):
        super().__init__(message)
        self.found = found


def _where(clip: Clip) -> str:
    part = f" part {clip.part}" if getattr(clip, "part", None) is not None else ""
    return f"{clip.frames_path} (clip {clip.index} {clip.video_uid}{part})"


def _open_arrow(path: Path, where: str) -> pa.Table:
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid as err:
            raise DataError(f"{where}: not an Arrow IPC file or stream ({err})") from None


@contextmanager
def _read_errors_named(clip: Clip) -> Iterator[None]:
    """An OS or pyarrow error while reading a clip's frames (a file changed or gone since the start-up check)
    becomes a DataError naming the file and clip, so a loader worker's traceback says which clip failed."""
    try:
        yield
    except DataError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"{_where(clip)}: reading frames [{clip.start}, {clip.end}) failed: {type(err).__name__}: {err}"
        ) from err


def _refuse_nulls(array: pa.Array, values_per_row: int, where: str, name: str, first_frame: int) -> None:
    """A missing (null) row or value is named by its frame, not silently read as zeros or NaN."""
    if array.null_count:
        nulls = np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))
        rows = np.unique(nulls // values_per_row)
        raise DataError(
            f"{where}: column '{name}' has missing (null) feature values at frame {first_frame + int(rows[0])} "
            f"({len(rows)} frames affected)"
        )


def _leaf_values(array: pa.Array, rows: int, where: str, name: str, first_frame: int) -> tuple[pa.Array, int]:
    """(primitive values, values per row) under a flat or nested list column, whatever list flavour it uses.

    The values are zero-copy slices of the (memory-mapped) file: walking the list levels only reads offsets.
    `first_frame` is the frame of the array's first row, for the messages.
    """
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    per_row = 1  # values per row at the current depth
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        _refuse_nulls(array, per_row, where, name, first_frame)
        if pa.types.is_fixed_size_list(array.type):
            width = array.type.list_size
        else:
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths.min() != lengths.max()):
                raise DataError(f"{where}: column '{name}' has rows of different lengths ({lengths.min()} to {lengths.max()})")
            width = int(lengths[0]) if len(lengths) else 0
        per_row *= width
        array = array.flatten()
        if isinstance(array.type, pa.ExtensionType):
            array = array.storage
    _refuse_nulls(array, per_row, where, name, first_frame)
    if len(array) != rows * per_row:
        raise DataError(f"{where}: column '{name}' holds {len(array)} values for {rows} rows of {per_row}")
    return array, per_row


def _non_finite_rows(values: pa.Array, per_row: int) -> np.ndarray:
    """Rows (of per_row values) holding a NaN or inf. The all-finite case, the common one, is one pyarrow
    reduction over the file's own buffer: no float32 copy, a bit per value."""
    if not pa.types.is_floating(values.type):
        return np.zeros(0, dtype=np.int64)
    finite = pc.is_finite(values)
    if pc.all(finite).as_py():
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.flatnonzero(~finite.to_numpy(zero_copy_only=False)) // per_row)


class FrameStore:
    """Reads a clip's frame features (or raw frames) on demand; keeps a few files memory-mapped.

    Layouts, detected from the columns and the row count:
    * ProAssist: one file per video, row k = absolute frame k; `cls` (+ `2x2` / `3x3`).
    * per-clip: one file per clip, only `cls`, exactly end - start rows, row i = frame start + i.
    * raw frames: column `frame` with base64 JPEG.
    """

    def __init__(self, num_tokens_per_frame: int, feature_dim: int, frames_layout: str = "auto", max_open: int = 16):
        self.num_tokens_per_frame = num_tokens_per_frame
        self.feature_dim = feature_dim
        self.frames_layout = frames_layout  # auto | per_video | per_clip (data.frames_layout)
        self.max_open = max_open
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Config) -> FrameStore:
        return cls(cfg.data.num_tokens_per_frame, cfg.data.feature_dim, cfg.data.frames_layout)

    def __getstate__(self) -> dict:
        # A DataLoader worker started by pickling (spawn) maps the files again rather than receiving copies
        # of up to max_open whole tables.
        return {**self.__dict__, "_tables": OrderedDict()}

    def table(self, path: Path, where: Optional[str] = None) -> pa.Table:
        key = str(path)
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        if not path.is_file():
            raise DataError(f"{where or path}: frames file not found")
        table = _open_arrow(path, where or str(path))
        self._tables[key] = table
        if len(self._tables) > self.max_open:
            self._tables.popitem(last=False)
        return table

    def layout(self, clip: Clip) -> tuple[str, int]:
        """(layout name, row of frame `clip.start`), or a DataError naming file, clip and frame.

        With data.frames_layout=auto a file is read per video (row k = frame k) when it is long enough and
        the clip starts at frame 0 (both readings agree), or it holds patch columns, or it is named after the
        clip's video_uid (ProAssist: `<video_uid>.arrow`); per clip (row i = frame start + i) when it has
        exactly the clip's frame count. A cls-only file that fits both readings otherwise is refused: reading
        a clip's file with extra rows as a video's would silently shift every frame.
        """
        where = _where(clip)
        table = self.table(clip.frames_path, where)
        names = set(table.column_names)
        rows = table.num_rows
        if "frame" in names and "cls" not in names:
            layout = "raw"
        elif "cls" in names:
            layout = "proassist"
        else:
            raise DataError(f"{where}: unknown layout, columns {sorted(names)} (need 'cls' features or 'frame')")
        per_clip = "raw" if layout == "raw" else "per_clip"
        fits_video = rows >= clip.end
        if self.frames_layout == "per_video":
            if not fits_video:
                raise DataError(f"{where}: needs frame {clip.end - 1} but the file has {rows} rows "
                                f"(data.frames_layout=per_video: row k = frame k)")
            return layout, clip.start
        if self.frames_layout == "per_clip":
            if rows < clip.num_frames:
                raise DataError(f"{where}: needs {clip.num_frames} rows for frames [{clip.start}, {clip.end}) but "
                                f"the file has {rows} (data.frames_layout=per_clip: row i = frame {clip.start} + i)")
            return per_clip, 0
        if fits_video and (clip.start == 0 or layout == "raw" or names & PATCH_COLUMNS
                           or clip.frames_path.stem == clip.video_uid):
            return layout, clip.start
        if layout == "proassist" and not names & PATCH_COLUMNS and rows == clip.num_frames:
            return "per_clip", 0
        if fits_video:
            raise DataError(
                f"{where}: both readings fit this file of {rows} rows with only a 'cls' column: per video "
                f"(row k = frame k, rows {clip.start}..{clip.end - 1}) or per clip with {rows - clip.num_frames} "
                f"extra rows (row i = frame {clip.start} + i, rows 0..{clip.num_frames - 1}), and its name is not "
                f"the video_uid. Set data.frames_layout=per_video (one file per video, as ProAssist) or "
                f"data.frames_layout=per_clip (one file per clip)."
            )
        extra = rows - clip.num_frames
        hint = (f"; if it is this clip's own file with {extra} extra rows at the end, set data.frames_layout=per_clip"
                if layout == "proassist" and extra > 0 else "")
        raise DataError(
            f"{where}: needs frame {clip.end - 1} but the file has {rows} rows "
            f"(a per-video file needs >= {clip.end}, a per-clip file exactly {clip.num_frames}){hint}"
        )

    def _feature_chunks(self, clip: Clip, num_frames: int) -> Iterator[tuple[str, int, pa.Array, int, int]]:
        """The clip's first `num_frames` rows of each feature column I needs (cls first, then patches), one
        record batch at a time: (column, cells, leaf values, rows, first row within the clip). The values are
        zero-copy slices of the memory-mapped file; layout, columns, nulls and feature dim are checked."""
        layout, first_row = self.layout(clip)
        where = _where(clip)
        if layout == "raw":
            raise DataError(
                f"{where}: holds raw frames ('frame' column); this model reads precomputed features "
                f"(columns cls/2x2/3x3). Point data.features_path at the feature files."
            )
        table = self.table(clip.frames_path, where)
        columns = FEATURE_COLUMNS[self.num_tokens_per_frame]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{where}: I={self.num_tokens_per_frame} needs columns {list(columns)}, missing {missing}"
            )
        for name in columns:
            cells = CELLS_PER_COLUMN[name]
            offset = 0
            for chunk in table.column(name).slice(first_row, num_frames).chunks:
                if not len(chunk):
                    continue
                values, per_row = _leaf_values(chunk, len(chunk), where, name, clip.start + offset)
                if per_row % cells != 0:
                    raise DataError(f"{where}: column '{name}' has {per_row} values per row, not a multiple of {cells} cells")
                if per_row // cells != self.feature_dim:
                    raise FeatureDimError(
                        f"{where}: column '{name}' has feature dim {per_row // cells}, data.feature_dim is {self.feature_dim}",
                        per_row // cells,
                    )
                yield name, cells, values, len(chunk), offset
                offset += len(chunk)

    def check(self, clip: Clip) -> None:
        """Start-up check of every row of the clip: file, layout, rows, columns, dim, missing (null) and
        non-finite values, so that training never dies mid-run on a clip it could have refused before
        starting. Reads the file's own buffers once (pyarrow reductions, a bit per value), never a float32
        copy; the first bad frame is named."""
        with _read_errors_named(clip):
            bad_frames: set[int] = set()
            for _, _, values, rows, offset in self._feature_chunks(clip, clip.num_frames):
                bad_frames.update(clip.start + offset + int(r) for r in _non_finite_rows(values, len(values) // rows))
            if bad_frames:
                raise DataError(
                    f"{_where(clip)}: non-finite feature values at frame {min(bad_frames)} "
                    f"({len(bad_frames)} frames affected)"
                )

    def features(self, clip: Clip) -> np.ndarray:
        """(num_frames * I, F) float32, frame-major, cls first then patches row-major."""
        with _read_errors_named(clip):
            parts: dict[str, list[np.ndarray]] = {}
            for name, cells, values, rows, _ in self._feature_chunks(clip, clip.num_frames):
                array = values.to_numpy(zero_copy_only=False).reshape(rows, cells, self.feature_dim)
                parts.setdefault(name, []).append(array.astype(np.float32, copy=False))
            features = np.concatenate([np.concatenate(chunks) for chunks in parts.values()], axis=1)  # (n, I, F)
        bad = ~np.isfinite(features).all(axis=(1, 2))
        if bad.any():
            frame = clip.start + int(np.argmax(bad))
            raise DataError(
                f"{_where(clip)}: non-finite feature values at frame {frame} ({int(bad.sum())} frames affected)"
            )
        return features.reshape(clip.num_frames * self.num_tokens_per_frame, self.feature_dim)

    def raw_frames(self, clip: Clip) -> list[bytes]:
        """Decoded JPEG bytes of the clip's frames (raw-frame layout)."""
        layout, first_row = self.layout(clip)
        if layout != "raw":
            raise DataError(f"{_where(clip)}: no 'frame' column")
        column = self.table(clip.frames_path).column("frame").slice(first_row, clip.num_frames)
        return [base64.b64decode(x) for x in column.to_pylist()]


# ----------------------------------------------------------------------------------------------------------
# Raw frames for a VLM's own vision tower: JPEG decoding, the image processor's resizes, feature extraction
#
#     prep = FramePreprocessing.from_model_dir("models/SmolVLM2-256M-Video-Instruct")
#     reader = RawFrameReader(store, prep); reader.pixels(clip)   # (num_frames, S, S, 3) uint8, in the loader
#     extract_features(cfg, "features/smolvlm2")                 # python data.py extract-features CONFIG --out DIR
#
# The loader only decodes and resizes (Pillow, uint8: a 512 px frame is 0.75 MiB); rescaling, normalising and
# the tower run on the model's device in chunks (backbones.FrameEncoder). Pillow is needed on this path only.

PILLOW_INSTALL = "pip install -r requirements-frames.txt"
MAX_IMAGE_SIDE = 4096  # the SmolVLM image processor's cap on the first resize


def require_pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ModuleNotFoundError(
            f"decoding raw JPEG frames (data.frames=raw, extract-features, make-demo --raw-frames) needs Pillow: "
            f"{PILLOW_INSTALL}"
        ) from None
    return Image


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The SmolVLM image processor's first resize: longest edge to `longest_edge`, aspect kept, the other edge
    rounded down then up to even, everything capped at MAX_IMAGE_SIDE."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(height, 1), max(width, 1)


@dataclass(frozen=True)
class FramePreprocessing:
    """What a SmolVLM-family image processor does to one frame without image splitting, read from the model
    directory's preprocessor_config.json:

    1. RGB; resize the longest edge to `resize_longest_edge` (the video processor's `video_sampling.video_size`
       where the file has one, as SmolVLM2 does for video frames; else `size`), with `resample`;
    2. resize to a `image_size` square (the vision tower's input), with `resample`; both resizes give uint8;
    3. x * rescale_factor in float64 -> float32, then (x - mean) / std in float32: `pixel_table` holds the
       result for each of the 256 levels of each channel, so the device reproduces it exactly.
    """

    resize_longest_edge: int
    image_size: int
    resample: int  # a PIL filter number (1 = LANCZOS)
    rescale_factor: float  # 1.0 when the processor does not rescale
    image_mean: tuple[float, float, float]  # (0, 0, 0) and (1, 1, 1) when it does not normalise
    image_std: tuple[float, float, float]

    @classmethod
    def from_model_dir(cls, path) -> "FramePreprocessing":
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise DataError(f"{file}: missing; data.frames=raw and extract-features need the VLM's image processor settings")
        conf = json.loads(file.read_text())
        try:
            video_size = (conf.get("video_sampling") or {}).get("video_size") or {}
            longest = video_size.get("longest_edge") or conf["size"]["longest_edge"]
            image_size = conf["max_image_size"]["longest_edge"]
        except (KeyError, TypeError):
            raise DataError(f"{file}: expected size.longest_edge and max_image_size.longest_edge (a SmolVLM/Idefics3 processor)") from None
        if not conf.get("do_resize", True):
            raise DataError(f"{file}: do_resize is false; the vision tower needs {image_size} px squares")

        def triple(key: str, default: float) -> tuple[float, float, float]:
            value = conf.get(key, default)
            return tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))

        normalise = conf.get("do_normalize", True)
        return cls(
            resize_longest_edge=int(longest), image_size=int(image_size), resample=int(conf.get("resample", 1)),
            rescale_factor=float(conf.get("rescale_factor", 1 / 255)) if conf.get("do_rescale", True) else 1.0,
            image_mean=triple("image_mean", 0.5) if normalise else (0.0, 0.0, 0.0),
            image_std=triple("image_std", 0.5) if normalise else (1.0, 1.0, 1.0),
        )

    def resize(self, image) -> np.ndarray:
        """A PIL image -> (S, S, 3) uint8: the processor's two resizes (Pillow returns a copy when a size is unchanged)."""
        image = image.convert("RGB")
        height, width = longest_edge_size(image.height, image.width, self.resize_longest_edge)
        image = image.resize((width, height), resample=self.resample)
        image = image.resize((self.image_size, self.image_size), resample=self.resample)
        return np.asarray(image, dtype=np.uint8)

    def pixel_table(self) -> np.ndarray:
        """(3, 256) float32: the processor's normalised value of each uint8 level, per channel."""
        rescaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)  # (256,)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return (rescaled[None, :] - mean) / std  # (3, 256) float32


def decode_frames(values: list, preprocessing: FramePreprocessing, where: str, first_frame: int) -> np.ndarray:
    """Base64 JPEG cells -> (n, S, S, 3) uint8; a bad cell is an error naming its absolute frame."""
    Image = require_pillow()
    out = np.empty((len(values), preprocessing.image_size, preprocessing.image_size, 3), dtype=np.uint8)
    for i, value in enumerate(values):
        try:
            with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as image:
                out[i] = preprocessing.resize(image)
        except (binascii.Error, TypeError, ValueError, OSError) as err:
            raise DataError(f"{where}: frame {first_frame + i} is not a base64 JPEG ({type(err).__name__}: {err})") from None
    return out


class RawFrameReader:
    """data.frames=raw: a clip's rows of the raw-frame layout (column `frame`, base64 JPEG, row k = frame k),
    decoded and resized in the loader to uint8 at the vision tower's input size."""

    def __init__(self, store: FrameStore, preprocessing: FramePreprocessing):
        self.store = store
        self.preprocessing = preprocessing

    def _rows(self, clip: Clip, num_frames: int) -> list:
        layout, first_row = self.store.layout(clip)
        if layout != "raw":
            raise DataError(
                f"{clip.frames_path} (clip {clip.index} {clip.video_uid}): holds features (columns cls/2x2/3x3); "
                f"data.frames=raw reads raw frames (a 'frame' column of base64 JPEG). Point data.features_path at "
                f"the frame files, or set data.frames=features"
            )
        return self.store.table(clip.frames_path).column("frame").slice(first_row, num_frames).to_pylist()

    def verify(self, clip: Clip) -> None:
        """Validation: every frame of the clip decodes as an image (no resizing)."""
        Image = require_pillow()
        where = f"{clip.frames_path} (clip {clip.index} {clip.video_uid})"
        for i, value in enumerate(self._rows(clip, clip.num_frames)):
            try:
                with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as image:
                    image.load()
            except (binascii.Error, TypeError, ValueError, OSError) as err:
                raise DataError(f"{where}: frame {clip.start + i} is not a base64 JPEG ({type(err).__name__}: {err})") from None

    def check(self, clip: Clip) -> None:
        """Start-up check: file, layout, rows, and that the first frame decodes."""
        where = f"{clip.frames_path} (clip {clip.index} {clip.video_uid})"
        decode_frames(self._rows(clip, 1), self.preprocessing, where, clip.start)

    def pixels(self, clip: Clip) -> np.ndarray:
        """(num_frames, S, S, 3) uint8, the clip's frames in order."""
        where = f"{clip.frames_path} (clip {clip.index} {clip.video_uid})"
        return decode_frames(self._rows(clip, clip.num_frames), self.preprocessing, where, clip.start)


def _fixed_cells(values: np.ndarray) -> pa.Array:
    """(N, C, D) float16 -> fixed_size_list<fixed_size_list<float16, D>, C>, zero-copy."""
    num_rows, cells, dim = values.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
    return pa.FixedSizeListArray.from_arrays(inner, cells)


def write_feature_file(path: Path, pooled: np.ndarray) -> None:
    """(N, 14, D) pooled tokens -> the ProAssist per-video layout (`cls`, `2x2`, `3x3`, float16, row k = frame k),
    written to a temporary name and renamed: an interrupted run never leaves a file that looks complete."""
    values = pooled.astype(np.float16)
    table = pa.table({name: _fixed_cells(values[:, rows]) for name, rows in POOLED_COLUMNS.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.ipc.new_file(str(tmp), table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def is_complete_feature_file(path: Path, rows: int, dim: int) -> bool:
    """Whether `path` is a finished extraction (write_feature_file) of at least `rows` frames of `dim`-d features."""
    if not path.is_file():
        return False
    try:
        table = _open_arrow(path, str(path))
        if set(table.column_names) != {"cls", "2x2", "3x3"} or table.num_rows < rows or table.num_rows == 0:
            return False
        _, per_row = _leaf_values(table.column("cls").slice(0, 1).combine_chunks(), 1, str(path), "cls", 0)
    except DataError:
        return False
    return per_row == dim


class FrameChunks:
    """DataLoader dataset: chunk i = frames [i * size, min((i + 1) * size, end)) of one raw-frame file, decoded
    and resized in a worker process."""

    def __init__(self, path: Path, end: int, size: int, preprocessing: FramePreprocessing, video_uid: str):
        self.path, self.end, self.size, self.preprocessing, self.video_uid = path, end, size, preprocessing, video_uid
        self.table = None  # opened (memory-mapped) in the worker

    def __len__(self) -> int:
        return (self.end + self.size - 1) // self.size

    def __getitem__(self, i: int) -> np.ndarray:
        if self.table is None:
            self.table = _open_arrow(self.path, str(self.path))
        first = i * self.size
        values = self.table.column("frame").slice(first, min(self.size, self.end - first)).to_pylist()
        return decode_frames(values, self.preprocessing, f"{self.path} (video {self.video_uid})", first)
