"""torch.distributed for the trainer: set-up from torchrun's environment, gradient averaging.

Distributed (``torchrun --nproc_per_node N -m fastmeta.train ...``): every process
holds both models and takes ``--batch-size`` examples of each global batch of
``N·batch-size``; the gradients each optimizer steps with are averaged over processes
with ``all_reduce`` just before the step (an optimizer step pre-hook, so it also
covers steps ``meta_step`` takes internally), as DDP averages its models' gradients.
Batch-mean losses over equal shards average to the global batch mean, so N processes
compute the same update as one process on the concatenated batch.
"""
from __future__ import annotations

import os

import torch


class _Distributed:
    """torch.distributed set-up from torchrun's environment; a no-op for one process."""

    def __init__(self, device_request: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device_request == "auto":
            self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        else:
            self.device = torch.device(device_request)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.local_rank if self.world_size > 1 else 0)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available")
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend=backend)
                self.owns_group = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_module(self, module: torch.nn.Module) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def average_gradients_before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Register a step pre-hook that all-reduces (mean) every gradient the optimizer will use."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        world = self.world_size

        def hook(opt, args, kwargs):
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            # a parameter with no gradient on one rank but one on another would deadlock or diverge
            count = torch.tensor([len(grads)], dtype=torch.long, device=grads[0].device if grads else self.device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            dist.all_gather(counts, count)
            if len({int(c) for c in counts}) != 1:
                raise RuntimeError(f"ranks hold gradients for different parameter sets ({[int(c) for c in counts]})")
            for grad in grads:
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad.div_(world)
            return None

        optimizer.register_step_pre_hook(hook)

    def average_tensors(self, tensors) -> None:
        """In place: every tensor becomes its mean over the processes (the ``grad_sync`` given to meta_step)."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            if tensor is not None:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_object(self, obj):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
