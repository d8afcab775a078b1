"""run_summary undoes Megatron-LM's first-iteration carry: the first iteration of an invocation
is printed without resetting the interval means (``should_reset = not is_first_iteration``), so
a resumed run's next line averages two iterations. Found on the GPU (docs/gpu_logs/run11_h100:
a resume compared with an uninterrupted run differed by 2.4% at exactly that line)."""

import pytest

from msa_megatron.megatron_lm.run_summary import is_interval_mean, parse_log, undo_first_iteration_carry

LINE = (" [2026-12-07 02:50:07.079885] iteration {it:8d}/      16 | consumed samples: {cs:12d} | "
        "learning rate: {lr:.6E} | global batch size:     4 | lm loss: {loss:.6E} | "
        "msa indexer kl: {kl:.6E} | load_balancing_loss: {lb:.6E} | loss scale: 1.0 | grad norm: {gn:.3f} |")


def megatron_lines(true, first, log_interval):
    """Iteration lines as Megatron-LM 0.19 prints them for per-iteration values ``true``
    (iteration -> dict), from iteration ``first`` on: accumulate, print on multiples of the
    interval and on the first iteration, reset after every print but the first."""
    acc, count, lines = {}, 0, []
    for it in sorted(i for i in true if i >= first):
        for k in ("loss", "kl", "lb"):
            acc[k] = acc.get(k, 0.0) + true[it][k]
        count += 1
        if it % log_interval == 0 or it == first:
            lines.append(LINE.format(it=it, cs=4 * it, lr=1e-4 / it, gn=true[it]["gn"],
                                     **{k: acc[k] / count for k in ("loss", "kl", "lb")}))
            if it != first:
                acc, count = {}, 0
    return "\n".join(lines)


def _true(n):
    return {it: dict(loss=9.0 - 0.3 * it + 0.05 * (it % 3), kl=0.4 + 0.01 * it, lb=1.2 - 0.01 * it, gn=10.0 + it)
            for it in range(1, n + 1)}


@pytest.mark.parametrize("first,log_interval", [(1, 1), (9, 1), (9, 4), (1, 5)])
def test_undo_first_iteration_carry_recovers_interval_means(first, log_interval):
    true = _true(16)
    log = parse_log(megatron_lines(true, first, log_interval))
    its = sorted(log.iterations)
    assert its[0] == first
    prev = first
    for it in its:
        lo = it if it == first else prev + 1
        want = sum(true[i]["loss"] for i in range(lo, it + 1)) / (it - lo + 1)
        assert log.iterations[it]["lm loss"] == pytest.approx(want, rel=1e-6), it
        want_kl = sum(true[i]["kl"] for i in range(lo, it + 1)) / (it - lo + 1)
        assert log.iterations[it]["msa indexer kl"] == pytest.approx(want_kl, rel=1e-6)
        assert log.iterations[it]["grad norm"] == pytest.approx(true[it]["gn"], abs=1e-3)  # not a mean
        prev = it


def test_resumed_run_matches_uninterrupted_run_line_by_line():
    """The GPU finding: run 1 prints 1..16, run 2 resumes at 8; with log interval 1 every line
    of run 2 must equal run 1's (raw, run 2's iteration 10 was the mean of 9 and 10)."""
    true = _true(16)
    run1, run2 = parse_log(megatron_lines(true, 1, 1)), parse_log(megatron_lines(true, 9, 1))
    for it in range(9, 17):
        assert run2.iterations[it]["lm loss"] == pytest.approx(run1.iterations[it]["lm loss"], rel=1e-6)
    raw = {}
    for line in megatron_lines(true, 9, 1).splitlines():
        if " iteration       10/" in line:
            raw = float(line.split("lm loss:")[1].split("|")[0])
    assert raw == pytest.approx((true[9]["loss"] + true[10]["loss"]) / 2, rel=1e-6)  # what was printed


def test_carry_helper_edges():
    assert undo_first_iteration_carry({}) is None and undo_first_iteration_carry({3: {"lm loss": 1.0}}) is None
    its = {3: {"lm loss": 1.0, "learning rate": 5.0}, 4: {"lm loss": 2.0, "learning rate": 7.0}}
    assert undo_first_iteration_carry(its) == 4 and its[4] == {"lm loss": 3.0, "learning rate": 7.0}
    assert is_interval_mean("lm loss") and is_interval_mean("load_balancing_loss") and is_interval_mean("msa main entropy")
    assert not is_interval_mean("loss scale") and not is_interval_mean("grad norm")


def test_upstream_training_log_still_carries_the_first_iteration():
    """The correction is only right while upstream behaves so: the patch's source checks pin it."""
    from msa_megatron.patches import mcore_019_training_loop as patch

    assert (f"{patch.TARGET}:training_log", "should_reset = not is_first_iteration") in patch.SOURCE_CHECKS
    patch.PATCH.verify_upstream()
