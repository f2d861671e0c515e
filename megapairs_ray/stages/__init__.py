"""Pipeline stages: plain callable classes that import no Ray.

A stage's constructor loads what it needs once (per Ray actor, or once in a test); ``__call__``
maps one batch to one batch. ``megapairs_ray.pipeline`` wires them into Ray Data.
"""
