"""Objectives: what a stage trains for. Each is one module and a ``_target_`` in conf/stage."""
