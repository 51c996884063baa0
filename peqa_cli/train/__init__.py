"""PEQA training: the accelerate loop (``loop``), what is trained and how (``optim``),
checkpoints (``state``), metrics (``metrics``), graceful stops (``signals``)."""
