"""The planner: pure functions from a recipe, a model's dimensions and a cluster to a layout
and a memory estimate. No I/O happens here except `models.read_model`."""
