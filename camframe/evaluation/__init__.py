"""``camframe evaluate``: the harness over methods x layer sets x aggregations, its resume log and tables."""
