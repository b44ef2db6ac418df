"""The engines under the loop: the Accelerator (DDP, DeepSpeed ZeRO-1/2/3, FSDP2), checkpoint
I/O and resume, preemption signals, and the launcher for worker processes."""
