"""File tools of the CLI (``clipserve score-file``, ``embed-file``, ``--plot``): reading and
writing CSV / JSONL / Parquet rows, scoring and embedding whole files with resume, and charts."""
