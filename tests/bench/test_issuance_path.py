"""``bench.issuance_path``: the console's delivery unit, run in process through the writer."""

from __future__ import annotations

from bench.issuance_path import run


def test_every_measured_delivery_is_committed() -> None:
    result = run(deliveries=7, batch=3, profile=False)
    assert (result["deliveries"], result["recorded"], result["batch"]) == (6, 6, 3)
    assert result["cpu_ms_per_delivery"] > 0
