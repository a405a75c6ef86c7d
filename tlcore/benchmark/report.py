"""Benchmark results as a table, a JSON file with provenance, and a bar chart of speedups."""
import json
from dataclasses import asdict

from tlcore.benchmark.suites import Result


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    """A plain-text table, one row per variant."""
    header = ["mode", "model", "batch", "variant", "median ms", "graph ms", "img/s", "speedup", "rate", "% peak",
              "rel err", "status"]
    rows = [[r.mode, r.model, str(r.batch) if r.mode != "optim" else "-", r.variant, _fmt(r.median_ms, ".3f"),
             _fmt(r.graph_ms, ".3f"), _fmt(r.images_per_s, ".1f"), _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
             (_fmt(r.rate, ".2f") + " " + r.rate_unit) if r.rate is not None else "-",
             _fmt(None if r.peak_share is None else 100 * r.peak_share, ".0f"), _fmt(r.rel_error, ".1e"), r.status]
            for r in results]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def write_json(path: str, provenance: dict, results: list[Result]) -> None:
    def finite(value):  # NaN (a variant that produced NaN) is not valid JSON
        return None if isinstance(value, float) and value != value else value

    rows = [{key: finite(value) for key, value in asdict(r).items()} for r in results]
    with open(path, "w") as f:
        json.dump({"provenance": provenance, "results": rows}, f, indent=2)


def plot(path: str, provenance: dict, results: list[Result]) -> None:
    """Bar chart of speedup per variant, one panel per mode, stock PyTorch as the 1.0 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r.mode == mode and r.speedup is not None]
        ax.barh([r.variant for r in rows], [r.speedup for r in rows],
                color=["tab:orange" if r.variant.startswith("tlcore") else "tab:gray" for r in rows])
        ax.axvline(1.0, color="black", linewidth=1)
        batch = f", batch {rows[0].batch}" if rows and mode != "optim" else ""  # (optim steps have no batch)
        ax.set_title(f"{mode}: {rows[0].model}{batch}" if rows else mode)
        ax.set_xlabel("speedup over stock (higher is better)")
        ax.invert_yaxis()
    where = provenance["device"] if provenance["device"] != "cpu" else provenance["cpu"]
    fig.suptitle(f"tlcore vs PyTorch on {where}\n{provenance['date'][:10]}, torch {provenance['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # (a long title stays whole)
    plt.close(fig)
