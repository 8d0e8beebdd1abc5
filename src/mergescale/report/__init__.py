"""The study report: the papers' figures, tables and a findings table with verdicts, from study folders.

>>> from mergescale.report import build_report
>>> result = build_report(["studies/paper"], "report")          # doctest: +SKIP
>>> result.html, [f.verdict.value for f in result.findings]    # doctest: +SKIP

Modules: :mod:`.data` (study folders combined, derived tables), :mod:`.findings` (claims, verdicts; pure),
:mod:`.figures` (one function per figure), :mod:`.html` (report.html, report.md, tables/*.csv),
:mod:`.build` (:func:`build_report`: everything, written atomically). See docs/report.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Finding", "ReportResult", "Rules", "Verdict", "build_report", "evaluate_findings"]

_LAZY = {
    "build_report": ("mergescale.report.build", "build_report"),
    "ReportResult": ("mergescale.report.build", "ReportResult"),
    "evaluate_findings": ("mergescale.report.findings", "evaluate_findings"),
    "Finding": ("mergescale.report.findings", "Finding"),
    "Rules": ("mergescale.report.findings", "Rules"),
    "Verdict": ("mergescale.report.findings", "Verdict"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergescale.report' has no attribute {name!r}")
