"""Deployments of the flows: ``prefect.yaml`` at the project root is the one list.

* ``python -m deployments.deploy``: blocks, the process work pool and
  ``prefect deploy --all`` (run by ``prefect worker start --pool geodata-process``).
* ``python -m deployments.serve``: the same deployments served from one process,
  for users without workers (stopping it pauses them).
"""
