"""The stages of the pipeline, each a library function under a CLI verb: ``generate`` (on-policy pairs),
``select`` (alignment-potential selection), ``evaluate`` (reward vs KL, win rate, accuracy) and ``plots``.

A stage reads what it is given and returns its result (writing only its own declared output files); recipes
(:mod:`epsdpo.recipes`) and verbs decide what goes into a run directory.
"""
