"""The report toolkit every project's report stage uses (design.md, "Shared code has one home").

- :mod:`core.report.stats`: mean and sample standard deviation over seeds, paired differences;
- :mod:`core.report.claims`: the one claim rule (paired difference, standard error, a stated
  minimum effect, the minimal detectable effect printed beside the verdict);
- :mod:`core.report.tables`: Markdown tables and number formats;
- :mod:`core.report.figures`: matplotlib figures saved atomically;
- :mod:`core.report.metrics`: flat DVC metrics files (short keys, numeric leaves).
"""
