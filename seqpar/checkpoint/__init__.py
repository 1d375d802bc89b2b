"""Micro-batch checkpoints: what is saved (``state``), how it is stored and committed (``store``,
``codec``), written in the background (``writer``), and when (``manager``)."""
