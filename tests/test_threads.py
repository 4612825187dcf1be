"""threads=auto: the cores other processes keep busy are left to them."""

import pytest
import torch

from fasterrcnn import threads


def test_auto_leaves_busy_cores(monkeypatch):
    monkeypatch.setattr(threads, "DEFAULT_THREADS", 2)
    monkeypatch.setattr(threads, "busy_cores", lambda sample_s=0.25: 0.1)
    assert threads.choose_threads("auto") == 2
    monkeypatch.setattr(threads, "busy_cores", lambda sample_s=0.25: 0.9)  # one competing process
    assert threads.choose_threads("auto") == 1
    monkeypatch.setattr(threads, "busy_cores", lambda sample_s=0.25: 3.0)  # never fewer than one
    assert threads.choose_threads(None) == 1


def test_a_fixed_count_and_bad_values():
    assert threads.choose_threads(1) == 1 and threads.choose_threads("3") == 3
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match="threads must be"):
            threads.choose_threads(bad)


def test_busy_cores_sees_a_busy_process():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    worker = ctx.Process(target=_spin, args=(stop,))
    worker.start()
    try:
        busy = threads.busy_cores(0.5)
    finally:
        stop.set()
        worker.join()
    assert busy >= 0.6  # one spinning process keeps about one core busy


def _spin(stop):
    while not stop.is_set():
        pass


def test_set_threads_applies_it():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_metrics_json_records_the_threads(make_cfg):
    from fasterrcnn.training import train

    metrics = train(make_cfg(["backbone.widths=[8,16,16,32]", "backbone.head_features=64", "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.max_epochs=1", "threads=1"]))
    assert metrics["threads"] == 1
