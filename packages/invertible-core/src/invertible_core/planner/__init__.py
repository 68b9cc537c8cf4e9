"""The memory planner: which blocks of a network store their activations for a budget.

One concept per module, read in this order:

- :mod:`~invertible_core.planner.switches`: the memory switches of a network (a reversible
  sequence's saving and kept blocks, a checkpointable module's ``checkpointed``) and the
  one place that reads and sets them;
- :mod:`~invertible_core.planner.plan`: a plan as data (:class:`~invertible_core.MemoryPlan`),
  sizes (:func:`~invertible_core.parse_bytes`);
- :mod:`~invertible_core.planner.step`: the training step every measurement is made of
  (:class:`~invertible_core.TrainingStep`) and the quantities measured on it;
- :mod:`~invertible_core.planner.costs`: what each switch costs, when the step peaks;
- :mod:`~invertible_core.planner.fit`: the frontier of plans and the fitting of a budget
  (:func:`~invertible_core.fit_memory_budget`).

Switches and plans are light and imported with ``invertible_core``; the measuring modules
(step, costs, fit) load when one of their names is first used.
"""
