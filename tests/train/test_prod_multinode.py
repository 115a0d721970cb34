"""Multi-node launch: two torchrun launches (`--nnodes 2`, c10d rendezvous) on localhost, one process
each, train exactly like one process on the global batch."""
import socket
import subprocess
import sys

import pytest

from tests.train.test_ddp import ARGS, _assert_same_training
from tests.train.util import ROOT, env, kfe, load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 2 "nodes" + 1 process: ~15 s alone, ~40 s on the loaded 2-core machine
def test_two_nodes_on_localhost_equal_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "kfe-2-nodes",
            "-m", "train.cli", *ARGS, "--out", two]
    nodes = [subprocess.Popen(node, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    single = kfe(*ARGS, "--out", one)
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert single.returncode == 0, single.stderr[-3000:]
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outs)
    assert sum("2 process(es) on cpu" in o for o in outs) == 1  # rank 0 prints; the world spans both launches
    _assert_same_training(load_checkpoint(one, 3), load_checkpoint(two, 3))
