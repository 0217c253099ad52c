"""Loss heads: plain PyTorch over per-token / per-sequence vectors."""
