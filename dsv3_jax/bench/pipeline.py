"""`dsv3-bench pipeline`: draw one schedule like the DeepSeek-V3 paper's Figure 5 and compare all schedules.

Prints one JSON line per schedule: bubble from the table and from the DualPipe README's formula (at chunk
times F=1, B=2, W=1, F&B=F+B), bubble share of the step, parameter / activation multiples per device, and
the depth of the executor's received-activation and gradient pools (`pipeline_exec.step_table`).
"""

from __future__ import annotations

from dsv3_jax.bench.timing import Reporter
from dsv3_jax.parallel import pipeline, pipeline_exec

COSTS = pipeline.Costs(F=1.0, B=2.0, W=1.0)
COLORS = {"F": "#f4b183", "B": "#9dc3e6", "W": "#a9d18e", "BW": "#5b9bd5", "FB": "#c9a0dc"}


def draw(schedule: pipeline.Schedule, path: str, costs: pipeline.Costs = COSTS) -> None:
    """One row per device, one box per slot at its simulated time; label = micro-batch (direction 1 in bold)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    times = pipeline.simulate(schedule, costs)
    end = max(e for dev in times for _, e in dev)
    fig, ax = plt.subplots(figsize=(max(8.0, end * 0.22), 0.45 * schedule.pp + 1.2))
    for d, slots in enumerate(schedule.slots):
        for slot, (start, stop) in zip(slots, times[d], strict=True):
            kind = "FB" if len(slot) == 2 else slot[0].kind
            ax.barh(d, stop - start, left=start, color=COLORS[kind], edgecolor="black", linewidth=0.4)
            label = "/".join(str(op.mb) for op in slot)
            bold = any(schedule.direction(op.mb) for op in slot)
            ax.text((start + stop) / 2, d, label, ha="center", va="center", fontsize=6,
                    fontweight="bold" if bold else "normal")
    ax.set_yticks(range(schedule.pp), [f"device {d}" for d in range(schedule.pp)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time (F={costs.F:g}, B={costs.B:g}, W={costs.W:g})")
    names = {"F": "forward", "B": "backward for input", "W": "backward for weights", "BW": "full backward",
             "FB": "overlapped forward & backward"}
    ax.legend(handles=[Patch(color=COLORS[k], label=v) for k, v in names.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=7, frameon=False)
    ax.set_title(f"{schedule.name}: {schedule.pp} devices, {schedule.n_mb} micro-batches "
                 f"(bold: reverse direction)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def compare(pp: int, n_mb: int, costs: pipeline.Costs = COSTS) -> list[dict]:
    """One record per schedule: bubble (table, formula, share of the step), params and activations per device."""
    rows = []
    for name in pipeline.SCHEDULES:
        schedule = pipeline.build(name, pp, n_mb)
        bubble = pipeline.bubble(schedule, costs)
        table = pipeline_exec.step_table(schedule)
        work = n_mb * (costs.F + costs.B)
        rows.append({"schedule": name, "pp": pp, "n_mb": n_mb,
                     "costs": dict(costs._asdict()), "bubble": bubble,
                     "bubble_formula": pipeline.bubble_formula(name, pp, costs),
                     "bubble_share": round(bubble / (bubble + work), 4),
                     "params_per_device": f"{pipeline.PARAMS_PER_DEVICE[name]}x",
                     "activations_per_device": pipeline.peak_activations(schedule),
                     "executor_act_slots": table.act_slots, "executor_grad_slots": table.grad_slots,
                     "lockstep_steps": table.rows.shape[0]})
    return rows


def run(schedule: str = "dualpipe", pp: int = 8, n_mb: int | None = None, png: str | None = None,
        out: str | None = None) -> list[dict]:
    """Draw `schedule` to `png` (default pipeline_<schedule>_pp<pp>.png) and print the comparison lines."""
    n_mb = n_mb or 2 * pp + 4
    draw(pipeline.build(schedule, pp, n_mb), png or f"pipeline_{schedule}_pp{pp}.png")
    rows = compare(pp, n_mb)
    reporter = Reporter("pipeline", out, with_device=False)
    for row in rows:
        reporter.emit(**row)
    return rows
