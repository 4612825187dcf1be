"""A Hydra sweep's report: a table of its jobs and, for repeated configurations, mean, spread and
a 95% interval; ``scripts/sweep_report.py`` is its command line.

Jobs are read with :func:`fasterrcnn.metrics_file.find_runs` (each job's ``metrics.json``, or
its ``.hydra/overrides.yaml`` where it was killed first). The override keys whose value differs
between jobs, or that the sweep declared (``multirun.yaml``, the sweeper's ``params``), are the
swept keys; the rest are the fixed overrides.

Repeats: jobs that differ only in the repeat key (``seed`` by default;
``python src/train.py -m anchor=k9,k15 seed=0,1,2``) are one configuration. Over its completed
jobs it gets n, the mean, the standard deviation (with n - 1) and the 95% interval of the mean,
``mean ± t(0.975, n - 1) · std / √n`` (Student's t: :func:`t_quantile`). Two configurations
whose intervals overlap are reported as not separable with these seeds (a conservative rule:
intervals apart mean a clear difference). Jobs that did not complete are counted and listed
per configuration, never averaged.

The scored value is ``final`` (the last validation) unless ``use="best"``: ``best`` is the
validation with the highest ``val/map``, chosen on the very split it is scored on (for VOC, the
test split), so it is optimistic.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasterrcnn.metrics_file import MISSING, Run, find_runs

RECALL_PREFIX = "val/recall"
ERROR_WIDTH = 80
USES = ("final", "best")  # which part of metrics.json the report scores

# The 0.975 quantile of Student's t for 1..30 degrees of freedom (two-sided 95%), checked in
# tests/test_sweep_report.py by integrating the density.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959964


class SweepError(Exception):
    """The folder is not a sweep this report can read."""


# --------------------------------------------------------------------------- statistics


def t_quantile(df: int) -> float:
    """t(0.975, df): the table above for df <= 30, beyond it the Cornish-Fisher expansion around
    the normal quantile (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)


@dataclass
class Summary:
    """n values: their mean, standard deviation (n - 1) and 95% t-interval of the mean (None
    where n is too small)."""

    n: int
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None


