"""The three layouts of a distributed lm_head, each stated by the caller, in one runnable script.

    torchrun --nproc_per_node 2 examples/distributed_layouts.py        # CPU, gloo (any world size)

Every rank builds the same 37 x 16 head. Each layout computes a DPO loss and its gradients
with prefopt_fast straight from the hidden states (no logits), and checks them against one
process computing the same thing on the whole head:

1. replicated (DDP): every rank the whole head and its own pairs; DDP averages the gradient.
2. vocabulary-parallel (tensor parallel): every rank a slice of the head's rows and the
   SAME pairs; ``process_group=`` states it.
3. data-parallel sharded head (FSDP2 ``fully_shard``): every rank a shard of the head's
   rows (a DTensor) and its OWN pairs; a plain-tensor ``hidden`` states it.

prefopt_fast never infers 2 or 3 from a tensor's type: see docs/distributed.md.
"""

import torch
import torch.distributed as dist

from prefopt_fast.linear import linear_dpo_loss

V, H, PAIRS, T = 37, 16, 2, 5


def pairs_of(rank: int):
    """This rank's pairs: hidden [2 * PAIRS, T, H] (chosen rows first), labels, reference log-probs."""
    g = torch.Generator().manual_seed(1000 + rank)
    hidden = torch.randn(2 * PAIRS, T, H, generator=g)
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    labels[:, :2] = -100  # the prompt
    ref = torch.randn(2 * PAIRS, generator=g) - 8
    return hidden, labels, ref[:PAIRS], ref[PAIRS:]


def dpo(hidden, weight, labels, rc, rr, **kw):
    loss, _ = linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1, **kw)
    return loss


def one_process(weight, ranks):
    """Loss per rank and the weight gradient of the mean loss, on the whole head."""
    w = weight.clone().requires_grad_()
    losses = [dpo(*pairs_of(r)[:1], w, *pairs_of(r)[1:]) for r in ranks]
    torch.stack(losses).mean().backward()
    return [loss.detach() for loss in losses], w.grad


def check(name, got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    weight = torch.randn(V, H, generator=torch.Generator().manual_seed(0)) * 0.5
    own_losses, grad_all_ranks = one_process(weight, range(world))

    # 1. replicated: DDP over a module holding the whole head
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

        def forward(self, hidden, labels, rc, rr):
            return dpo(hidden, self.weight, labels, rc, rr)

    ddp = DDP(Head())
    loss = ddp(*pairs_of(rank))
    loss.backward()
    check("replicated loss", loss.detach(), own_losses[rank])
    check("replicated grad", ddp.module.weight.grad, grad_all_ranks)

    # 2. vocabulary-parallel: rows [start, start + n) of the head, the same pairs on every rank
    sizes = [V // world + (r < V % world) for r in range(world)]
    start, n = sum(sizes[:rank]), sizes[rank]
    w_local = weight[start : start + n].clone().requires_grad_()
    hidden, labels, rc, rr = pairs_of(0)  # the same tokens everywhere
    loss = dpo(hidden, w_local, labels, rc, rr, process_group=dist.group.WORLD)
    loss.backward()
    (want_loss,), want_grad = one_process(weight, [0])
    check("vocabulary-parallel loss", loss.detach(), want_loss)
    check("vocabulary-parallel grad rows", w_local.grad, want_grad[start : start + n])

    # 3. data-parallel sharded head: FSDP2 keeps lm_head.weight as a Shard(0) DTensor
    from torch.distributed.fsdp import fully_shard

    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    fully_shard(head)
    loss = dpo(*pairs_of(rank)[:1], head.weight, *pairs_of(rank)[1:])  # this rank's own pairs
    loss.backward()
    shard = head.weight.grad.to_local()  # this rank's rows of the gradient averaged over the ranks
    rows = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(rows, torch.tensor([shard.shape[0]]))
    first = int(sum(r.item() for r in rows[:rank]))
    check("fsdp2 loss", loss.detach(), own_losses[rank])
    check("fsdp2 grad shard", shard, grad_all_ranks[first : first + shard.shape[0]])

    if rank == 0:
        print(f"done: replicated, vocabulary-parallel and FSDP2 layouts match one process on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
