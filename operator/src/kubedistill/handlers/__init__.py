"""The operator: kopf handlers (`operator`), the reconcile service (`service`), ModelAlias (`alias`).

Run it with `kubedistill operator` or `python -m kubedistill.handlers`.
"""
