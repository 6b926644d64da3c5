"""Pipeline schedules as data: GPipe, 1F1B, ZB1P and DualPipe, a validator, and bubble / memory accounting.

A schedule lists, for every device, its time slots in order; a slot holds the ops the device runs
together: one op, or DualPipe's overlapped pair (a forward of one chunk with a full backward of the
other). Ops name a micro-batch and a pipeline *stage* (the model is cut into `pp` stages):

    F   forward of the stage
    B   backward for the stage input only (zero-bubble split; its W comes later)
    W   backward for the stage weights (needs the B before it)
    BW  full backward (input and weights at once)

Single-direction schedules put stage s on device s. DualPipe (deepseek-ai/DualPipe `dualpipe.py`) is
bidirectional: the first half of the micro-batches enters at device 0 and runs stage s on device s, the
second half enters at device pp-1 and runs stage s on device pp-1-s, so every device holds two stages
(s and pp-1-s: parameters 2x) and feeds both directions.

Timing comes from `simulate`: every slot starts once its device is free and the ops it depends on have
finished (communication is free). With unit slot times that is the executor's lock-step time grid.
Bubble = makespan - the device's busy time, as in the DualPipe README's table (F forward chunk, B full
backward chunk, W weight-backward chunk, F&B one overlapped forward+backward pair).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe")


class ScheduleError(ValueError):
    """A schedule table that breaks a pipeline rule (missing op, order violating a dependency, bad send)."""


class Op(NamedTuple):
    kind: str    # "F" | "B" | "W" | "BW"
    mb: int
    stage: int


Slot = tuple[Op, ...]


class Costs(NamedTuple):
    """Chunk times: F forward, B full backward, W its weight part, FB an overlapped forward + full backward pair."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None     # None: no overlap, F + B

    def slot_time(self, slot: Slot) -> float:
        if len(slot) == 2:
            return self.F + self.B if self.FB is None else self.FB
        return {"F": self.F, "BW": self.B, "B": self.B - self.W, "W": self.W}[slot[0].kind]


