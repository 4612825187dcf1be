"""The analysis tools behind ``scripts/``, importable and tested: each script parses its options
and calls one function here.

* :mod:`fasterrcnn.analysis.coverage`: how well anchors can match ground-truth boxes (pure:
  boxes, an anchor generator and image sizes in, numbers out);
  :mod:`fasterrcnn.analysis.coverage_report` compares anchor configs with it
  (``scripts/anchor_coverage.py``);
* :mod:`fasterrcnn.analysis.shapes`: the tensor shape at every stage (``scripts/inspect_shapes.py``);
* :mod:`fasterrcnn.analysis.explain`: the pipeline drawn on one image (``scripts/explain.py``).

The last two read every intermediate result from one :meth:`fasterrcnn.model.FasterRCNN.trace`,
the forward that training and validation run, instead of re-running the stages themselves.
This package imports nothing at import time, so the model's modules may use
:mod:`~fasterrcnn.analysis.coverage` without a cycle.
"""
