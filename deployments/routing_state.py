"""Per-process state shared by the Router and its handle's request router.

Its own module, reached by attribute, because Serve cloudpickles the request
router class by value: globals defined next to it would be copies.
"""

# Replicas the handle currently knows to be running. Replaced whole, never mutated: Serve updates
# it from its router thread while admission iterates it on the Router's loop.
RUNNING_REPLICAS: frozenset[str] = frozenset()
