"""Run under torchrun by tests/test_common_dist.py: exercises init, gathers, seeding and a collective checkpoint."""
import json
import sys

import torch

from ov3common import dist as D
from ov3common.checkpoint import CheckpointManager
from ov3common.data import ResumableSampler

out = sys.argv[1]
info = D.init_distributed("cpu")
x = torch.full((2, 3), float(info.rank + 1), requires_grad=True)
gathered = D.all_gather_with_grad(x)
(gathered * torch.arange(gathered.shape[0]).float()[:, None]).sum().backward()
mean = D.all_reduce_mean(torch.tensor([float(info.rank)]))
sampler = ResumableSampler(10, seed=3, rank=info.rank, world_size=info.world_size)
mgr = CheckpointManager(f"{out}/ckpt")
mgr.save(5, {"model": {"w": torch.ones(3)}}, rank_state={"rank": info.rank, "t": torch.tensor([info.rank])})
state, rank_state = mgr.load()
res = {
    "rank": info.rank, "world": info.world_size, "backend": torch.distributed.get_backend(),
    "gathered": gathered.detach()[:, 0].tolist(), "grad": x.grad[:, 0].tolist(), "mean": mean.item(),
    "order": list(sampler), "rank_state": rank_state["rank"], "rank_tensor": rank_state["t"].tolist(),
    "seed": D.step_seed(1, 2, info.rank),
}
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump(res, f)
D.cleanup()