def summarize(values: list[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def overlap(a: Summary, b: Summary) -> bool | None:
    """Whether the two intervals overlap; None when either has none (fewer than 2 values)."""
    if a.low is None or b.low is None:
        return None
    return a.low <= b.high and b.low <= a.high  # type: ignore[operator]


def objective(metrics: dict, use: str = "final", metric: str = "val/map") -> float:
    """The value a Hydra sweeper (Optuna) optimises, from a run's ``metrics.json``: ``metric`` of
    its ``final`` part or, with ``use="best"``, of ``best`` (optimistic); NaN when absent."""
    if use not in USES:
        raise ValueError(f"objective must be one of {', '.join(USES)}, not {use!r}")
    value = _number((metrics.get(use) or {}).get(metric))
    return math.nan if value is None else value


# --------------------------------------------------------------------------- the jobs


def _load_yaml(path: Path) -> Any:
    import yaml  # PyYAML comes with omegaconf

    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def declared_sweep_keys(sweep: Path, runs: list[Run]) -> set[str]:
    """The keys the sweep was asked to vary, whatever values the jobs happened to get: sweep
    overrides on the command line (``anchor=k9,k15``, ``x=range(1,4)``, in ``multirun.yaml``) and
    the sweeper's ``params`` / ``search_space`` (Optuna; also in each job's ``.hydra/hydra.yaml``)."""
    sources = [sweep / "multirun.yaml"] + [run.path / ".hydra" / "hydra.yaml" for run in runs[:1]]
    keys: set[str] = set()
    for source in sources:
        data = _load_yaml(source)
        hydra_cfg = data.get("hydra") if isinstance(data, dict) else None
        if not isinstance(hydra_cfg, dict):
            continue
        sweeper = hydra_cfg.get("sweeper") or {}
        for name in ("params", "search_space"):
            if isinstance(sweeper.get(name), dict):
                keys.update(str(k).lstrip("+") for k in sweeper[name])
        task = (hydra_cfg.get("overrides") or {}).get("task") or []
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            parser = OverridesParser.create()
            keys.update(str(item).partition("=")[0].lstrip("+") for item in task if parser.parse_override(str(item)).is_sweep_override())
        except Exception:  # no Hydra, or an override this Hydra cannot parse: rely on the values
            pass
    return keys


def split_overrides(runs: list[Run], declared: set[str] | frozenset = frozenset()) -> tuple[dict[str, str], list[str]]:
    """(fixed overrides: the same value in every job, swept keys in order of appearance).

    A key is swept when its value differs between jobs or the sweep declared it (``declared``)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    fixed, swept = {}, []
    for key in keys:
        values = {run.overrides.get(key) for run in runs}
        if len(values) == 1 and None not in values and key not in declared:
            fixed[key] = values.pop()
        else:
            swept.append(key)
    return fixed, swept


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def recall_keys(runs: list[Run]) -> list[str]:
    keys = {k for run in runs for part in (run.best, run.final) for k in part if k.startswith(RECALL_PREFIX)}
    return sorted(keys, key=_natural)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def score(run: Run, key: str, use: str) -> float | None:
    """``run``'s ``key`` in its ``use`` part (``final`` or ``best``), for completed runs only."""
    part = run.final if use == "final" else run.best
    return _number(part.get(key)) if run.status == "completed" else None


def short_error(error: str | None, width: int = ERROR_WIDTH) -> str:
    if not error:
        return ""
    text = " ".join(str(error).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------- the report


@dataclass
class Config:
    """The jobs of one configuration: the same overrides but for the repeat key."""

    values: dict[str, str | None]  # the swept keys other than the repeat key
    runs: list[Run]
    summary: Summary
    recall: dict[str, float | None] = field(default_factory=dict)  # mean over the completed runs

    def label(self, sep: str = ", ") -> str:
        return sep.join(f"{k}={v}" for k, v in self.values.items()) or "all jobs"

    @property
    def not_completed(self) -> list[Run]:
        return [run for run in self.runs if run.status != "completed"]


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]  # raw values (floats, ints, strings, None), one per job
    fixed: dict[str, str]
    swept: list[str]
    recall: list[str]
    metric: str
    use: str = "final"
    repeat_key: str | None = None  # set when the repeat key is swept: then configs are groups
    configs: list[Config] = field(default_factory=list)  # one per job when nothing is repeated
    runs: list[Run] = field(default_factory=list)

    @property
    def column(self) -> str:
        return f"{self.use} {self.metric}"


def group(runs: list[Run], swept: list[str], repeat_key: str | None, metric: str, use: str, recall: list[str]) -> list[Config]:
    """The configurations: jobs with the same values of the swept keys other than
    ``repeat_key``, in order of appearance (one per job when ``repeat_key`` is None)."""
    keys = [k for k in swept if k != repeat_key]
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k) for k in keys) if repeat_key else run.num, []).append(run)
    configs = []
    for members in groups.values():
        scores = [s for s in (score(r, metric, use) for r in members) if s is not None]
        means = {}
        for key in recall:
            vals = [v for v in (score(r, key, use) for r in members) if v is not None]
            means[key] = sum(vals) / len(vals) if vals else None
        configs.append(Config({k: members[0].overrides.get(k) for k in keys}, members, summarize(scores), means))
    return configs


def build_table(runs: list[Run], metric: str = "val/map", declared: set[str] | frozenset = frozenset(), use: str = "final", repeat_key: str | None = "seed") -> Table:
    if use not in USES:
        raise ValueError(f"use must be one of {', '.join(USES)}, not {use!r}")
    fixed, swept = split_overrides(runs, declared)
    repeat_key = repeat_key if repeat_key in swept else None
    recall = recall_keys(runs)
    other = "best" if use == "final" else "final"
    columns = ["job", *swept, "status", f"{use} {metric}", f"{other} {metric}", *(f"{use} {k}" for k in recall), "steps", "train time (s)", "error"]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"job": run.num, **{key: run.overrides.get(key) for key in swept}, "status": run.status}
        for part in (use, other):
            row[f"{part} {metric}"] = _number((run.final if part == "final" else run.best).get(metric))
        for key in recall:
            part = run.final if use == "final" else run.best
            row[f"{use} {key}"] = _number(part.get(key))
        row.update({"steps": run.steps, "train time (s)": _number(run.train_time_s), "error": run.error or ""})
        rows.append(row)
    if not any(row["error"] for row in rows):
        columns.remove("error")
    configs = group(runs, swept, repeat_key, metric, use, recall)
    return Table(columns, rows, fixed, swept, recall, metric, use, repeat_key, configs, runs)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _md_cell(column: str, value: Any) -> str:
    if column == "status":
        return f"**{str(value).upper()}**" if value in ("failed", MISSING) else str(value)
    if column == "error":
        text = short_error(value)
    elif value is None:
        return "–"
    elif column == "train time (s)":
        text = f"{value:.1f}"
    elif isinstance(value, float):
        text = f"{value:.4f}"
    else:
        text = str(value)
    return text.replace("|", "\\|")


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join(" --- " for _ in table.columns) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_cell(c, row[c]) for c in table.columns) + " |")
    return "\n".join(lines)


