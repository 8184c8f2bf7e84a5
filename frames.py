"""Frame storage: the `.arrow` files that hold a video's frame features (or raw frames), memory-mapped,
with only the rows of the clip being read touched.

    store = FrameStore(num_tokens_per_frame=1, feature_dim=1152)
    store.features(clip)      # (num_frames * I, F) float32, frame-major; cls first, then patches row-major
    store.raw_frames(clip)    # the clip's frames as JPEG bytes (raw-frame layout)

Three layouts are recognised from the columns and the row count (docs/data_format.md): the ProAssist
per-video layout (row k = absolute frame k; columns `cls`, `2x2`, `3x3`), a per-clip `cls` layout
(row i = frame start + i) and the raw-frame layout (column `frame`, base64 JPEG). Columns may be flat or
nested lists of any list flavour, including extension types that plain pyarrow does not know.
"""
from __future__ import annotations

import base64
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from data import Clip

# Feature columns of the ProAssist layout, in the order their tokens are fed (cls first, patches row-major).
FEATURE_COLUMNS = {1: ("cls",), 5: ("cls", "2x2"), 10: ("cls", "3x3")}
CELLS_PER_COLUMN = {"cls": 1, "2x2": 4, "3x3": 9}


class DataError(ValueError):
    """Bad input data; the message names the file, clip and turn."""


def _open_arrow(path: Path) -> pa.Table:
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid as err:
            raise DataError(f"{path}: not an Arrow IPC file or stream ({err})") from None


def _column_values(column: pa.ChunkedArray, rows: int, cells: int, path: Path, name: str) -> np.ndarray:
    """(rows, cells * F) float32 from a flat or nested list column, whatever list flavour it uses."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    widths = []
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise DataError(f"{path}: column '{name}' has rows of different lengths ({lengths.min()} to {lengths.max()})")
        widths.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
        if isinstance(array.type, pa.ExtensionType):
            array = array.storage
    values = array.to_numpy(zero_copy_only=False)
    per_row = int(np.prod(widths)) if widths else 1
    if values.size != rows * per_row:
        raise DataError(f"{path}: column '{name}' holds {values.size} values for {rows} rows of {per_row}")
    if per_row % cells != 0:
        raise DataError(f"{path}: column '{name}' has {per_row} values per row, not a multiple of {cells} cells")
    return values.reshape(rows, per_row).astype(np.float32, copy=False)


class FrameStore:
    """Reads a clip's frame features (or raw frames) on demand; keeps a few files memory-mapped.

    Layouts (SPEC §4.1), detected from the columns and the row count:
    * ProAssist: one file per video, row k = absolute frame k; `cls` (+ `2x2` / `3x3`).
    * per-clip: one file per clip, only `cls`, exactly end - start rows, row i = frame start + i.
    * raw frames: column `frame` with base64 JPEG.
    """

    def __init__(self, num_tokens_per_frame: int, feature_dim: int, max_open: int = 16):
        self.num_tokens_per_frame = num_tokens_per_frame
        self.feature_dim = feature_dim
        self.max_open = max_open
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()

    def table(self, path: Path) -> pa.Table:
        key = str(path)
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        if not path.is_file():
            raise DataError(f"{path}: frames file not found")
        table = _open_arrow(path)
        self._tables[key] = table
        if len(self._tables) > self.max_open:
            self._tables.popitem(last=False)
        return table

    def layout(self, clip: Clip) -> tuple[str, int]:
        """(layout name, row of frame `clip.start`), or a DataError naming file, clip and frame."""
        table = self.table(clip.frames_path)
        names = set(table.column_names)
        rows = table.num_rows
        where = f"{clip.frames_path} (clip {clip.index} {clip.video_uid})"
        if "frame" in names and "cls" not in names:
            layout = "raw"
        elif "cls" in names:
            layout = "proassist"
        else:
            raise DataError(f"{where}: unknown layout, columns {sorted(names)} (need 'cls' features or 'frame')")
        if rows >= clip.end:
            return layout, clip.start
        if layout == "proassist" and names == {"cls"} and rows == clip.num_frames:
            return "per_clip", 0
        raise DataError(
            f"{where}: needs frame {clip.end - 1} but the file has {rows} rows "
            f"(a per-video file needs >= {clip.end}, a per-clip file exactly {clip.num_frames})"
        )

    def _read(self, clip: Clip, num_frames: int) -> np.ndarray:
        """(num_frames, I, F) float32 from the clip's first frame on; layout, columns and dim checked."""
        layout, first_row = self.layout(clip)
        where = f"{clip.frames_path} (clip {clip.index} {clip.video_uid})"
        if layout == "raw":
            raise DataError(
                f"{where}: holds raw frames ('frame' column); this model reads precomputed features "
                f"(columns cls/2x2/3x3). Point data.features_path at the feature files."
            )
        table = self.table(clip.frames_path)
        columns = FEATURE_COLUMNS[self.num_tokens_per_frame]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{where}: I={self.num_tokens_per_frame} needs columns {list(columns)}, missing {missing}"
            )
        parts = []
        for name in columns:
            cells = CELLS_PER_COLUMN[name]
            column = table.column(name).slice(first_row, num_frames)
            values = _column_values(column, num_frames, cells, clip.frames_path, name)
            dim = values.shape[1] // cells
            if dim != self.feature_dim:
                raise DataError(f"{where}: column '{name}' has feature dim {dim}, data.feature_dim is {self.feature_dim}")
            parts.append(values.reshape(num_frames, cells, dim))
        return np.concatenate(parts, axis=1)

    def check(self, clip: Clip) -> None:
        """Cheap start-up check (file, layout, rows, columns, dim from one row) so that training never dies
        mid-run on a clip it could have refused before starting. `features` also checks the values."""
        self._read(clip, 1)

    def features(self, clip: Clip) -> np.ndarray:
        """(num_frames * I, F) float32, frame-major, cls first then patches row-major."""
        features = self._read(clip, clip.num_frames)  # (n, I, F)
        bad = ~np.isfinite(features).all(axis=(1, 2))
        if bad.any():
            frame = clip.start + int(np.argmax(bad))
            raise DataError(
                f"{clip.frames_path} (clip {clip.index} {clip.video_uid}): non-finite feature values at frame "
                f"{frame} ({int(bad.sum())} frames affected)"
            )
        return features.reshape(clip.num_frames * self.num_tokens_per_frame, self.feature_dim)

    def raw_frames(self, clip: Clip) -> list[bytes]:
        """Decoded JPEG bytes of the clip's frames (raw-frame layout)."""
        layout, first_row = self.layout(clip)
        if layout != "raw":
            raise DataError(f"{clip.frames_path} (clip {clip.index} {clip.video_uid}): no 'frame' column")
        column = self.table(clip.frames_path).column("frame").slice(first_row, clip.num_frames)
        return [base64.b64decode(x) for x in column.to_pylist()]
