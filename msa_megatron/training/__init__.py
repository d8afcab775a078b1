"""The msa_megatron trainer (``msa-train``), one module per job:

config (typed schema + validation), msa_adapter (the only door to the MSA backend),
model (TransformerConfig, GPT chunks, DDP), optim (distributed optimizer, LR schedule),
corpus (the embedded stdlib corpus), data (megatron.core.datasets + sampler), hooks
(MSA schedule: warmup, KL coefficient, indexer-only phase), numerics (non-finite
detection), checkpoint (atomic dist_checkpointing), metrics (FLOPs, MFU, memory),
logging (console, JSONL, wandb), preemption (SIGTERM), loop (the run).

Importing this package is light; Megatron-Core is imported when a run starts."""
