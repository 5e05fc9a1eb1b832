"""The trainer's exit codes: the operator decides from them whether a failed pod is worth a restart."""

SUCCESS = 0
# Anything unexpected: a crash, an OOM, a lost peer. Retried, counted against backoffLimit.
FAILURE = 1
# The config or the data is wrong (or a permanent storage error): retrying cannot help, the job fails at once.
INVALID = 64
# SIGTERM (preemption, eviction, scale-down) handled: an emergency checkpoint was written. Retried, not counted.
PREEMPTED = 75
