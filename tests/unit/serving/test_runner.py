"""What the batch runner admits: named inputs only for models that name their inputs."""

from __future__ import annotations

import numpy as np

from pipeline.io.wire import Request
from pipeline.params.models import preset
from pipeline.serving.runner import input_problem


def test_named_inputs_to_a_model_without_input_names_are_a_bad_request() -> None:
    request = Request(id="a", model="m", inputs=None, named={"x": np.zeros((1, 32), np.float32)})
    problem = input_problem(preset("mlp"), request)
    assert problem is not None and problem.code == "bad_request"
    assert 'send "inputs" as a list of rows' in str(problem)
    assert request.inputs is None


def test_rows_to_a_numpy_model_are_still_checked_for_width() -> None:
    model = preset("mlp")
    ok = Request(id="a", model="m", inputs=np.zeros((2, model.input_dim), np.float32))
    wide = Request(id="b", model="m", inputs=np.zeros((2, model.input_dim + 1), np.float32))
    assert input_problem(model, ok) is None
    problem = input_problem(model, wide)
    assert problem is not None and problem.code == "bad_shape"