def repeat_values(config: Config, table: Table) -> str:
    """``0: 0.512, 1: 0.498, 2: FAILED``: each job's repeat value and score (or status)."""
    out = []
    for run in config.runs:
        value = score(run, table.metric, table.use)
        shown = f"{value:.4f}" if value is not None else ("no value" if run.status == "completed" else run.status.upper())
        out.append(f"{run.overrides.get(table.repeat_key)}: {shown}")  # type: ignore[arg-type]
    return ", ".join(out)


CONFIG_COLUMNS = ("n", "not completed", "mean ± std", "95% interval")


def config_table(table: Table) -> str:
    keys = list(table.configs[0].values) if table.configs else []
    columns = [*keys, *CONFIG_COLUMNS, f"{table.use} {table.metric} by {table.repeat_key}"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for c in table.configs:
        s = c.summary
        spread = "–" if s.mean is None else _fmt(s.mean) + ("" if s.std is None else f" ± {_fmt(s.std)}")
        interval = "–" if s.low is None else f"[{_fmt(s.low)}, {_fmt(s.high)}]"
        missed = len(c.not_completed)
        cells = [*(str(v) for v in c.values.values()), str(s.n), f"**{missed}**" if missed else "0", spread, interval, repeat_values(c, table)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def separability(table: Table) -> list[str]:
    """One plain-words line per pair of configurations."""
    lines = []
    for i, a in enumerate(table.configs):
        for b in table.configs[i + 1 :]:
            pair = f"`{a.label()}` vs `{b.label()}`"
            both = overlap(a.summary, b.summary)
            if both is None:
                few = [c.label() for c in (a, b) if c.summary.low is None]
                lines.append(f"- {pair}: cannot tell, fewer than 2 completed {table.repeat_key}s in {' and '.join(f'`{f}`' for f in few)}.")
            elif both:
                lines.append(f"- {pair}: the 95% intervals overlap: **not separable with these {table.repeat_key}s**.")
            else:
                higher = a if a.summary.mean > b.summary.mean else b  # type: ignore[operator]
                lines.append(f"- {pair}: separated (the 95% intervals do not overlap); `{higher.label()}` is higher.")
    return lines


def markdown_report(table: Table, sweep: Path) -> str:
    counts: dict[str, int] = {}
    for row in table.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"# Sweep report: {sweep}", ""]
    lines.append(f"{len(table.rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    scored = [c for c in table.configs if c.summary.mean is not None]
    if table.repeat_key and scored:
        top = max(scored, key=lambda c: c.summary.mean)  # type: ignore[arg-type,return-value]
        std = "" if top.summary.std is None else f" ± {top.summary.std:.4f}"
        lines.append(f"Highest mean {table.column}: {top.summary.mean:.4f}{std} (`{top.label()}`, n={top.summary.n}).")
    elif scored:
        best_row = max((r for r in table.rows if r[table.column] is not None and r["status"] == "completed"), key=lambda r: r[table.column])
        what = ", ".join(f"{k}={best_row[k]}" for k in table.swept if best_row[k] is not None)
        lines.append(f"Highest {table.column}: {best_row[table.column]:.4f} (job {best_row['job']}{': ' + what if what else ''}).")
    optuna = _load_yaml(sweep / "optimization_results.yaml")
    if isinstance(optuna, dict) and "best_params" in optuna:
        params = ", ".join(f"{k}={v}" for k, v in (optuna.get("best_params") or {}).items())
        lines.append(f"Optuna's best trial (optimization_results.yaml): {optuna.get('best_value')} with {params}.")
    if table.use == "final":
        lines.append("Scored on `final` (the last validation of each job); `--use best` for the best one.")
    else:
        on_test = [r.num for r in table.runs if r.status == "completed" and (r.selected_on or {}).get("is_test")]
        lines.append("Scored on `best` (the validation with the highest val/map, chosen on the split it is scored on: optimistic).")
        if on_test:
            lines.append(f"**Warning**: {len(on_test)} jobs chose `best` on the test split (`selected_on.is_test` in metrics.json): their `best` is optimistic about test; report `final`.")
    lines.append("")
    lines.append("Fixed overrides (the same in every job): " + " ".join(f"`{k}={v}`" for k, v in table.fixed.items()) if table.fixed else "Fixed overrides: none.")
    lines.append("Swept: " + (", ".join(f"`{k}`" for k in table.swept) if table.swept else "nothing (every job has the same overrides)."))
    lines += ["", markdown_table(table), ""]
    if table.repeat_key:
        lines += [f"## Configurations over `{table.repeat_key}`", ""]
        lines.append(
            f"Jobs that differ only in `{table.repeat_key}` form a configuration. n: its completed jobs; mean ± standard deviation "
            f"(n − 1) of {table.column} over them; 95% interval of the mean: mean ± t(0.975, n − 1) · std / √n (Student's t). "
            f"Jobs that did not complete are counted (not completed) and shown, not averaged."
        )
        lines += ["", config_table(table)]
        incomplete = [c for c in table.configs if c.not_completed]
        if incomplete:
            lines.append("")
        for c in incomplete:
            statuses = ", ".join(f"{table.repeat_key}={r.overrides.get(table.repeat_key)} {r.status}" for r in c.not_completed)
            lines.append(f"`{c.label()}`: {len(c.not_completed)} of {len(c.runs)} jobs did not complete ({statuses}); the mean is over the other {c.summary.n}.")
        if len(table.configs) > 1:
            lines += ["", "Separability (configurations whose 95% intervals overlap cannot be told apart with these repeats):", ""]
            lines += separability(table)
        lines.append("")
    return "\n".join(lines)


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow(["" if row[c] is None else row[c] for c in table.columns])


def write_configs_csv(table: Table, path: Path) -> None:
    keys = list(table.configs[0].values) if table.configs else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "n", "not completed", "mean", "std", "low95", "high95", "jobs"])
        for c in table.configs:
            s = c.summary
            nums = ["" if v is None else v for v in (s.mean, s.std, s.low, s.high)]
            writer.writerow([*(c.values.values()), s.n, len(c.not_completed), *nums, " ".join(str(r.num) for r in c.runs)])


