"""Process entry points: the ``builder-engine`` CLI, the ``up`` supervisor, the worker."""
