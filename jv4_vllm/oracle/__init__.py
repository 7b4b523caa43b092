"""The oracle: the transformers reference encoder on the unmerged checkpoint, and ``verify``,
which holds a running service to it probe by probe (needs the ``model`` extra)."""
