"""Ops: one torch.autograd.Function per fused op, kernel launches behind the backends."""
