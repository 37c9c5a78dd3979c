"""Batch-job machinery shared by the commands that write one output set per item.

:func:`run_items` gives a command atomic outputs, a JSON-lines manifest, ``--resume``, the
settings guard, per-item error records, a progress bar, structured logs and torchrun sharding;
:mod:`tag2mask.jobs.overlap` runs a command's stages overlapped in worker processes
(:class:`Stages`); :mod:`tag2mask.jobs.distributed` holds the process-group helpers. See ``docs/batch_jobs.md``.
"""

from tag2mask.jobs.overlap import Stages, default_workers
from tag2mask.jobs.runner import (
    ItemError,
    ItemOutput,
    JobOptions,
    JobSpec,
    JobSummary,
    print_summary,
    process_exit_code,
    run_items,
    run_job,
)

__all__ = ["ItemError", "ItemOutput", "JobOptions", "JobSpec", "JobSummary", "Stages", "default_workers",
           "print_summary", "process_exit_code", "run_items", "run_job"]
