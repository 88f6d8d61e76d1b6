"""Layer 6, training: running algorithms and keeping what they produce.

    loop              the one run loop: `run_rounds` (checkpoints and audit log as
                      options), `run_seeds` (S seeds in one compiled program)
    checkpoint        orbax checkpoints of a run, resumable; single-file state
                      snapshots (`save_state_file`) for the audit log
    audit             hash-chained, append-only log of every round
    evaluation, evaluation_tasks
                      per-site and pooled metrics of a trained model
    report            tidy results.json records, tables and figures
    memory            peak resident memory of this process (benchmarks' memory columns)
    sharding          the K axis over a jax.sharding Mesh

This package imports the layers below it (core ... algorithms), never the
experiments.
"""

from fedjax_med.training import audit
from fedjax_med.training import checkpoint
from fedjax_med.training import evaluation
from fedjax_med.training import evaluation_tasks
from fedjax_med.training import loop
from fedjax_med.training import memory
from fedjax_med.training import report
from fedjax_med.training import sharding
from fedjax_med.training.loop import run_rounds, run_seeds, stack_states

__all__ = ["audit", "checkpoint", "evaluation", "evaluation_tasks", "loop", "memory", "report",
           "sharding", "run_rounds", "run_seeds", "stack_states"]
