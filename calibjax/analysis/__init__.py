"""Analysis: tables in, summaries, figures and a report out (nothing trains here).

- ``summaries``: per-run learning times and final values, aggregated per setting
- ``figures``: which figures a directory gets, and one on request (``draw``)
- ``plots``: the figures (imports matplotlib, so it is not imported here: ``from calibjax.analysis
  import plots``)
- ``report``: one self-contained HTML page of a results directory
"""

FIGURE_KINDS = ("standard", "heatmap", "density", "reliability")  # calibjax plot DIR KIND (figures.draw)

from calibjax.analysis import report, summaries  # noqa: E402
from calibjax.analysis.report import write_report  # noqa: E402
from calibjax.analysis.summaries import summarize, write_summaries  # noqa: E402

__all__ = ["FIGURE_KINDS", "report", "summaries", "summarize", "write_report", "write_summaries"]
