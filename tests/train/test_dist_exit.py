"""A finished torchrun worker leaves without finalizing the interpreter (train/dist.py exit_worker):
gloo threads that drop tensors during teardown abort the process after a run that succeeded."""
import subprocess
import sys
import textwrap

from tests.train.util import ROOT, env

SCRIPT = textwrap.dedent("""
    import atexit
    from train import dist

    class Finalized:
        def __del__(self):
            print("interpreter finalized", flush=True)

    keep = Finalized()
    atexit.register(lambda: print("atexit handlers ran", flush=True))
    print("unflushed output kept", end="")
    dist.exit_worker(3)
""")


def test_exit_worker_runs_atexit_keeps_output_and_skips_finalization():
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr
    assert "unflushed output kept" in r.stdout and "atexit handlers ran" in r.stdout
    assert "interpreter finalized" not in r.stdout, r.stdout


def test_torchrun_workers_are_recognised(monkeypatch):
    from train import dist

    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_torchrun_worker()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.is_torchrun_worker()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun --nproc_per_node=1 sets WORLD_SIZE=1
    assert dist.is_torchrun_worker()
