"""Intra-op threads from the CPUs a run really has (ftcluster.train.distributed.cpu_threads): cgroup
quotas (v1 and v2) under a fake filesystem root, CPU affinity, Slurm's allocation, processes per
node, and the user's OMP_NUM_THREADS. Torch-free, except the last test, which checks that a CPU
worker applies the number."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.train.distributed import cgroup_cpu_quota, cpu_threads

ROOT = Path(__file__).resolve().parents[2]


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A filesystem root with /proc/self/cgroup and cgroup files (paths under sys/fs/cgroup)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_without_limits_the_affinity_is_shared_by_the_nodes_processes(tmp_path):
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cpu_threads({}, 1, root, affinity=8) == 8
    assert cpu_threads({}, 2, root, affinity=8) == 4
    assert cpu_threads({}, 3, root, affinity=8) == 2
    assert cpu_threads({}, 4, root, affinity=1) == 1  # never 0


def test_cgroup_v2_quota_rounds_up_and_the_tightest_ancestor_wins(tmp_path):
    root = fake_root(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "150000 100000\n",  # the pod's limit: 1.5 CPUs
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_quota(root) == 2
    assert cpu_threads({}, 1, root, affinity=64) == 2  # not the host's 64 cores
    assert cpu_threads({}, 2, root, affinity=64) == 1


def test_cgroup_v2_in_a_namespace_reads_the_mount_itself(tmp_path):
    """In a container the cgroup is mounted at /sys/fs/cgroup while /proc/self/cgroup may still name
    the host's path: that path is missing here, and the mount's own cpu.max counts."""
    root = fake_root(tmp_path, "0::/docker/abc\n", {"cpu.max": "200000 100000\n"})
    assert cpu_threads({}, 1, root, affinity=16) == 2


def test_cgroup_v1_cfs_quota(tmp_path):
    root = fake_root(tmp_path, "4:memory:/slurm/job1\n3:cpu,cpuacct:/slurm/job1\n1:cpuset:/\n", {
        "cpu,cpuacct/slurm/job1/cpu.cfs_quota_us": "400000\n",
        "cpu,cpuacct/slurm/job1/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/slurm/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/slurm/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_quota(root) == 4
    assert cpu_threads({}, 2, root, affinity=64) == 2


def test_cgroup_v1_without_quota_and_no_cgroup_files(tmp_path):
    root = fake_root(tmp_path, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root) is None
    assert cgroup_cpu_quota(tmp_path / "nowhere") is None
    assert cpu_threads({}, 1, tmp_path / "nowhere", affinity=3) == 3


@pytest.mark.parametrize("env, want", [
    ({"SLURM_CPUS_PER_TASK": "6", "SLURM_CPUS_ON_NODE": "32"}, 3),  # the task (one per node) has 6
    ({"SLURM_CPUS_ON_NODE": "4"}, 2),
    ({"SLURM_CPUS_ON_NODE": "128"}, 8),  # the affinity (16) is tighter
    ({"SLURM_CPUS_PER_TASK": ""}, 8),
])
def test_slurm_allocation(env, want, tmp_path):
    assert cpu_threads(env, 2, tmp_path, affinity=16) == want


def test_the_users_omp_num_threads_wins(tmp_path):
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, 1, tmp_path, affinity=1) is None
    assert cpu_threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}, 1, tmp_path, affinity=8) is None


def test_torchruns_default_of_one_thread_is_not_the_users_choice(tmp_path):
    """torchrun sets OMP_NUM_THREADS=1 for several processes per node when its own environment has none;
    the agent (the worker's parent) shows the environment it was started with."""
    env = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    parent = tmp_path / "proc" / str(os.getppid())
    assert cpu_threads(env, 2, tmp_path, affinity=8) is None  # parent's environment unreadable: keep it
    parent.mkdir(parents=True)
    (parent / "environ").write_bytes(b"PATH=/usr/bin\0HOME=/root\0")
    assert cpu_threads(env, 2, tmp_path, affinity=8) == 4
    (parent / "environ").write_bytes(b"PATH=/usr/bin\0OMP_NUM_THREADS=1\0")
    assert cpu_threads(env, 2, tmp_path, affinity=8) is None


@pytest.mark.train
def test_a_cpu_worker_uses_the_cpus_it_may_run_on():
    """Pinned to one CPU of a larger machine, the worker runs one intra-op thread, not one per core."""
    pytest.importorskip("torch")
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least two CPUs")
    code = textwrap.dedent("""\
        import os, types, torch
        from ftcluster.train.distributed import init_distributed
        spec = types.SimpleNamespace(resources=types.SimpleNamespace(gpus_per_node=0))
        init_distributed(spec)
        print(torch.get_num_threads())
        """)
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MASTER_ADDR") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
