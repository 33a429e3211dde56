"""Memory is counted, not guessed: the plan of a training run's GPU memory, byte by byte.

* :mod:`.accounting` — bytes a model's tensors hold, by category (frozen, quantization state,
  adapters, gradients, optimizer state, rest), per FSDP2 rank: shared with ``bench/*_memory.py``.
* :mod:`.build` — the adapted model on the meta device, from a config and the package's surgery.
* :mod:`.activations` — activation and loss bytes from the model's shapes.
* :mod:`.optimizers` — optimizer state and step temporaries per ``--optim`` choice.
* :mod:`.plan` — :func:`plan_memory` → :class:`MemoryPlan`; :mod:`.levers` — which levers fit a budget.
"""
