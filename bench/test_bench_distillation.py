"""pytest-benchmark: distillation_loss forward+backward, trd_fast vs eager torch vs torch.compile, per case.

One test per (case, variant) of bench.suite.cpu_matrix, grouped by case so pytest-benchmark prints the
variants side by side; every row also lands in bench/results/cpu.json (see conftest.py).
"""

from __future__ import annotations

import pytest

from bench import suite
from bench.conftest import BACKEND, SMOKE

PARAMS = [pytest.param(case, variant, id=f"{case.label}-{variant.name}".replace(" ", "_"))
          for case, variants in suite.cpu_matrix(BACKEND, SMOKE) for variant in variants]


@pytest.mark.parametrize(("case", "variant"), PARAMS)
def test_distillation_loss(benchmark, bench_session, case, variant):
    benchmark.group = case.label

    def pedantic(step, rounds, *, count, warmup):
        if benchmark.disabled:  # --benchmark-disable: time with the scripts' own loop
            return suite.own_timer("cpu")(step, rounds, count=count, warmup=warmup)
        benchmark.pedantic(step, setup=rounds.before, teardown=rounds.after, rounds=count, warmup_rounds=warmup,
                           iterations=1)
        return list(benchmark.stats.stats.data)

    row = suite.measure(case, variant, bench_session.workspace, pedantic)
    suite.add_row(bench_session.document, case, row)
    if row["status"] != "ok":
        pytest.skip(row["reason"])
    benchmark.extra_info.update({key: row[key] for key in ("design_bytes", "ideal_bytes", "extra_peak_bytes",
                                                           "first_call_s", "loss")})
