"""``labelmill``: a thin click layer. Domain errors become one clear message and an exit code.

    app.py       the group, its options (logging), and error handling shared by the commands
    jobs.py      run, validate, status, export, import
    reports.py   bench, eval
    stores.py    cache info / clear, models list / fetch

Exit codes: 0 done; 1 unexpected crash; 2 bad job or input; 3 run folder refuses (changed job,
locked); 4 backend or model failed; 5 output could not be written; 6 finished, but some rows have
status ``error`` or ``invalid`` (they are in the output with the reason; rerun to retry ``error`` rows);
7 an optional package is missing (the message names the pip install).
"""

from pipeline.cli import jobs, reports, stores  # the commands register on ``main``
from pipeline.cli.app import main

__all__ = ["jobs", "main", "reports", "stores"]
