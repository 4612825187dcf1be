"""Summarise a Hydra multirun (one folder per job) as a table and a bar chart.

    python scripts/sweep_report.py outputs/multirun/2025-01-01/12-00-00-000000
    python scripts/sweep_report.py <sweep folder> --out reports/ --metric val/map

Reads every job folder ``<sweep>/<job number>/``: its ``metrics.json`` (status, error, best and
final metrics, steps, training time, overrides) or, where a job was killed before writing one,
its ``.hydra/overrides.yaml``. The override keys whose value differs between jobs are the swept
parameters (one column each); those every job shares with the same value are listed once above
the table. Writes into ``--out`` (default: the sweep folder):

* ``report.md``: the Markdown table (also printed to stdout);
* ``report.csv``: the same columns;
* ``report.png``: the best metric per job (failed jobs as hatched bars labelled FAILED) and,
  when the metrics hold ``val/recall*`` keys, a second panel with them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECALL_PREFIX = "val/recall"
ERROR_WIDTH = 80
MISSING = "missing"  # status of a job folder without a (readable) metrics.json


class SweepError(Exception):
    """The folder is not a sweep this script can read."""


@dataclass
class Job:
    num: int
    path: Path
    status: str
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    train_time_s: float | None = None


# --------------------------------------------------------------------------- reading


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["anchor=k9", "+x=1", "~y"]`` -> ``{"anchor": "k9", "x": "1", "~y": ""}`` (order kept)."""
    out: dict[str, str] = {}
    for item in items or []:
        item = str(item)
        key, sep, value = item.partition("=")
        if key.startswith("~"):  # a deletion: keep the marker, it is part of what the job did
            out[item if not sep else key] = value
            continue
        out[key.lstrip("+")] = value
    return out


def _read_overrides_yaml(path: Path) -> list[str]:
    import yaml  # PyYAML comes with omegaconf

    data = yaml.safe_load(path.read_text()) or []
    return [str(x) for x in data] if isinstance(data, list) else []


def read_job(num: int, path: Path) -> Job:
    metrics_path = path / "metrics.json"
    hydra_overrides = path / ".hydra" / "overrides.yaml"
    data: dict[str, Any] | None = None
    error = None
    if metrics_path.is_file():
        try:
            data = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as err:
            error = f"unreadable metrics.json: {err}"
    if data is None:
        overrides = _read_overrides_yaml(hydra_overrides) if hydra_overrides.is_file() else []
        return Job(num, path, MISSING, error=error or "no metrics.json (killed before training started?)", overrides=parse_overrides(overrides))
    overrides = data.get("overrides")
    if overrides is None and hydra_overrides.is_file():
        overrides = _read_overrides_yaml(hydra_overrides)
    return Job(
        num,
        path,
        status=str(data.get("status") or "unknown"),
        error=data.get("error"),
        overrides=parse_overrides(overrides or []),
        best=data.get("best") or {},
        final=data.get("final") or {},
        steps=data.get("steps"),
        epochs=data.get("epochs"),
        train_time_s=data.get("train_time_s"),
    )


def find_jobs(sweep: Path) -> list[Job]:
    """The job folders (named by their job number), sorted numerically."""
    if not sweep.is_dir():
        raise SweepError(f"{sweep} is not a folder")
    dirs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]
    dirs = [p for p in dirs if (p / "metrics.json").is_file() or (p / ".hydra").is_dir()]
    if not dirs:
        raise SweepError(
            f"no job folders in {sweep}: a Hydra multirun folder holds one numbered folder per job "
            f"(0/, 1/, ...) with a metrics.json or .hydra/overrides.yaml; is this the sweep folder "
            f"(hydra.sweep.dir, e.g. outputs/multirun/<date>/<time>)?"
        )
    return [read_job(int(p.name), p) for p in sorted(dirs, key=lambda p: int(p.name))]


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def declared_sweep_keys(sweep: Path, jobs: list[Job]) -> set[str]:
    """The keys the sweep was asked to vary, whatever values the jobs happened to get: sweep
    overrides on the command line (``anchor=k9,k15``, ``x=range(1,4)``, in ``multirun.yaml``) and
    the sweeper's ``params`` / ``search_space`` (Optuna; also in each job's ``.hydra/hydra.yaml``)."""
    sources = [sweep / "multirun.yaml"] + [job.path / ".hydra" / "hydra.yaml" for job in jobs[:1]]
    keys: set[str] = set()
    for source in sources:
        data = _load_yaml(source) if source.is_file() else None
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