# --------------------------------------------------------------------------- the plot


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that still tells the keys apart: sampler.proposal_target.n_sample
    -> proposal_target.n_sample when sampler.anchor_target.n_sample is swept too."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def bar_label(config: Config, table: Table) -> str:
    """A job: ``#job`` over its swept values; a configuration: its values over ``n=3``."""
    keys = list(config.values)
    names = short_keys(keys)
    if len(keys) == 1:
        parts = [f"{names[keys[0]]}={config.values[keys[0]]}"]
    else:
        parts = ["–" if v is None else str(v) for v in config.values.values()]
    if table.repeat_key:
        return "\n".join([*parts, f"n={config.summary.n}/{len(config.runs)}"])
    return "\n".join([f"#{config.runs[0].num}", *parts])


def axis_label(table: Table) -> str:
    keys = list(table.configs[0].values) if table.configs else []
    names = short_keys(keys)
    if table.repeat_key:
        return " / ".join(names[k] for k in keys) + f" (n: completed {table.repeat_key}s / jobs)"
    return "job" if len(keys) < 2 else "job, then " + " / ".join(names[k] for k in keys)


def write_png(table: Table, path: Path) -> None:
    """Bars of the scored metric per job or, with repeats, per configuration: the mean, the 95%
    interval as error bars and each repeat as a dot; failed jobs hatched (or counted in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, repeated = table.configs, table.repeat_key is not None
    panels = 2 if table.recall else 1
    labels = [bar_label(c, table) for c in configs]
    longest = max(len(line) for label in labels for line in label.splitlines())
    lines = max(label.count("\n") + 1 for label in labels)
    width = min(60.0, max(6.0, max(1.0, 0.075 * longest + 0.2) * len(configs) + 1.5))
    fig, axes = plt.subplots(panels, 1, figsize=(width, (3.6 + 0.17 * lines) * panels + 0.4), squeeze=False)
    xs = list(range(len(configs)))

    def no_value(ax, x, config, top):
        failed = any(r.status == "failed" for r in config.runs)
        ax.bar(x, top, width=0.6, fill=False, hatch="//", edgecolor="tab:red" if failed else "0.6", linewidth=1)
        text = "FAILED" if failed else (config.runs[0].status or "no data").upper()
        if repeated:
            text = f"ALL {len(config.runs)} {text}" if failed else "NO VALUE"
        ax.text(x, top / 2, text, rotation=90, ha="center", va="center", color="tab:red" if failed else "0.4", fontweight="bold", bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})

    ax = axes[0][0]
    highs = [c.summary.high if c.summary.high is not None else c.summary.mean for c in configs]
    top = max([h for h in highs if h is not None] + [0.0]) or 1.0
    top = min(1.0, top * 1.15) if top <= 1.0 else top * 1.15
    for x, c in zip(xs, configs):
        s = c.summary
        if s.mean is None:
            no_value(ax, x, c, top * 0.95)
            continue
        partial = bool(c.not_completed)
        ax.bar(x, s.mean, width=0.6, color="tab:orange" if partial and not repeated else "tab:blue", alpha=0.6 if repeated else 1.0)
        if s.low is not None:
            ax.errorbar(x, s.mean, yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="none", ecolor="black", capsize=6, linewidth=1.2)
        if repeated:
            values = [v for v in (score(r, table.metric, table.use) for r in c.runs) if v is not None]
            ax.plot([x] * len(values), values, "o", color="black", markersize=3)
            if partial:
                ax.text(x, top * 0.02, f"{len(c.not_completed)} failed" if all(r.status == "failed" for r in c.not_completed) else f"{len(c.not_completed)} not completed", ha="center", va="bottom", color="tab:red", fontsize=8, fontweight="bold")
        ax.text(x + (0.32 if repeated else 0), s.mean, f"{s.mean:.3f}", ha="left" if repeated else "center", va="bottom", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel(table.column)
    if repeated:
        title = f"{table.column}: mean over {table.repeat_key}s\nerror bars: 95% t-interval; dots: each {table.repeat_key}"
    else:
        title = f"{table.column} per job" + ("  (orange: not completed)" if any(c.not_completed and c.summary.mean is not None for c in configs) else "")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlabel(axis_label(table), fontsize=8)

    if table.recall:
        ax = axes[1][0]
        w = 0.8 / len(table.recall)
        for i, key in enumerate(table.recall):
            offs = [x - 0.4 + w * (i + 0.5) for x in xs]
            ax.bar(offs, [c.recall.get(key) or 0.0 for c in configs], width=w, label=key)
        for x, c in zip(xs, configs):
            if all(c.recall.get(k) is None for k in table.recall):
                no_value(ax, x, c, 0.95)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("proposal recall")
        ax.set_title(f"proposal recall at the {table.use} validation" + (" (mean)" if repeated else ""), fontsize=10)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel(axis_label(table), fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the entry point


def report(
    sweep: str | os.PathLike, out: str | os.PathLike | None = None, metric: str = "val/map", use: str = "final", repeat_key: str | None = "seed"
) -> tuple[str, Table]:
    """Write ``report.md``, ``report.csv`` (one row per job), ``report_configs.csv`` (with
    repeats: one row per configuration) and ``report.png`` into ``out`` (default: the sweep
    folder); returns (the Markdown report, the table)."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise SweepError(f"{sweep} is not a folder")
    runs = find_runs(sweep)
    if not runs:
        raise SweepError(
            f"no job folders in {sweep}: a Hydra multirun folder holds one numbered folder per job "
            f"(0/, 1/, ...) with a metrics.json or .hydra/overrides.yaml; is this the sweep folder "
            f"(hydra.sweep.dir, e.g. outputs/multirun/<date>/<time>)?"
        )
    table = build_table(runs, metric, declared_sweep_keys(sweep, runs), use, repeat_key or None)
    out = Path(out) if out is not None else sweep
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_report(table, sweep)
    (out / "report.md").write_text(text)
    write_csv(table, out / "report.csv")
    if table.repeat_key:
        write_configs_csv(table, out / "report_configs.csv")
    write_png(table, out / "report.png")
    return text, table
