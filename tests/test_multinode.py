"""More processes than one: evaluation under torchrun writes exactly the files one process writes; an error on one
rank ends every rank; the balanced split of videos over ranks."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import torch

import evaluate
from conftest import PY, ROOT
from distributed import balanced_shares


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_balanced_shares_give_the_longest_first_to_the_least_loaded_rank():
    # 120 -> r0; 115 -> r1; 102 -> r1 (115 < 120); 76 -> r0 (120 < 217); 76 (the later one) -> r0 (196 < 217)
    assert balanced_shares([76, 102, 115, 120, 76], 2) == [[0, 3, 4], [1, 2]]
    assert balanced_shares([5, 5, 5], 2) == [[0, 2], [1]]  # ties: the lower index first, to the lowest rank
    assert balanced_shares([3], 3) == [[0], [], []]
    assert balanced_shares([4, 1, 2], 1) == [[0, 1, 2]]


EVAL_ARGS = ["--split", "train", "--max-videos", "3", "--embedder", "bow", "--sweep-speak", "0.3,0.6",
             "eval.max_new_tokens=2", "eval.max_dst_tokens=2", "data.max_seq_len=260", "eval.context_margin=20"]
# The wall-clock figures: metrics.json's `seconds` and `frames_per_second`, the frames/s in report.html's header.
WALL_CLOCK = {"metrics.json": (re.compile(rb'^  "(seconds|frames_per_second)": [0-9.eE+-]+,$', re.MULTILINE), 2),
              "report.html": (re.compile(rb' [0-9.]+ frames/s '), 1)}


def without_wall_clock(path) -> bytes:
    """The file's bytes with its wall-clock figures replaced by a placeholder; every other byte kept."""
    pattern, expected = WALL_CLOCK[path.name]
    masked, count = pattern.subn(b"WALL_CLOCK", path.read_bytes())
    assert count == expected, f"{path.name}: {count} wall-clock figures, expected {expected}"
    return masked


def test_distributed_evaluation_equals_one_process(tiny_ckpt, tmp_path, capsys):
    """torchrun --nproc_per_node=2 evaluate.py: 3 videos split longest first over 2 gloo ranks (rank 0 gets the
    3rd, rank 1 the 1st and 2nd), a sweep of two pairs, context resets counted on each rank. predictions.jsonl and
    sweep.csv are byte-equal to one process's; metrics.json and report.html too once their wall-clock figures are
    masked."""
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks compute with one thread each: the same kernels, the same sums
    try:
        assert evaluate.main(["--ckpt", str(tiny_ckpt), "--out", str(single), *EVAL_ARGS]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

    ranks = tmp_path / "ranks"
    result = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "evaluate.py"),
         "--ckpt", str(tiny_ckpt), "--out", str(ranks), *EVAL_ARGS],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("best: ") == 1  # rank 0 alone reports
    assert result.stderr.count("precision: ") == 1

    for name in ("predictions.jsonl", "sweep.csv"):
        assert (ranks / name).read_bytes() == (single / name).read_bytes(), name
    for name in ("metrics.json", "report.html"):
        assert without_wall_clock(ranks / name) == without_wall_clock(single / name), name
    text = (single / "predictions.jsonl").read_text()
    assert len({line.split('"video_uid": ')[1].split(",")[0] for line in text.splitlines()}) == 3
    assert json.loads((single / "metrics.json").read_text())["context_resets"] > 0  # the ranks' counts add up
    assert sorted(p.name for p in ranks.iterdir()) == ["metrics.json", "predictions.jsonl", "report.html", "sweep.csv"]


def test_an_error_on_one_rank_ends_every_rank(tiny_ckpt, tmp_path, capsys):
    """Only rank 0 loads the sentence embedder: a bad --embedder fails there alone, and both ranks still end with
    status 1 and one error line (printed by rank 0) instead of rank 1 waiting for rank 0 in a collective. The ranks
    are started without torchrun, whose launcher would stop the second one as soon as the first one failed, so
    that each rank's own exit status shows. One process: the same line."""
    bad = ["--ckpt", str(tiny_ckpt), "--embedder", str(tmp_path / "no_encoder"), "--split", "train",
           "--max-videos", "2"]
    message = (f"--embedder must be 'minilm', 'bow' or an encoder directory; '{tmp_path / 'no_encoder'}' is none "
               f"of these")
    assert evaluate.main(bad) == 1
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err

    port = str(free_port())
    ranks = [subprocess.Popen(
        [PY, str(ROOT / "evaluate.py"), *bad, "--dist-timeout-s", "120"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1], [err[-2000:] for _, err in outputs]
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in outputs]
    assert errors == [[f"error: rank 0: {message}"], []]
    assert not any("Traceback" in err for _, err in outputs)
