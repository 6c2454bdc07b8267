"""moeframe-parallel: the parallel layouts of moeframe as Lightning strategies.

Selected by name (``--trainer.strategy NAME``) through the ``moeframe.strategy`` entry points:

- ``zero1``, ``zero2``, ``zero3``, ``zero3_offload``: DeepSpeed ZeRO (``deepspeed_presets``),
  runnable on CPUs (gloo) as well as GPUs (nccl);
- ``fsdp2``: PyTorch FSDP2, ``fully_shard`` per decoder block (``fsdp2``);
- ``ep`` (``ep_size`` option) and ``ep2_ddp``: expert parallelism composed with data
  parallelism (``expert_parallel``);
- ``pp`` (``pp_size``, ``schedule``, ``microbatches``, ``vpp``, ``layers_per_stage``): pipeline
  parallelism × data parallelism on ``torch.distributed.pipelining`` (``pipeline``; the layout
  arithmetic in ``pipeline_layout``).

Plain data parallelism stays Lightning's own ``ddp``. Nothing is imported at package import:
the registry imports only the module of the strategy a run selects.
"""