def split_overrides(jobs: list[Job], declared: set[str] | frozenset = frozenset()) -> tuple[dict[str, str], list[str]]:
    """(fixed overrides: the same value in every job, swept keys in order of appearance).

    A key is swept when its value differs between jobs or the sweep declared it (``declared``)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    fixed, swept = {}, []
    for key in keys:
        values = {job.overrides.get(key) for job in jobs}
        if len(values) == 1 and None not in values and key not in declared:
            fixed[key] = values.pop()
        else:
            swept.append(key)
    return fixed, swept


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def recall_keys(jobs: list[Job]) -> list[str]:
    keys = {k for job in jobs for part in (job.best, job.final) for k in part if k.startswith(RECALL_PREFIX)}
    return sorted(keys, key=_natural)


# --------------------------------------------------------------------------- the table


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def short_error(error: str | None, width: int = ERROR_WIDTH) -> str:
    if not error:
        return ""
    text = " ".join(str(error).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def is_failed(job: Job) -> bool:
    return job.status == "failed"


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]  # raw values (floats, ints, strings, None)
    fixed: dict[str, str]
    swept: list[str]
    recall: list[str]
    metric: str


def build_table(jobs: list[Job], metric: str = "val/map", declared: set[str] | frozenset = frozenset()) -> Table:
    fixed, swept = split_overrides(jobs, declared)
    recall = recall_keys(jobs)
    best_col, final_col = f"best {metric}", f"final {metric}"
    columns = ["job", *swept, "status", best_col, final_col, *(f"best {k}" for k in recall), "steps", "train time (s)", "error"]
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.num}
        for key in swept:
            row[key] = job.overrides.get(key)
        row["status"] = job.status
        row[best_col] = _number(job.best.get(metric))
        row[final_col] = _number(job.final.get(metric))
        for key in recall:
            row[f"best {key}"] = _number(job.best.get(key, job.final.get(key)))
        row["steps"] = job.steps
        row["train time (s)"] = _number(job.train_time_s)
        row["error"] = job.error or ""
        rows.append(row)
    if not any(row["error"] for row in rows):
        columns.remove("error")
    return Table(columns, rows, fixed, swept, recall, metric)


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


def markdown_report(table: Table, sweep: Path) -> str:
    counts: dict[str, int] = {}
    for row in table.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    best_col = f"best {table.metric}"
    scored = [r for r in table.rows if r[best_col] is not None]
    lines = [f"# Sweep report: {sweep}", ""]
    lines.append(f"{len(table.rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    if scored:
        top = max(scored, key=lambda r: r[best_col])
        what = ", ".join(f"{k}={top[k]}" for k in table.swept if top[k] is not None)
        lines.append(f"Best {table.metric}: {top[best_col]:.4f} (job {top['job']}{': ' + what if what else ''}).")
    optuna = _load_yaml(sweep / "optimization_results.yaml") if (sweep / "optimization_results.yaml").is_file() else None
    if isinstance(optuna, dict) and "best_params" in optuna:
        params = ", ".join(f"{k}={v}" for k, v in (optuna.get("best_params") or {}).items())
        lines.append(f"Optuna's best trial (optimization_results.yaml): {optuna.get('best_value')} with {params}.")
    lines.append("")
    if table.fixed:
        lines.append("Fixed overrides (the same in every job): " + " ".join(f"`{k}={v}`" for k, v in table.fixed.items()))
    else:
        lines.append("Fixed overrides: none.")
    lines.append("Swept: " + (", ".join(f"`{k}`" for k in table.swept) if table.swept else "nothing (every job has the same overrides)."))
    lines += ["", markdown_table(table), ""]
    return "\n".join(lines)


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow(["" if row[c] is None else row[c] for c in table.columns])


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


def job_label(row: dict[str, Any], swept: list[str]) -> str:
    """``#job`` over the job's swept values (``key=value`` when only one key is swept)."""
    if len(swept) == 1:
        parts = [f"{short_keys(swept)[swept[0]]}={row[swept[0]]}"]
    else:
        parts = ["–" if row.get(k) is None else str(row[k]) for k in swept]
    return "\n".join([f"#{row['job']}", *parts])


