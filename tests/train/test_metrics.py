from __future__ import annotations

import pytest
import torch

from sasformer.train.metrics import MetricsLogger, peak_tflops, read_metrics, throughput


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("Some Future GPU", None)],
)
def test_peak_lookup_prefers_the_longest_match(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == peak
    assert peak_tflops(torch.device("cuda", 0), override=123.0) == 123.0


def test_cpu_has_no_peak_unless_given():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=2.0) == 2.0


def test_throughput_arithmetic():
    got = throughput(tokens=1000, seconds=2.0, flops_per_token=6e9, world_size=2, peak=1000.0)
    assert got["tokens_per_s"] == 500.0
    assert got["tflops"] == pytest.approx(500 * 6e9 / 2 / 1e12)
    assert got["mfu"] == pytest.approx(got["tflops"] / 1000.0)
    assert throughput(10, 1.0, 1.0, 1, None)["mfu"] is None


def test_logger_appends_and_reader_keeps_last_per_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log({"kind": "train", "step": 1, "loss": 3.0})
    log.log({"kind": "train", "step": 2, "loss": 2.5})
    log.log({"kind": "val", "step": 2, "val_loss": 2.7})
    log.close()
    again = MetricsLogger(tmp_path, tensorboard=False)  # a resumed run re-logs step 2
    again.log({"kind": "train", "step": 2, "loss": 2.4})
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 3.0), (2, 2.4)]
    assert read_metrics(tmp_path / "metrics.jsonl", kind="val") == [{"kind": "val", "step": 2, "val_loss": 2.7}]
    assert len(read_metrics(tmp_path / "metrics.jsonl", kind=None)) == 3

