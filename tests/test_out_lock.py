"""Two trainers on one --out: the second fails at once, naming the first."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from actserve.clients.out_lock import OutputInUse
from actserve.clients.train_options import TrainOptions
from actserve.clients.trainer import train
from actserve.proto.manifest_pb2 import HookStats
from actserve.testing import TensorBatches


def test_second_trainer_on_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # the first trainer's lock, held by another process
        [sys.executable, "-c", "import sys; from pathlib import Path; from actserve.clients.out_lock import hold_out_lock; "
         f"lock = hold_out_lock(Path({str(out)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
        stats = HookStats(count=256, mean_norm=float(x.norm(dim=1).mean()), mean_sq_norm=float(x.pow(2).sum(1).mean()))
        opts = TrainOptions(hook="h", out=str(out), tokens=256, batch_size=128, expansions=(2,))
        with pytest.raises(OutputInUse, match=rf"in use by another trainer \(pid {holder.pid} on .+\): give this run its own --out"):
            train(opts, TensorBatches(x, "h", 128), 16, stats, progress=False)
    finally:
        holder.communicate("")
    (path,) = train(opts, TensorBatches(x, "h", 128), 16, stats, progress=False)  # free again once it ended
    assert (path / "sae_weights.safetensors").exists()
