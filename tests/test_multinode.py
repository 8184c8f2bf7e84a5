"""More processes than one: a two-node launch (run_multinode.sh twice, c10d rendezvous on 127.0.0.1) trains as one
node with two processes does; evaluation under torchrun writes exactly the files one process writes; an error on
one rank ends every rank; the balanced split of videos over ranks."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess

import pytest
import torch

import evaluate
from conftest import PY, ROOT, run_train, tiny_overrides, train_records, wait_for_step
from distributed import balanced_shares

LOSS_FIELDS = ("loss", "asst_ce", "dst_ce", "speak_bce", "dst_bce", "grad_norm", "n_asst", "n_dst", "n_speak_pos")


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


def test_two_node_launch_equals_one_node(demo_dir, tmp_path):
    """run_multinode.sh on two "nodes" (two launchers x 1 process, c10d rendezvous on 127.0.0.1, no node rank) gives
    the per-step losses of one launcher with 2 processes; one of them writes the run's files."""
    steps = {"train.max_steps": 3}
    run_train(tiny_overrides(demo_dir, tmp_path / "one_node", **steps), nproc=2)

    two_nodes = tmp_path / "two_nodes"
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": f"test-{os.getpid()}", "PYTHON": PY, "OMP_NUM_THREADS": "1"}
    command = [str(ROOT / "run_multinode.sh"), str(ROOT / "configs" / "demo.yaml"),
               *tiny_overrides(demo_dir, two_nodes, **steps)]
    launchers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, out[-2000:] + err[-3000:]
    # Global rank 0 lives on one of the two launchers: it alone reports the start and writes config.yaml.
    assert sorted(out.count("run: ") for out, _ in outputs) == [0, 1]
    assert (two_nodes / "config.yaml").is_file()
    assert {p.name for p in (two_nodes / "step_3").glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}

    one, two = train_records(tmp_path / "one_node"), train_records(two_nodes)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert {f: two[step][f] for f in LOSS_FIELDS} == {f: one[step][f] for f in LOSS_FIELDS}, step


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


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: the command once per node of the allocation, signals forwarded to every copy, the highest
# exit status returned (what srun does across nodes).
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid" && code=0 || code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    (( code > status )) && status=$code
done
exit "$status"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol on one machine: every node is 127.0.0.1; requeue requests are written down.
case "$1 $2" in
    "show hostnames") printf '127.0.0.1\\n127.0.0.1\\n' ;;
    requeue*) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""


@pytest.mark.slow
def test_sbatch_saves_and_requeues_before_the_time_limit(demo_dir, tmp_path):
    """slurm/train.sbatch on two fake nodes of one machine (srun and scontrol stand-ins): SIGUSR1, as --signal sends
    it before the time limit, reaches every rank as SIGTERM through srun and the launchers; the ranks save the step
    they are in, and the job asks to be requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir, log = tmp_path / "run", tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": PY, "OMP_NUM_THREADS": "1",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": str(os.getpid()), "RDZV_PORT": str(free_port()), "NPROC_PER_NODE": "1",
           "FAKE_SLURM_LOG": str(log)}
    job = subprocess.Popen(
        ["bash", str(ROOT / "slurm" / "train.sbatch"), str(ROOT / "configs" / "demo.yaml"),
         *tiny_overrides(demo_dir, run_dir, **{"train.max_steps": 100000, "train.save_every": 100000})],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, job)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=300)
    checkpoints = list(run_dir.glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "rng_rank1.json").is_file(), err[-3000:]
    assert "interrupted by SIGTERM after step" in out and "time limit near" in err
    assert log.read_text() == f"requeue {os.getpid()}\n"


def _resume_worker(rank: int, world_size: int, init_file: str, scenarios: list[list[str]], out_file: str) -> None:
    import torch.distributed as dist
    from checkpoint import agreed_resume
    from config import ConfigError, load_config
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    answers = []
    for run_dirs in scenarios:  # each scenario: the run.dir every rank sees
        cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [f"run.dir={run_dirs[rank]}"])
        try:
            answers.append(str(agreed_resume(cfg, world_size)))
        except ConfigError as err:
            answers.append(f"error: {err}")
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(answers, f)
    dist.destroy_process_group()


def test_ranks_that_see_different_checkpoints_refuse_to_resume(tmp_path):
    """Nodes without a shared run directory: one rank sees step_10, the other nothing. Both refuse with the fix
    instead of one resuming at step 10 and the other starting fresh. With the same run directory both resume."""
    import torch.multiprocessing as mp
    node_a, node_b = tmp_path / "node_a" / "run", tmp_path / "node_b" / "run"
    (node_b / "step_10").mkdir(parents=True)
    node_a.mkdir(parents=True)
    scenarios = [[str(node_a), str(node_b)], [str(node_b), str(node_b)]]
    out = tmp_path / "answers"
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init"), scenarios, str(out)), nprocs=2)
    (split_0, shared_0), (split_1, shared_1) = (json.loads((tmp_path / f"answers.{r}").read_text()) for r in range(2))
    for answer in (split_0, split_1):  # every rank refuses, each naming its own run.dir and what every rank found
        assert answer.startswith("error: the ranks found different checkpoints")
        assert "rank 0: no checkpoint" in answer and f"rank 1: {(node_b / 'step_10').resolve()}" in answer
        assert "file system all nodes share" in answer
    assert shared_0 == shared_1 == str(node_b / "step_10")
