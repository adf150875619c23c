"""Per-step cost of the Lightning Trainer and of Fabric against a bare loop, side by side.

``python -m core.engine.overhead`` trains the kd image student (SmallCNN 8/16/32, batch 128 of
28x28 images, Adam) for ``--steps`` steps three ways in one process, interleaved over
``--rounds`` rounds, and prints the median time per step and the ratios to the bare loop. The
engine uses Fabric for loops whose steps are this short (design.md, "The experiment engine").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from core.engine.trainer import build_fabric, build_trainer
from core.models.cnn import SmallCNN


class _Module(L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def _data(steps: int, batch: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = steps * batch
    return TensorDataset(
        torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def bare(data: TensorDataset, batch: int) -> float:
    net = SmallCNN((8, 16), 32)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for x, y in DataLoader(data, batch_size=batch):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def fabric(data: TensorDataset, batch: int) -> float:
    fab = build_fabric({"accelerator": "cpu", "devices": 1})
    net = SmallCNN((8, 16), 32)
    net, opt = fab.setup(net, torch.optim.Adam(net.parameters(), lr=2e-3))
    loader = fab.setup_dataloaders(DataLoader(data, batch_size=batch))
    t0 = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        fab.backward(loss)
        opt.step()
    return time.perf_counter() - t0


def trainer(data: TensorDataset, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = build_trainer(
            {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False},
            tmp,
            logger=False,
            checkpoint=False,
        )
        module = _Module(SmallCNN((8, 16), 32))
        t0 = time.perf_counter()
        t.fit(module, DataLoader(data, batch_size=batch))
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = _data(args.steps, args.batch)
    ways = {"bare": bare, "fabric": fabric, "trainer": trainer}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            times[name].append(fn(data, args.batch) / args.steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:8s} {v:6.2f} ms/step  x{v / med['bare']:.3f} of bare  rounds {times[k]}")
    return med


if __name__ == "__main__":
    main()