class Transfer(NamedTuple):
    """A tensor sent at the end of lock-step `step` from device src to dst: "act" (F output) or "grad" (B output)."""

    step: int
    src: int
    dst: int
    what: str
    mb: int
    stage: int    # the stage that produced it


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    pp: int
    n_mb: int
    bidirectional: bool
    slots: tuple[tuple[Slot, ...], ...]      # [device][k]: the device's k-th slot

    @property
    def n_chunks(self) -> int:
        """Stages held per device: 2 for bidirectional schedules."""
        return 2 if self.bidirectional else 1

    def direction(self, mb: int) -> int:
        """0: enters at device 0; 1: enters at device pp-1 (DualPipe's second half of the micro-batches)."""
        return int(self.bidirectional and mb >= self.n_mb // 2)

    def device_of(self, mb: int, stage: int) -> int:
        return self.pp - 1 - stage if self.direction(mb) else stage

    def chunk_of(self, stage: int) -> int:
        """Which of its device's parameter chunks holds `stage` (device d holds stages d and pp-1-d)."""
        return int(self.bidirectional and stage >= self.pp // 2)

    def stages_of(self, device: int) -> tuple[int, ...]:
        """The stages device `device` holds, indexed by chunk."""
        if not self.bidirectional:
            return (device,)
        return (min(device, self.pp - 1 - device), max(device, self.pp - 1 - device))


def gpipe(pp: int, n_mb: int) -> Schedule:
    """All forwards, then all full backwards (GPipe)."""
    slots = tuple(tuple((Op("F", m, d),) for m in range(n_mb)) + tuple((Op("BW", m, d),) for m in range(n_mb))
                  for d in range(pp))
    return Schedule("gpipe", pp, n_mb, False, slots)


def one_f_one_b(pp: int, n_mb: int) -> Schedule:
    """1F1B: pp-1-d warm-up forwards on device d, then alternate forward / full backward, then drain."""
    devices = []
    for d in range(pp):
        warm = min(pp - 1 - d, n_mb)
        ops = [Op("F", m, d) for m in range(warm)]
        for i in range(n_mb - warm):
            ops += [Op("F", warm + i, d), Op("BW", i, d)]
        ops += [Op("BW", m, d) for m in range(n_mb - warm, n_mb)]
        devices.append(tuple((op,) for op in ops))
    return Schedule("1f1b", pp, n_mb, False, tuple(devices))


def zb1p(pp: int, n_mb: int) -> Schedule:
    """ZB-H1 (Qi et al., zero-bubble pipeline): 1F1B with the backward split into B and W.

    Built by list scheduling at unit F, B, W times. A free device runs its ready B first; else its next F
    while it holds fewer than pp-d micro-batches before their B (1F1B's bound) and fewer than 2pp-1-d before
    their W; else its oldest pending W. W's wait in the steady state and fill the drain.
    """
    done: dict[tuple[str, int, int], int] = {}            # op -> finish time
    count = {kind: [0] * pp for kind in "FBW"}              # ops started per device
    devices: list[list[Slot]] = [[] for _ in range(pp)]
    t = 0
    while any(len(ops) < 3 * n_mb for ops in devices):
        started = []
        for d in range(pp):
            ready = lambda key: key in done and done[key] <= t  # noqa: B023
            f, b, w = count["F"][d], count["B"][d], count["W"][d]
            if b < f and ready(("F", b, d)) and (d == pp - 1 or ready(("B", b, d + 1))):
                op = Op("B", b, d)
            elif f < n_mb and f - b < pp - d and f - w < 2 * pp - 1 - d and (d == 0 or ready(("F", f, d - 1))):
                op = Op("F", f, d)
            elif w < b:
                op = Op("W", w, d)
            else:
                continue
            count[op.kind][d] += 1
            devices[d].append((op,))
            started.append(op)
        for op in started:
            done[(op.kind, op.mb, op.stage)] = t + 1
        t += 1
    return Schedule("zb1p", pp, n_mb, False, tuple(tuple(ops) for ops in devices))


def dualpipe(pp: int, n_mb: int) -> Schedule:
    """DualPipe, transcribed from deepseek-ai/DualPipe `DualPipe.step` (its steps 1-8).

    Needs even pp and an even number of micro-batches n_mb >= 2 pp. A "phase" is the device's chunk in
    the order dualpipe.py uses: phase 0 is the direction entering on the device's own side.
    """
    if pp % 2 or n_mb % 2 or n_mb < 2 * pp:
        raise ScheduleError(f"dualpipe needs even pp and even n_mb >= 2 pp, got pp={pp}, n_mb={n_mb}")
    half = n_mb // 2
    devices = []
    for rank in range(pp):
        second = rank >= pp // 2
        half_rank = min(rank, pp - 1 - rank)
        middle = rank in (pp // 2 - 1, pp // 2)
        count_f, count_b = [0, 0], [0, 0]
        weights: deque[Op] = deque()
        slots: list[Slot] = []

        def op(kind: str, phase: int, counts: list[int]) -> Op:
            direction = phase ^ second  # noqa: B023
            k = counts[direction]
            counts[direction] += 1
            stage = rank if direction == 0 else pp - 1 - rank  # noqa: B023
            return Op(kind, k + direction * half, stage)

        def forward(phase: int) -> None:
            slots.append((op("F", phase, count_f),))  # noqa: B023

        def backward(phase: int, zero_bubble: bool = False) -> None:
            b = op("B" if zero_bubble else "BW", phase, count_b)  # noqa: B023
            slots.append((b,))  # noqa: B023
            if zero_bubble:
                weights.append(Op("W", b.mb, b.stage))  # noqa: B023

        def forward_backward(phase0: int, phase1: int) -> None:
            slots.append((op("F", phase0, count_f), op("BW", phase1, count_b)))  # noqa: B023

        def weight() -> None:
            slots.append((weights.popleft(),))  # noqa: B023

        for _ in range((pp // 2 - half_rank - 1) * 2):                   # step 1: nF0
            forward(0)
        for _ in range(half_rank + 1):                                  # step 2: nF0F1
            forward(0)
            forward(1)
        for _ in range(pp // 2 - half_rank - 1):                        # step 3: nB1W1F1
            backward(1, zero_bubble=True)
            weight()
            forward(1)
        for i in range(half - pp + half_rank + 1):                      # step 4: nF0B1F1B0
            if i == 0 and middle:                                       # not overlapped, to cut the bubble
                forward(0)
                backward(1)
            else:
                forward_backward(0, 1)
            forward_backward(1, 0)
        for _ in range(pp // 2 - half_rank - 1):                        # step 5: nB1F1B0
            backward(1)
            forward_backward(1, 0)
        zero_bubble = False
        for i in range(half_rank + 1):                                  # step 6: nB1B0
            if i == (half_rank + 1) // 2 and half_rank % 2 == 1:
                zero_bubble = True
            backward(1, zero_bubble)
            if i == (half_rank + 1) // 2 and half_rank % 2 == 0:
                zero_bubble = True
            backward(0, zero_bubble)
        for _ in range(pp // 2 - half_rank - 1):                        # step 7: nWB0
            weight()
            backward(0, zero_bubble=True)
        for _ in range(half_rank + 1):                                  # step 8: nW
            weight()
        devices.append(tuple(slots))
    return Schedule("dualpipe", pp, n_mb, True, tuple(devices))


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe}


def build(name: str, pp: int, n_mb: int) -> Schedule:
    """The schedule `name` (one of SCHEDULES) for pp stages and n_mb micro-batches, validated."""
    if name not in BUILDERS:
        raise ScheduleError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    schedule = BUILDERS[name](pp, n_mb)
    validate(schedule)
    return schedule


def _dependencies(op: Op, pp: int) -> list[tuple[str, ...]]:
    """Ops (as kind alternatives, mb, stage) that must finish before `op` starts."""
    if op.kind == "F":
        return [(("F",), op.mb, op.stage - 1)] if op.stage else []
    if op.kind == "W":
        return [(("B",), op.mb, op.stage)]
    deps = [(("F",), op.mb, op.stage)]
    if op.stage < pp - 1:
        deps.append((("B", "BW"), op.mb, op.stage + 1))
    return deps


def simulate(schedule: Schedule, costs: Costs | None = None) -> list[list[tuple[float, float]]]:
    """(start, end) of every slot, [device][k]. costs None: unit slots (the executor's lock-step grid).

    Raises ScheduleError when the per-device orders deadlock (a dependency that can never be met).
    """
    duration = (lambda slot: 1.0) if costs is None else costs.slot_time
    finish: dict[tuple[str, int, int], float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in range(schedule.pp)]
    free = [0.0] * schedule.pp
    while True:
        progressed = False
        for d, slots in enumerate(schedule.slots):
            while len(times[d]) < len(slots):
                slot = slots[len(times[d])]
                ready = free[d]
                for op in slot:
                    for kinds, mb, stage in _dependencies(op, schedule.pp):
                        ends = [finish[(k, mb, stage)] for k in kinds if (k, mb, stage) in finish]
                        if not ends:
                            break
                        ready = max(ready, ends[0])
                    else:
                        continue
                    break
                else:
                    end = ready + duration(slot)
                    times[d].append((ready, end))
                    free[d] = end
                    for op in slot:
                        finish[(op.kind, op.mb, op.stage)] = end
                    progressed = True
                    continue
                break
        if all(len(t) == len(s) for t, s in zip(times, schedule.slots, strict=True)):
            return times
        if not progressed:
            stuck = {d: slots[len(times[d])] for d, slots in enumerate(schedule.slots) if len(times[d]) < len(slots)}
            raise ScheduleError(f"{schedule.name}: deadlock, devices wait forever at {stuck}")


def transfers(schedule: Schedule) -> list[Transfer]:
    """Every neighbour send on the lock-step grid: F outputs to the next stage, B / BW input grads to the previous."""
    grid = simulate(schedule)
    sent = []
    for d, slots in enumerate(schedule.slots):
        for slot, (start, _) in zip(slots, grid[d], strict=True):
            for op in slot:
                if op.kind == "F" and op.stage < schedule.pp - 1:
                    dst = schedule.device_of(op.mb, op.stage + 1)
                    sent.append(Transfer(int(start), d, dst, "act", op.mb, op.stage))
                elif op.kind in ("B", "BW") and op.stage > 0:
                    dst = schedule.device_of(op.mb, op.stage - 1)
                    sent.append(Transfer(int(start), d, dst, "grad", op.mb, op.stage))
    return sorted(sent)


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless: every micro-batch has F and (BW, or B then W) exactly once per stage, on the
    device holding that stage for its direction; per-device orders respect the dependencies (no deadlock);
    every send goes to a neighbour, is received by exactly the op that needs it, and no device sends two
    tensors of one kind the same way in one lock-step."""
    pp, n_mb = schedule.pp, schedule.n_mb
    if len(schedule.slots) != pp:
        raise ScheduleError(f"{schedule.name}: {len(schedule.slots)} devices for pp={pp}")
    seen: dict[tuple[str, int, int], int] = {}
    for d, slots in enumerate(schedule.slots):
        for slot in slots:
            if not 1 <= len(slot) <= 2 or (len(slot) == 2 and [o.kind for o in slot] != ["F", "BW"]):
                raise ScheduleError(f"{schedule.name}: device {d} slot {slot} is neither one op nor an F&B pair")
            for op in slot:
                if schedule.device_of(op.mb, op.stage) != d:
                    raise ScheduleError(f"{schedule.name}: {op} on device {d}, its stage lives elsewhere")
                key = (op.kind, op.mb, op.stage)
                seen[key] = seen.get(key, 0) + 1
    for m in range(n_mb):
        for s in range(pp):
            count = lambda kind: seen.pop((kind, m, s), 0)  # noqa: B023
            f, bw, b, w = count("F"), count("BW"), count("B"), count("W")
            if f != 1 or (bw, b, w) not in ((1, 0, 0), (0, 1, 1)):
                raise ScheduleError(f"{schedule.name}: micro-batch {m} stage {s} has F x{f}, BW x{bw}, B x{b}, W x{w}")
    if seen:
        raise ScheduleError(f"{schedule.name}: ops outside the micro-batch / stage range: {sorted(seen)}")
    grid = simulate(schedule)
    start = {(op.kind, op.mb, op.stage): grid[d][k][0]
             for d, slots in enumerate(schedule.slots) for k, slot in enumerate(slots) for op in slot}
    channels = set()
    for t in transfers(schedule):
        if abs(t.src - t.dst) != 1:
            raise ScheduleError(f"{schedule.name}: {t} is not between neighbours")
        channel = (t.step, t.src, t.dst, t.what)
        if channel in channels:
            raise ScheduleError(f"{schedule.name}: two {t.what} sends {t.src}->{t.dst} at step {t.step}")
        channels.add(channel)
        receivers = [("F", t.mb, t.stage + 1)] if t.what == "act" else [("B", t.mb, t.stage - 1),
                                                                         ("BW", t.mb, t.stage - 1)]
        consumer = [r for r in receivers if r in start]
        if len(consumer) != 1 or schedule.device_of(t.mb, consumer[0][2]) != t.dst or start[consumer[0]] <= t.step:
            raise ScheduleError(f"{schedule.name}: {t} has no matching receive after it")


def bubble(schedule: Schedule, costs: Costs) -> float:
    """Idle time of the busiest device within the step: makespan - its busy time (max over devices)."""
    times = simulate(schedule, costs)
    makespan = max(end for dev in times for _, end in dev) - min(start for dev in times for start, _ in dev)
    return max(makespan - sum(end - start for start, end in dev) for dev in times)


def peak_activations(schedule: Schedule) -> int:
    """Most micro-batch activations of one stage a device holds at once: an F's count until its B or BW
    (after a B, the deferred W keeps only its weight-gradient operands). Max over devices."""
    peak = 0
    for slots in schedule.slots:
        held = 0
        for slot in slots:
            for op in slot:
                held += {"F": 1, "BW": -1, "B": -1, "W": 0}[op.kind]
                peak = max(peak, held)
    return peak


def bubble_formula(name: str, pp: int, costs: Costs) -> float:
    """The DualPipe README's bubble formulas (REFERENCE.md) for the same pp stages; GPipe's equals 1F1B's."""
    fb = costs.F + costs.B if costs.FB is None else costs.FB
    return {"gpipe": (pp - 1) * (costs.F + costs.B), "1f1b": (pp - 1) * (costs.F + costs.B),
            "zb1p": (pp - 1) * (costs.F + costs.B - 2 * costs.W),
            "dualpipe": (pp / 2 - 1) * (fb + costs.B - 3 * costs.W)}[name]


PARAMS_PER_DEVICE = {"gpipe": 1, "1f1b": 1, "zb1p": 1, "dualpipe": 2}
"""Stage parameter copies per device, in units of one stage."""
