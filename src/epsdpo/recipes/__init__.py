"""Recipes: whole jobs built from the library and the stages. ``train`` (:func:`epsdpo.recipes.train.train`, the
``epsdpo train`` verb) and ``iterate`` (rounds of generate → select → train → evaluate)."""
