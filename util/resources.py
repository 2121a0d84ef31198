"""The share of a CPU the pipeline's data tasks and CPU replicas ask Ray for: half, so that a small machine
holds the replicas and the tasks beside them (else the pipeline waits forever), and one share for every
data task, so that Ray fuses read, format and the block cut into one task.
"""

TASK_CPUS = 0.5  # each of the pipeline's data tasks: read, resume filter, format, scan, write
CPU_REPLICA_CPUS = 0.5  # a replica on a CPU-only cluster: vLLM runs its own threads whatever Ray counts
