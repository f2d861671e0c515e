"""The Ray layer: wires the plain stages into Ray Data and keeps the run directory's books.

Each ``run_<stage>`` function lists what is still to do (completion markers make reruns resume),
builds one streaming Ray Data pipeline for it, and records the stage in the run manifest.
"""
