"""``fastdiff bench`` (fastdiff/bench.py): the machine line, the baselines side by side (SDPA for attention, a
compile column when asked), and speed-ups computed from the printed times."""

from __future__ import annotations

import pytest
import torch

from fastdiff import bench, cli

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_rows_have_the_strongest_baselines():
    rows = {r.op: r for r in bench.measure(CPU, 1, pipeline=False)}
    assert set(rows) == {"group_norm_silu", "conv3x3", "attention (self)", "attention (cross)", "ddim_step + CFG",
                         "vq_nearest"}
    for name, row in rows.items():
        assert set(row.baselines) == ({"eager", "sdpa"} if name.startswith("attention") else {"eager"}), name
        assert row.fastdiff > 0 and all(t > 0 for t in row.baselines.values())
        assert row.best() == min(row.baselines.items(), key=lambda kv: kv[1])


def test_table_prints_the_machine_and_each_rows_ratios():
    row = bench._Row("attention (self)", "2×8×1024, D=64")
    row.baselines.update(eager=0.010, sdpa=0.002)
    row.fastdiff = 0.004
    table = bench.format_table([row], CPU, 3)
    assert bench.cpu_model() in table and f"torch threads: {torch.get_num_threads()}" in table
    line = next(t for t in table.splitlines() if t.startswith("attention (self)"))
    assert line.split()[-6:] == ["10.00", "2.00", "4.00", "2.50×", "0.50×", "(sdpa)"]


def test_compile_column_with_a_cheap_backend():
    rows = bench.measure(CPU, 1, pipeline=False, compile_backend="eager")
    assert all("compile" in r.baselines and r.compile_s is not None for r in rows)
    table = bench.format_table(rows, CPU, 1)
    assert " compile " in table.splitlines()[2] and "compile times (first call, not in the table)" in table


def test_bad_repeats_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="repeats"):
        bench.measure(CPU, 0)
    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
