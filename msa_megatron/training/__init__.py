"""The msa_megatron trainer (``msa-train``), one module per job:

config (typed schema + validation), model (TransformerConfig, GPT chunks, DDP), optim
(distributed optimizer, LR schedule), corpus (the embedded stdlib corpus), data
(megatron.core.datasets + sampler), hooks (MSA schedule: warmup, KL coefficient,
indexer-only phase), numerics (non-finite detection), checkpoint (atomic
dist_checkpointing), metrics (FLOPs, MFU, memory), logging (console, JSONL, wandb),
preemption (SIGTERM), step (the forward step + LM loss, shared with Megatron-LM's
entry script and the multi-GPU validator), loop (the run).

Models are built and switched by the MSA backend (msa_megatron.megatron), which these
modules import directly, inside the functions that need it: importing this package is
light (the config is checked first); Megatron-Core is imported when a run starts."""
