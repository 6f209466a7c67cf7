"""The pytest11 entry point: options, markers, fixtures, and the built-in checks brought into the
run when --quantvla-model is given (from any folder, nothing to copy). Measurements travel as
user_properties, so the controller aggregates them the same way with or without xdist."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_quantvla import options, report
from pytest_quantvla.collect import CheckItem
from pytest_quantvla.fixtures import (  # noqa: F401 - registered as the plugin's fixtures
    quantvla_calibration,
    quantvla_fp_model,
    quantvla_libero,
    quantvla_memory,
    quantvla_quantized_model,
    quantvla_run,
    quantvla_statistics,
)
from pytest_quantvla.report import PAIR

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

    from quantvla.eval.gate import Verdict

MARKERS = {
    "libero": "LIBERO success-rate gates (real simulator; nightly or on demand)",
    "gpu": "needs a CUDA device (nightly GPU job)",
    "slow": "takes minutes rather than seconds",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    run = config.stash[options.RUN_KEY] = options.parse(config)
    if run.model is not None:  # parse resolved the quantizer: an unknown one is already a usage error
        from quantvla.quant import fused

        fused.set_forward(run.forward)  # in every process that runs checks (each xdist worker configures too)
        if selects_libero(config.option.markexpr or "") and not hasattr(config, "workerinput"):
            from pytest_quantvla.checks.libero import check_suites
            check_suites(run)  # here, on the controller: a usage error on an xdist worker is swallowed
    if not hasattr(config, "workerinput"):  # the controller, or a serial run
        config.pluginmanager.register(Reporter(config), "quantvla-reporter")
        if run.model is not None and not _distributed(config):  # progress lines where they are seen
            from pytest_quantvla import subject

            def say(line: str) -> None:
                tr = config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None and tr.verbosity >= -1:  # shown with -q, silenced by -qq
                    tr.write_line(line)

            subject.progress = say


def pytest_sessionfinish(session: pytest.Session) -> None:
    libero = sys.modules.get("pytest_quantvla.checks.libero")
    if libero is not None:
        libero.close_envs()  # every process closes the LIBERO envs it opened


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Append the built-in checks before -m/-k deselection runs. Every xdist worker builds the
    same sorted list, so the controller sees identical collections."""
    run = config.stash[options.RUN_KEY]
    if run.model is None:
        return
    from pytest_quantvla.checks import all_checks

    with_libero = selects_libero(config.option.markexpr or "")
    checks = sorted(all_checks(run, with_libero), key=lambda c: c.name)
    for check in checks:
        items.append(CheckItem.from_parent(session, name=check.name, nodeid=check.name, check=check))
    from pytest_quantvla import subject

    subject.progress(f"quantvla: measure: {len(checks)} built-in checks (before -k/-m selection)")


def _distributed(config: pytest.Config) -> bool:
    """Whether xdist workers will build the subject (then this process never does)."""
    return bool(getattr(config.option, "numprocesses", None)) and not getattr(config.option, "collectonly", False)


def _marked_libero_or_slow(name: str, /, **_: str | int | bool | None) -> bool:
    return name in ("libero", "slow")


def selects_libero(markexpr: str) -> bool:
    """Whether -m selects the LIBERO pair items (marked libero and slow): "libero" yes,
    "not libero" or "not slow" no. The pairs are built only when asked for by name."""
    if "libero" not in markexpr:
        return False
    from _pytest.mark.expression import Expression

    try:
        return Expression.compile(markexpr).evaluate(_marked_libero_or_slow)
    except Exception:  # pytest reports a malformed -m itself
        return True


def _mark(ok: bool | None) -> str:
    return "ok" if ok else ("error" if ok is None else "--")


