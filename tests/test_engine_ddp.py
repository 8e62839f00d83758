"""The engine under DistributedDataParallel: two gloo processes equal one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from autoflow import Sequential

from toys import Flip, ToyCoupling, perturb


def make_chain() -> Sequential:
    torch.manual_seed(0)
    return perturb(Sequential(ToyCoupling(4), Flip(), ToyCoupling(4), Flip())).double()


def batch() -> torch.Tensor:
    return torch.randn(4, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def loss_of(chain, x) -> torch.Tensor:
    y, logdet = chain(x)
    return (y.square().flatten(1).sum(1) - logdet).mean()


def worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    chain = make_chain()
    chain.memory_saving = True
    model = DistributedDataParallel(chain)
    loss_of(model, batch()[2 * rank: 2 * rank + 2]).backward()
    if rank == 0:
        torch.save([p.grad for p in chain.parameters()], out_file)
    dist.barrier()  # neither process may tear down gloo while the other still talks to it
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(str(tmp_path / "init"), out_file), nprocs=2, join=True)
    chain = make_chain()
    loss_of(chain, batch()).backward()
    for p, g in zip(chain.parameters(), torch.load(out_file)):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
