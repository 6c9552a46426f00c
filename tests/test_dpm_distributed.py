"""DPMLoss under torch.distributed: 2 processes on gloo (CPU) against one process on the
concatenated batch.  Features are all-gathered with gradient, the loss runs on the full
(B, B) sim on every rank, DDP averages the gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from structgrad.dpm import DPMLoss, all_gather_with_grad

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

N, D, K = 14, 5, 4
WORLD = 2
# (dataset positions of the global batch, rows of rank 0): equal and unequal splits, revisits
BATCHES = [
    (list(range(0, 6)), 3),
    ([7, 9, 2, 11, 13], 3),
    ([1, 0, 8, 3, 12, 6, 10], 3),
    ([4, 5, 2, 13], 1),
    ([9, 7, 0, 3, 6, 1], 3),
]
LOSS_KW = dict(tau=0.3, gamma=0.7, xi=0.0, zeta=-0.05, zeta_lr=(0.02, 0.2), zeta_momentum=0.9,
               zeta_start_step=1, zeta_estimator="seed", dtype=torch.float64)


class Encoders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(D, K, dtype=torch.float64)
        self.g = torch.nn.Linear(D, K, dtype=torch.float64)

    def forward(self, x, y):
        return torch.nn.functional.normalize(self.f(x), dim=-1), torch.nn.functional.normalize(self.g(y), dim=-1)


def data():
    g = torch.Generator().manual_seed(123)
    X = torch.randn(N, D, dtype=torch.float64, generator=g)
    return X, X + 0.3 * torch.randn(N, D, dtype=torch.float64, generator=g)


def train(model, crit, rank=None):
    """Run the batches; with ``rank`` set, this process holds only its rows of each batch."""
    X, Y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    record = []
    for step, (pos, cut) in enumerate(BATCHES):
        idx = torch.tensor(pos)
        if rank is not None:
            idx = idx[:cut] if rank == 0 else idx[cut:]
        fx, fy = model(X[idx], Y[idx])
        if rank is not None:
            fx, fy, idx = all_gather_with_grad(fx), all_gather_with_grad(fy), all_gather_with_grad(idx)
        out = crit(fx @ fy.T, idx)
        opt.zero_grad()
        out.surrogate.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        record.append({"grads": grads, "objective": out.objective.detach(), "idx": idx.clone()})
        opt.step()
        if step == 2:
            crit.update_xi()
    return record


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(Encoders())
        crit = DPMLoss(N, **LOSS_KW)
        record = train(model, crit, rank)
        torch.save(
            {"record": record, "state": crit.state_dict(), "params": model.module.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(0)
    model = Encoders()
    crit = DPMLoss(N, **LOSS_KW)
    single = train(model, crit)

    # every rank holds the same state, bit for bit
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    for r in ranks:
        for step, (a, b) in enumerate(zip(r["record"], single)):
            assert torch.equal(a["idx"], b["idx"])
            torch.testing.assert_close(a["objective"], b["objective"], rtol=1e-12, atol=1e-13)
            for ga, gb in zip(a["grads"], b["grads"]):
                torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        for k, v in crit.state_dict().items():
            if v.dtype.is_floating_point:
                torch.testing.assert_close(r["state"][k], v, rtol=1e-10, atol=1e-12, msg=k)
            else:
                assert torch.equal(r["state"][k], v), k
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-10, atol=1e-12, msg=k)
    # the ζ step ran (so the comparison covers it)
    assert crit.zeta_started.any() and not torch.equal(crit.zeta_y, torch.full((N,), -0.05, dtype=torch.float64))
