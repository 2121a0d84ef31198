"""The share of a CPU each part of the pipeline asks Ray for: one place, so the parts agree.

Read, format, filter and write tasks take half a CPU, not a whole one: on a small machine whole CPUs for
the replicas would leave none for the data tasks, and the pipeline would wait forever. With one share for
all of them, Ray also fuses read, format and the block cut into one task (util/pipeline.py). A CPU-only
cluster must hold the replicas and one data task beside them (util/plan.py checks it before a run).
"""

TASK_CPUS = 0.5  # each of the pipeline's data tasks: read, resume filter, format, scan, write
CPU_REPLICA_CPUS = 0.5  # a replica on a CPU-only cluster: vLLM runs its own threads whatever Ray counts
