"""Test support for qworker.

``qworker.testing.modal_server`` is an in-memory server for the modal client's
Queue and Dict RPCs. It is not imported here, so ``python -m
qworker.testing.modal_server`` runs without a double-import warning.
"""
