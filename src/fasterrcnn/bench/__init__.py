"""Measurements that scripts run and tests call: speed against torchvision's Faster R-CNN
(:mod:`~fasterrcnn.bench.speed`, ``scripts/bench.py``; built from :mod:`~fasterrcnn.bench.twin`,
:mod:`~fasterrcnn.bench.harness`, :mod:`~fasterrcnn.bench.stages`,
:mod:`~fasterrcnn.bench.accuracy` and :mod:`~fasterrcnn.bench.report`) and the peak memory of a
training step against the number of objects (:mod:`~fasterrcnn.bench.memory`,
``scripts/bench_memory.py``)."""
