"""launch/: every accelerate config parses with accelerate's own loader and passes its launch validation, the shell
scripts are valid bash, the Slurm script builds the right per-node command, and cpu_2proc.yaml really forms a
2-process gloo group on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

# file -> (distributed_type, mixed_precision, num_processes, num_machines, use_cpu)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, "bf16", 1, 1, False),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, "bf16", 8, 1, False),
    "fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 8, 1, False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "bf16", 16, 2, False),
    # MULTI_GPU on purpose: accelerate's MULTI_CPU needs mpirun; see the file's comments.
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, "no", 2, 1, True),
}
SCRIPTS = ["cpu_2proc.sh", "slurm_multi_node.sbatch"]


def test_every_config_is_listed():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)
    assert all((LAUNCH / s).is_file() for s in SCRIPTS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate(name):
    path = LAUNCH / name
    config = load_config_from_file(str(path))  # raises on unknown keys / bad enum values
    assert isinstance(config, ClusterConfig)
    raw_keys = yaml.safe_load(path.read_text())  # the file as written, not accelerate's reading of it
    for key, value in raw_keys.items():
        got = getattr(config, key)
        assert (got.value if hasattr(got, "value") else got) == value, key
    dist, precision, nproc, machines, use_cpu = EXPECTED[name]
    assert config.distributed_type == dist
    assert config.mixed_precision == precision
    assert config.num_processes == nproc
    assert config.num_machines == machines
    assert config.use_cpu is use_cpu
    assert config.dynamo_config == {}  # torch.compile stays opt-in
    raw = path.read_text()
    assert raw.lstrip().startswith("#"), "each config starts with a comment saying what it is for"
    assert "accelerate launch --config_file launch/" + name in " ".join(raw.split()), "comment shows the command"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_passes_accelerate_launch_validation(name):
    """What `accelerate launch --config_file launch/NAME -m ddp_vad ...` resolves to (without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    extra = []
    if name == "multi_node.yaml":  # what slurm_multi_node.sbatch adds on node 1
        extra = ["--machine_rank", "1", "--main_process_ip", "node-a", "--main_process_port", "29512",
                 "--rdzv_backend", "c10d"]  # fmt: skip
    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / name), *extra, "-m", "ddp_vad", "x"])
    args, defaults, _ = _validate_launch_command(args)
    dist, precision, nproc, machines, _ = EXPECTED[name]
    assert args.multi_gpu is (dist == DistributedType.MULTI_GPU)
    assert args.num_processes == nproc and args.num_machines == machines
    assert args.mixed_precision == precision
    if name == "multi_node.yaml":
        assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "node-a", 29512)
        assert args.rdzv_backend == "c10d" and not args.same_network


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_are_valid_bash(script):
    path = LAUNCH / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK), f"{script} is not executable"


def test_cpu_2proc_script_usage():
    result = subprocess.run(["bash", str(LAUNCH / "cpu_2proc.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def _fake_bin(tmp_path: Path) -> Path:
    """scontrol / srun / accelerate stand-ins: srun runs its command once per node with SLURM_NODEID set; the fake
    accelerate writes its argv (one per line) to $FAKE_OUT/node<ID>.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "node-a\\nnode-b\\n"\n',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nfor id in 0 1; do SLURM_NODEID=$id "$@" || exit $?; done\n',
        "accelerate": 'printf "%s\\n" "$@" > "$FAKE_OUT/node$SLURM_NODEID.txt"\n',
        "nvidia-smi": "exit 1\n",  # must not be needed when Slurm says how many GPUs
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_script_builds_one_launch_per_node(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_OUT": str(out),
        "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }  # fmt: skip
    args = ["pretrain", "--shards", "/shared/my shards", "--out", "/shared/runs/gan", "--preset", "paper"]
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_multi_node.sbatch"), *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        argv = (out / f"node{node}.txt").read_text().splitlines()
        assert argv[0] == "launch" and argv[argv.index("--config_file") + 1] == "launch/multi_node.yaml"
        opts = dict(zip(argv[1 : -len(args) - 2 : 2], argv[2 : -len(args) - 2 : 2], strict=True))
        assert opts["--machine_rank"] == str(node)
        assert opts["--main_process_ip"] == "node-a"  # the first node of the allocation, on every node
        assert opts["--main_process_port"] == str(20000 + 4242 % 20000)
        assert opts["--num_machines"] == "2" and opts["--num_processes"] == "16"
        assert opts["--rdzv_backend"] == "c10d"  # not taken from the YAML by accelerate: must be on the CLI
        assert argv[-len(args) - 2 :] == ["-m", "ddp_vad", *args]  # arguments with spaces survive intact


@pytest.mark.parametrize(
    "given, expected, warned",
    [
        ({"SOCKET_IFNAME": "ib0"}, ("ib0", "ib0"), False),
        ({"SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth1"}, ("ib0", "eth1"), False),
        ({"NCCL_SOCKET_IFNAME": "ib0"}, ("ib0", ""), True),
        ({}, ("", ""), False),
    ],
)
def test_slurm_script_gives_nccl_and_gloo_the_same_interface(tmp_path, given, expected, warned):
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "accelerate").write_text(  # records the launcher's environment instead of its argv
        '#!/usr/bin/env bash\nprintf "%s\\n" "${NCCL_SOCKET_IFNAME:-}" "${GLOO_SOCKET_IFNAME:-}" '
        '"${DDP_VAD_GROUP_TIMEOUT:-}" > "$FAKE_OUT/node$SLURM_NODEID.txt"\n'
    )
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME") and k != "DDP_VAD_GROUP_TIMEOUT"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_OUT=str(out), SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(tmp_path), **given,
    )  # fmt: skip
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_multi_node.sbatch"), "pretrain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        assert (out / f"node{node}.txt").read_text().split("\n")[:3] == [*expected, "600"]
    assert ("GLOO_SOCKET_IFNAME" in result.stderr) == warned


@pytest.mark.slow
def test_cpu_2proc_config_forms_a_gloo_group(tiny_shards, tmp_path):
    """`accelerate launch --config_file launch/cpu_2proc.yaml -m ddp_vad pretrain` trains as ONE 2-process DDP job
    on the CPU (not two independent processes)."""
    accelerate = Path(sys.executable).parent / "accelerate"  # installed with the package, in this interpreter's bin
    assert accelerate.is_file(), f"accelerate CLI missing beside {sys.executable}"
    run = tmp_path / "gan"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [accelerate, "launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"), "-m", "ddp_vad", "pretrain",
           "--shards", str(tiny_shards), "--out", str(run), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
           "--workers", "0", "--checkpoint-every", "0", "--similarity-every", "0", "--image-every", "0",
           "--debug-keys", "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    hashes = [(run / "debug" / f"weights_rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    keys = [{row.split()[1] for row in (run / "debug" / f"keys_rank{r}.txt").read_text().splitlines()} for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
