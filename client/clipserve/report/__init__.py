"""``clipserve report``: a scored benchmark as one self-contained HTML page.

The mean NDCG and MRR over queries, a sortable, filterable table of queries, each query's images
in score order with their labels, the pairs where score and label disagree most, and the score
distribution by label; see docs/report.md. Torch-free: only ``--embed-thumbnails`` needs the
server extra (its image decoding).
"""

from .data import ReportJob, report_settings_from_config
from .page import ReportSummary, write_report

__all__ = ["ReportJob", "ReportSummary", "report_settings_from_config", "write_report"]
