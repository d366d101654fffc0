"""What lands on disk: the output folder transaction, the writer (``camframe.write``), pictures, manifest,
report, resume journal, the input pipeline and input expansion."""