def axis_label(swept: list[str]) -> str:
    if len(swept) < 2:
        return "job"
    names = short_keys(swept)
    return "job, then " + " / ".join(names[k] for k in swept)


def write_png(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, best_col = table.rows, f"best {table.metric}"
    panels = 2 if table.recall else 1
    labels = [job_label(r, table.swept) for r in rows]
    longest = max(len(line) for label in labels for line in label.splitlines())
    per_job = max(1.0, 0.075 * longest + 0.2)
    lines = max(label.count("\n") + 1 for label in labels)
    width = min(60.0, max(6.0, per_job * len(rows) + 1.5))
    fig, axes = plt.subplots(panels, 1, figsize=(width, (3.6 + 0.17 * lines) * panels + 0.4), squeeze=False)
    xs = list(range(len(rows)))

    def no_value(ax, x, row, top):
        failed = row["status"] == "failed"
        ax.bar(x, top, width=0.6, fill=False, hatch="//", edgecolor="tab:red" if failed else "0.6", linewidth=1)
        text = "FAILED" if failed else (row["status"] or "no data").upper()
        ax.text(x, top / 2, text, rotation=90, ha="center", va="center", color="tab:red" if failed else "0.4", fontweight="bold", bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})

    ax = axes[0][0]
    values = [r[best_col] for r in rows]
    top = max([v for v in values if v is not None] + [0.0]) or 1.0
    top = min(1.0, top * 1.15) if top <= 1.0 else top * 1.15
    for x, row, v in zip(xs, rows, values):
        if v is None or row["status"] == "failed":
            no_value(ax, x, row, top * 0.95)
            continue
        color = "tab:blue" if row["status"] == "completed" else "tab:orange"
        ax.bar(x, v, width=0.6, color=color)
        ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel(best_col)
    ax.set_title(f"best {table.metric} per job" + ("  (orange: not completed)" if any(r["status"] not in ("completed", "failed") for r in rows) else ""))
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlabel(axis_label(table.swept), fontsize=8)

    if table.recall:
        ax = axes[1][0]
        n = len(table.recall)
        w = 0.8 / n
        top = 1.0
        for i, key in enumerate(table.recall):
            col = f"best {key}"
            offs = [x - 0.4 + w * (i + 0.5) for x in xs]
            vals = [r[col] if r[col] is not None and r["status"] != "failed" else 0.0 for r in rows]
            ax.bar(offs, vals, width=w, label=key)
        for x, row in zip(xs, rows):
            if row["status"] == "failed" or all(row[f"best {k}"] is None for k in table.recall):
                no_value(ax, x, row, top * 0.95)
        ax.set_ylim(0, top)
        ax.set_ylabel("proposal recall")
        ax.set_title("proposal recall at the best validation")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel(axis_label(table.swept), fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def report(sweep: str | os.PathLike, out: str | os.PathLike | None = None, metric: str = "val/map") -> tuple[str, Table]:
    """Write report.md, report.csv and report.png; returns (the Markdown report, the table)."""
    sweep = Path(sweep)
    jobs = find_jobs(sweep)
    table = build_table(jobs, metric, declared_sweep_keys(sweep, jobs))
    out = Path(out) if out is not None else sweep
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_report(table, sweep)
    (out / "report.md").write_text(text)
    write_csv(table, out / "report.csv")
    write_png(table, out / "report.png")
    return text, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the multirun folder (hydra.sweep.dir), holding 0/, 1/, ...")
    parser.add_argument("--out", default=None, help="where report.md, report.csv and report.png go (default: the sweep folder)")
    parser.add_argument("--metric", default="val/map", help="the metric of the best/final columns and the plot (default: val/map)")
    args = parser.parse_args(argv)
    try:
        text, _ = report(args.sweep, args.out, args.metric)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    out = args.out or args.sweep
    print(f"wrote {os.path.join(out, 'report.md')}, report.csv and report.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
