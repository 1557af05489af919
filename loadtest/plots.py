"""PNG plots and a Markdown summary of one locust run (see loadtest/run_locust.py).

Inputs, in the results folder: `locust_stats_history.csv` (locust's per-second
history with `--csv-full-history`: for each entry the percentiles of roughly
the last 10 seconds), `locust_stats.csv` (totals) and `throughput.csv` (written
by the locustfile: users, requests/s and output tokens/s each second).

Outputs: `summary.png` (TTFT, ITL and tokens/s over time, the user count
shaded behind) and `vs_users.png` (the same against the user count, the mean
of the samples taken at each count; locust's percentiles cover the last ~10 s,
so they trail a fast ramp a little).

    python -m loadtest.plots loadtest/results/<run>
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

PERCENTILES = ("50%", "95%", "99%")
COLORS = {"50%": "tab:blue", "95%": "tab:orange", "99%": "tab:red"}


@dataclass
class Series:
    """Per-second samples of one locust entry (or of the throughput file)."""

    t: list[float] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, t: float, users: int, row: dict[str, float]) -> None:
        self.t.append(t)
        self.users.append(users)
        for key, value in row.items():
            self.values.setdefault(key, []).append(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_history(path: Path, start: float | None = None) -> dict[str, Series]:
    """Entry type (`TTFT`, `ITL`, `SSE`...) -> percentiles in ms per second, from `start`
    (Unix time; default the first row)."""
    out: dict[str, Series] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            kind = row["Type"]
            if not kind or row["Name"] == "Aggregated":
                continue
            t = float(row["Timestamp"])
            start = t if start is None else start
            values = {p: _number(row[p]) for p in PERCENTILES}
            if any(not v for v in values.values()):
                continue  # N/A or 0: nothing recorded in the window yet
            key = kind if kind != "SSE" else f"SSE {row['Name']}"
            series = out.setdefault(key, Series())
            series.add(t - start, int(row["User Count"]), {k: v or 0.0 for k, v in values.items()})
    return out


def read_throughput(path: Path) -> Series:
    series = Series()
    if not path.exists():
        return series
    start: float | None = None
    with path.open() as f:
        for row in csv.DictReader(f):
            t = float(row["timestamp"])
            start = t if start is None else start
            series.add(
                t - start,
                int(row["users"]),
                {
                    "tokens/s": float(row["tokens_per_s"]),
                    "requests/s": float(row["requests_per_s"]),
                },
            )
    return series


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` samples (tokens finish in bursts at the end of requests)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def ramp_only(series: Series) -> Series:
    """The samples up to the first drop in user count (users stopping at the end of the run)."""
    top, end = 0, len(series.users)
    for i, users in enumerate(series.users):
        if users < top:
            end = i
            break
        top = users
    return Series(
        series.t[:end], series.users[:end], {k: v[:end] for k, v in series.values.items()}
    )


def by_users(users: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """Mean of the samples taken at each user count, in user order."""
    groups: dict[int, list[float]] = {}
    for u, v in zip(users, values, strict=True):
        groups.setdefault(u, []).append(v)
    xs = sorted(groups)
    return xs, [sum(groups[u]) / len(groups[u]) for u in xs]


def _users_behind(ax: Axes, series: Series) -> None:
    twin = ax.twinx()
    twin.fill_between(series.t, series.users, color="0.85", step="post", zorder=0)
    twin.set_ylabel("users", color="0.45")
    twin.set_ylim(bottom=0)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)


def _percentile_lines(ax: Axes, series: Series, label: str, against_users: bool = False) -> None:
    for p in PERCENTILES:
        if against_users:
            x, y = by_users(series.users, series.values[p])
            ax.plot(x, y, label=f"{label} p{p[:-1]}", color=COLORS[p], lw=1.2, marker=".", ms=4)
        else:
            ax.plot(series.t, series.values[p], label=f"{label} p{p[:-1]}", color=COLORS[p], lw=1.4)
    ax.set_ylabel(f"{label} (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def _throughput_line(ax: Axes, x: list[float] | list[int], tokens: list[float]) -> None:
    ax.plot(x, tokens, color="tab:green", lw=1.4, label="output tokens/s (5 s mean)")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def draw(folder: Path, title: str = "") -> str:
    """Write summary.png and vs_users.png into `folder`; return a Markdown summary."""
    history = read_history(folder / "locust_stats_history.csv")
    throughput = ramp_only(read_throughput(folder / "throughput.csv"))
    ttft, itl = history.get("TTFT"), history.get("ITL")
    if ttft is None or itl is None:
        return f"no TTFT/ITL samples in {folder} (did any request succeed?)\n"
    ttft, itl = ramp_only(ttft), ramp_only(itl)
    tokens = smooth(throughput.values.get("tokens/s", []))

    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True, dpi=90)
    for ax, series, label in ((axes[0], ttft, "TTFT"), (axes[1], itl, "ITL")):
        _percentile_lines(ax, series, label)
        _users_behind(ax, series)
    if throughput.t:
        _throughput_line(axes[2], throughput.t, tokens)
        _users_behind(axes[2], throughput)
    axes[2].set_xlabel("seconds since start (grey: users)")
    fig.suptitle(title or "locust run", fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / "summary.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=90)
    _percentile_lines(axes[0], ttft, "TTFT", against_users=True)
    _percentile_lines(axes[1], itl, "ITL", against_users=True)
    if throughput.t:
        _throughput_line(axes[2], *by_users(throughput.users, tokens))
    for ax in axes:
        ax.set_xlabel("users")
    fig.suptitle(title or "locust run", fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / "vs_users.png")
    plt.close(fig)
    return summary(folder, title, throughput, tokens)


def summary(folder: Path, title: str, throughput: Series, tokens: list[float]) -> str:
    lines = [
        f"# Load test: {title}",
        "",
        "| entry | requests | failures | p50 ms | p95 ms | p99 ms |",
    ]
    lines.append("|---|---|---|---|---|---|")
    stats_path = folder / "locust_stats.csv"
    if stats_path.exists():
        with stats_path.open() as f:
            for row in csv.DictReader(f):
                name = f"{row['Type']} {row['Name']}".strip()
                lines.append(
                    f"| {name} | {row['Request Count']} | {row['Failure Count']} | "
                    f"{row['50%']} | {row['95%']} | {row['99%']} |"
                )
    if tokens:
        peak_users = max(throughput.users)
        at_peak = [v for v, u in zip(tokens, throughput.users, strict=True) if u == peak_users]
        lines += [
            "",
            f"Output tokens/s: peak 5 s mean {max(tokens):.0f}; "
            f"mean {sum(at_peak) / max(len(at_peak), 1):.0f} while at {peak_users} users.",
        ]
    lines += ["", "Plots: summary.png, vs_users.png; locust report: report.html.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    sys.stdout.write(draw(target, sys.argv[2] if len(sys.argv) > 2 else target.name))