class Reporter:
    """Keeps each built-in check's outcome and measurements (user_properties) as reports arrive:
    on the controller under xdist, in-process otherwise; writes the table and the JSON once."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.results: dict[str, dict[str, Any]] = {}
        self._started: float | None = None  # when the first LIBERO pair began (for the time left)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.nodeid.startswith("quantvla/") or (report.when != "call" and not report.failed):
            return
        entry = self.results.setdefault(report.nodeid, {"outcome": report.outcome})
        if report.failed:
            entry["outcome"] = "failed"
            entry["message"] = str(report.longrepr)[-2000:]
        entry.update(dict(report.user_properties))
        if entry.get("kind") == PAIR and report.when == "call":
            self._progress(entry)

    def _progress(self, entry: dict[str, Any]) -> None:
        """One live line per finished pair: which, the running tally, and the time left."""
        import time

        run = self.config.stash[options.RUN_KEY]
        now = time.monotonic()
        if self._started is None:
            self._started = now - float(entry.get("fp_wall_s", 0) + entry.get("q_wall_s", 0))
        pairs = [r for r in self.results.values() if r.get("kind") == PAIR]
        total = run.episodes * len(run.suites or (None,))
        fp = sum(bool(r.get("fp_success")) for r in pairs)
        q = sum(bool(r.get("q_success")) for r in pairs)
        left = (now - self._started) / len(pairs) * max(0, total - len(pairs))
        where = f"{entry['suite']}/task{entry['task']}/init{entry['init']:02d}"
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"LIBERO {where}: FP {_mark(entry.get('fp_success'))}, quantized "
                          f"{_mark(entry.get('q_success'))} | {len(pairs)}/{total} pairs, FP {fp}, quantized {q}, "
                          f"about {left / 60:.1f} min left")

    def gate_verdicts(self) -> dict[str, Verdict]:
        """Per suite: the paired non-inferiority verdict over the LIBERO pairs that ran."""
        from quantvla.eval.gate import gates

        run = self.config.stash[options.RUN_KEY]
        if run.model is None:  # no model, no checks: nothing to decide
            return {}
        return gates(report.pair_records(self.results), run.family, run.quantizer_name, run.margin)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
        """A failing gate fails the run; so does an inconclusive one unless the user accepts it.
        An interrupted run decides nothing: its report says it is partial."""
        run = self.config.stash[options.RUN_KEY]
        self.partial = exitstatus == pytest.ExitCode.INTERRUPTED or bool(session.shouldstop)
        self.verdicts = self.gate_verdicts()
        inconclusive = any(v.decision == "inconclusive" for v in self.verdicts.values())
        if self.partial:
            return
        if any(v.decision == "fail" for v in self.verdicts.values()) or (inconclusive and not run.allow_inconclusive):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        run = self.config.stash[options.RUN_KEY]
        verdicts = getattr(self, "verdicts", {})
        if run.model is not None and self.results:
            summarize(terminalreporter, run, self.results, verdicts, getattr(self, "partial", False))
        for suite, v in verdicts.items():
            terminalreporter.write_line(f"LIBERO gate {suite}: {v.line()}", red=v.decision == "fail",
                                        yellow=v.decision == "inconclusive", green=v.decision == "pass")
            if v.decision == "inconclusive":
                consequence = ("accepted (--quantvla-allow-inconclusive)" if run.allow_inconclusive else
                               "the run fails; pass --quantvla-allow-inconclusive to accept it")
                terminalreporter.write_line(f"WARNING: the LIBERO gate {suite} decided nothing: {consequence}",
                                            yellow=True)
        if getattr(self, "partial", False) and self.results:
            where = f"; partial report in {run.report}" if run.report is not None else ""
            terminalreporter.write_line(f"quantvla: the run was interrupted: {len(self.results)} checks finished, "
                                        f"nothing decided{where}", yellow=True)


def summarize(terminalreporter: TerminalReporter, run: options.RunConfig, results: dict[str, dict[str, Any]],
              verdicts: dict[str, Verdict], partial: bool = False) -> None:
    tr = terminalreporter
    tr.section(f"quantvla: {run.model} ({run.size}) {run.bits}, quantizer {run.quantizer}, seed {run.seed}")
    for r in results.values():
        if "golden_update" in r:
            tr.write_line(r["golden_update"])
    summary = report.table(results)
    if summary:
        tr.write_line(summary)
    if tr.verbosity > 0 and report.layer_table(results):
        tr.write_line(report.layer_table(results))
    if run.report is not None:
        report.write_json(run.report, run, results, verdicts, partial)
        tr.write_line(f"report written to {run.report}")
        png = run.report.with_suffix(".png")
        if report.write_plot(png, results):
            tr.write_line(f"per-block attention statistics plotted to {png}")
