"""HTTP serving of a registered next-item model on Ray Serve (`llmrec-dist serve`).

- :mod:`.settings`: the ``serve:`` config section (:class:`ServeConfig`), YAML + dotted overrides.
- :mod:`.requests`: the HTTP contract's request checks, pure functions (no Ray, no model).
- :mod:`.source`: which model a URI names, the version an alias points to, loading it.
- :mod:`.app`: the FastAPI app and the Ray Serve deployment (batching, alias following).

Ray Serve and FastAPI are imported by :mod:`.app` only, so the rest loads without them.
"""
